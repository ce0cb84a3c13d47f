"""One adapted layer of each family off the entry-sparse path, at its main-job config, against PEFT LoRA r=16.

Run by hand::

    python benchmarks/families.py --threads 2 --write benchmarks/results/<date>/families.md

For each of SmolLM2-135M's four linear shapes (q/o 576x576, k/v 192x576, gate/up 1536x576, down 576x1536) and
800 tokens (batch 8 x 100), it times forward + backward of ``mean(y²)`` round-robin (medians, as
``benchmarks/engine.py``) for

* **frozen dense** and **PEFT LoRA r=16** (the reference of every ratio),
* **RoSA** (r=8, density 2 %, the main job's): the LoRA folded into the one GEMM (``LowRank`` terms of
  :func:`sparse_peft.sparse.delta.fused_sparse_linear`) and, for comparison, the same adapter with the LoRA as its
  own branch beside the fused sparse delta (the layer before the fold),
* **SNELL** (r=16, sparsity 0.9, kernel scale 3.0): the compiled kernels with the factors' gradient from ``gᵀx`` at
  the survivors (SDDMM), the same with the dense ``gᵀx``, and torch's kernels (``SPARSE_PEFT_CPU_KERNEL=0``),
* **LoRS** (r=16, exact gradient) and **SPP** (16 groups) on a 2:4-pruned copy of the layer.

Compare ratios from one run, not absolute times across machines.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from engine import One, bench_parser, interleaved, parse, publish, saved_bytes, step, table
from peft import LoraConfig, get_peft_model
from steps import cpu_kernel_switch
from torch import nn

import sparse_peft.sparse.kernel_delta as kernel_delta
from sparse_peft import RosaLinear, magnitude_prune
from sparse_peft.pipeline import method_config

SHAPES = ((576, 576), (192, 576), (1536, 576), (576, 1536))


class RosaUnfolded(nn.Module):
    """A RoSA layer run as before the fold: the fused sparse delta, plus ``s·B(A x)`` as its own branch."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.layer = next(m for m in model.modules() if isinstance(m, RosaLinear))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        a, b = layer.lora_A["default"], layer.lora_B["default"]
        scale = layer.adapter_configs["default"].scaling
        return layer._delta_forward(x) + F.linear(F.linear(x, a), b) * scale


def adapted(method: str, out_f: int, in_f: int, pruned: bool = False, **overrides: object) -> nn.Module:
    """``method``'s main-job config on one layer (``init_weights=False``: a live adapter, RoSA's mask chosen)."""
    base = One(out_f, in_f)
    if pruned:
        magnitude_prune(base, n_m=(2, 4))
    config = method_config(method, {"target_modules": ["proj"], **overrides})
    config.task_type = None
    return get_peft_model(base, config)


@contextlib.contextmanager
def kernels(mode: str) -> Iterator[None]:
    """SNELL's backward for one timed call: ``sparse`` / ``dense`` on the compiled kernels, ``torch`` without them."""
    previous = kernel_delta.SPARSE_GRAD_MAX_KEPT
    kernel_delta.SPARSE_GRAD_MAX_KEPT = 1.0 if mode == "sparse" else 0.0
    try:
        with cpu_kernel_switch(mode != "torch"):
            yield
    finally:
        kernel_delta.SPARSE_GRAD_MAX_KEPT = previous


def cases(out_f: int, in_f: int) -> list[tuple[str, nn.Module, str]]:
    """``(name, model, kernel mode)`` of one shape, LoRA second (the reference)."""
    lora = LoraConfig(r=16, target_modules=["proj"], init_lora_weights=False)
    rosa = adapted("rosa", out_f, in_f, init_weights=False)
    snell = adapted("snell", out_f, in_f)
    return [
        ("frozen dense", One(out_f, in_f).requires_grad_(False), "sparse"),
        ("PEFT LoRA r=16", get_peft_model(One(out_f, in_f), lora), "sparse"),
        ("RoSA, LoRA folded into the one GEMM", rosa, "sparse"),
        ("RoSA, LoRA as its own branch", RosaUnfolded(rosa), "sparse"),
        ("SNELL, compiled, gradient at the survivors", snell, "sparse"),
        ("SNELL, compiled, dense gᵀx", snell, "dense"),
        ("SNELL, torch kernels", snell, "torch"),
        ("LoRS (2:4 base)", adapted("lors", out_f, in_f, pruned=True, init_weights=False), "sparse"),
        ("SPP (2:4 base)", adapted("spp", out_f, in_f, pruned=True, init_weights=False), "sparse"),
    ]


def timed(model: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], None]:
    def run() -> None:
        with kernels(mode):
            step(model, x)

    return run


def run(tokens: int, repeat: int) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for out_f, in_f in SHAPES:
        x = torch.randn(tokens, in_f, requires_grad=True)
        group = cases(out_f, in_f)
        seconds = interleaved([timed(model, x, mode) for _, model, mode in group], repeat)
        frozen, lora = seconds[0], seconds[1]
        for (name, model, mode), sec in zip(group, seconds, strict=True):
            with kernels(mode):
                saved = saved_bytes(model, x)
            rows.append(
                {
                    "shape": f"{out_f}x{in_f}",
                    "layer": name,
                    "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                    "seconds": sec,
                    "vs_frozen": sec / frozen,
                    "vs_lora": sec / lora,
                    "saved": saved,
                }
            )
    return rows


def markdown(rows: list[dict[str, object]], header: str) -> str:
    columns = [
        ("shape", lambda r: str(r["shape"])),
        ("layer", lambda r: str(r["layer"])),
        ("trainable", lambda r: f"{r['trainable']:,}"),
        ("ms fwd+bwd", lambda r: f"{r['seconds'] * 1e3:.2f}"),
        ("x frozen", lambda r: f"{r['vs_frozen']:.2f}x"),
        ("x LoRA", lambda r: f"{r['vs_lora']:.2f}x"),
        ("saved for backward MiB", lambda r: f"{r['saved'] / 2**20:.2f}"),
    ]
    return table(header, columns, rows)


def main() -> None:
    args = parse(bench_parser(__doc__, 800, 15, "rows of x (batch 8 x 100 tokens)"))
    torch.manual_seed(0)
    rows = run(args.tokens, args.repeat)
    header = (
        f"{args.tokens} tokens, float32, {torch.get_num_threads()} threads, torch {torch.__version__}, median of "
        f"{args.repeat} round-robin rounds; main-job configs (RoSA r=8 + 2 %, SNELL r=16 at sparsity 0.9, LoRS "
        "r=16, SPP 16 groups)."
    )
    publish(markdown(rows, header), args.write)


if __name__ == "__main__":
    main()
