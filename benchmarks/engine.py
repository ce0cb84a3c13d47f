"""Engine microbenchmark: forward+backward of one adapted linear layer, sparse delta vs LoRA vs frozen dense.

Run by hand: ``python benchmarks/engine.py [--tokens 512] [--out 1536 --in 576]``. Timings are medians of repeated
runs on this machine; compare ratios measured in the same run, not absolute times across machines.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import sparse_peft


def bench(fn, repeat: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(sizes)


class One(nn.Module):
    def __init__(self, out_f: int, in_f: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_f, out_f, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def step(model: nn.Module, x: torch.Tensor) -> None:
    model(x).square().mean().backward()
    for p in model.parameters():
        p.grad = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--out", type=int, default=1536)
    parser.add_argument("--in", dest="in_f", type=int, default=576)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    x = torch.randn(args.tokens, args.in_f, requires_grad=True)
    dense = One(args.out, args.in_f)
    dense.proj.weight.requires_grad_(False)
    base_time = bench(lambda: step(dense, x))
    print(f"shape {args.out}x{args.in_f}, tokens {args.tokens}, threads {torch.get_num_threads()}")
    print(f"{'layer':<28}{'trainable':>10}{'ms fwd+bwd':>12}{'x frozen':>10}{'saved MB':>10}")
    print(f"{'frozen dense':<28}{0:>10}{base_time * 1e3:>12.2f}{1.0:>10.2f}{saved_bytes(dense, x) / 2**20:>10.2f}")
    numel = args.out * args.in_f
    for density in (0.005, 0.01, 0.05):
        k = round(density * numel)
        rank = max(1, round(k / (args.out + args.in_f)))
        sparse = get_peft_model(
            One(args.out, args.in_f), sparse_peft.LiftConfig(density=density, filter_rank=8, target_modules=["proj"])
        )
        lora = get_peft_model(
            One(args.out, args.in_f), LoraConfig(r=rank, target_modules=["proj"], init_lora_weights=False)
        )
        for name, model in ((f"sparse delta d={density}", sparse), (f"LoRA r={rank}", lora)):
            t = bench(lambda m=model: step(m, x))
            n = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print(f"{name:<28}{n:>10}{t * 1e3:>12.2f}{t / base_time:>10.2f}{saved_bytes(model, x) / 2**20:>10.2f}")


if __name__ == "__main__":
    main()
