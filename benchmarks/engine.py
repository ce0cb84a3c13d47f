"""Engine microbenchmark: forward+backward of one adapted linear layer against a frozen dense layer and LoRA.

Run by hand::

    python benchmarks/engine.py                      # 1536x576 (SmolLM2's MLP shape), 1024 tokens
    python benchmarks/engine.py --write results/engine.md

For each density d in 0.5%, 1% and 5% of the matrix it times ``y = x Wᵀ + Δ(x)`` followed by a backward of
``mean(y²)`` for

* the **sparse delta** (LIFT's layer: ``k = d·m·n`` values at fixed indices; one GEMM on the transient
  ``W + scatter(values)``, rebuilt in backward for ``∂x``, SDDMM gradient), and the same delta on the previous
  engine's **CSR path** (CSR SpMM forward and ``∂x``, SDDMM gradient),
* PEFT's own static entry-sparse deltas at the same budget: **ShiRA** (``r`` = LoRA's rank, ``r·(m+n)`` entries)
  and **Super-Tuning** (``sparsity = 1 - d``),
* **SMT blocks** (64x64 sub-matrices, ``round(d·m·n / 64²)`` of them at seeded random grid positions),
* **S²FT rows** (``round(d·m)`` output channels of an ``up_proj``) and **S²FT columns** (``round(d·n)`` input
  channels of a ``down_proj``),
* **PEFT LoRA** with the same budget, ``r = round(k / (m + n))``,

and reports the median time, the ratio to the frozen dense layer and to the LoRA of that density, and the bytes
autograd saves for backward (measured with ``saved_tensors_hooks``). Compare ratios from one run, not absolute times
across machines.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, ShiraConfig, SupertuningConfig, get_peft_model
from torch import nn

import sparse_peft
from sparse_peft.sparse.delta import SparsePattern, sparse_delta_matmul
from sparse_peft.sparse.io import atomic_write
from sparse_peft.sparse.select import random_score, topk_positions
from sparse_peft.tuners.smt.layer import SmtLinear

BLOCK = 64


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of every tensor autograd saves for the backward of one forward (shared storage counted per save)."""
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(sizes)


class One(nn.Module):
    """A single bias-free linear layer named ``name`` (the name decides S²FT's role)."""

    def __init__(self, out_f: int, in_f: int, name: str = "proj") -> None:
        super().__init__()
        self.name = name
        torch.manual_seed(0)
        setattr(self, name, nn.Linear(in_f, out_f, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.name)(x)


class CsrDelta(nn.Module):
    """The previous engine's entry-sparse layer: ``base(x) + CSR(ΔW) · x`` with ``k`` seeded random entries."""

    def __init__(self, out_f: int, in_f: int, density: float) -> None:
        super().__init__()
        self.proj = One(out_f, in_f).requires_grad_(False)
        k = round(density * out_f * in_f)
        self.shape = (out_f, in_f)
        self.pattern = SparsePattern.build(topk_positions(random_score(self.shape, 0), k, seed=0), self.shape)
        self.values = nn.Parameter(0.01 * torch.randn(k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + sparse_delta_matmul(x, self.values, self.pattern, self.shape)


def step(model: nn.Module, x: torch.Tensor) -> None:
    model(x).square().mean().backward()
    for p in model.parameters():
        p.grad = None


def smt_model(out_f: int, in_f: int, density: float) -> nn.Module:
    """SMT on one matrix with ``round(d·m·n/b²)`` blocks at seeded random positions (warm-up skipped)."""
    grid = (-(-out_f // BLOCK), -(-in_f // BLOCK))
    n_blocks = max(1, round(density * out_f * in_f / BLOCK**2))
    config = sparse_peft.SmtConfig(
        target_modules=["proj"], block_size=BLOCK, num_blocks=n_blocks, selection="per_matrix", window_steps=1
    )
    model = get_peft_model(One(out_f, in_f), config)
    chosen = torch.randperm(grid[0] * grid[1], generator=torch.Generator().manual_seed(0))[:n_blocks]
    coords = torch.stack([chosen // grid[1], chosen % grid[1]], dim=1)
    for layer in model.modules():
        if isinstance(layer, SmtLinear):
            layer.assign("default", coords)
    return model


def s2ft_model(out_f: int, in_f: int, density: float, role: str) -> nn.Module:
    """S²FT on one ``up_proj`` (output rows) or ``down_proj`` (input columns) with ratio ``d``."""
    config = sparse_peft.S2ftConfig(target_modules=[f"{role}_proj"], **{f"{role}_ratio": density})
    return get_peft_model(One(out_f, in_f, name=f"{role}_proj"), config)


def cases(out_f: int, in_f: int, density: float) -> list[tuple[str, nn.Module]]:
    """The layers compared at one density, LoRA last (it is the reference of the row group)."""
    k = round(density * out_f * in_f)
    rank = max(1, round(k / (out_f + in_f)))
    lift = sparse_peft.LiftConfig(density=density, filter_rank=8, target_modules=["proj"])
    lora = LoraConfig(r=rank, target_modules=["proj"], init_lora_weights=False)
    shira = ShiraConfig(r=rank, target_modules=["proj"], random_seed=0)
    supertuning = SupertuningConfig(sparsity=1 - density, target_modules=["proj"])
    return [
        ("sparse delta (LIFT), one GEMM", get_peft_model(One(out_f, in_f), lift)),
        ("sparse delta, CSR path (previous engine)", CsrDelta(out_f, in_f, density)),
        (f"PEFT ShiRA r={rank}", get_peft_model(One(out_f, in_f), shira)),
        ("PEFT Super-Tuning", get_peft_model(One(out_f, in_f), supertuning)),
        ("SMT blocks 64x64", smt_model(out_f, in_f, density)),
        ("S²FT rows (up_proj)", s2ft_model(out_f, in_f, density, "up")),
        ("S²FT columns (down_proj)", s2ft_model(in_f, out_f, density, "down")),
        (f"LoRA r={rank}", get_peft_model(One(out_f, in_f), lora)),
    ]


def interleaved(steps: list[Callable[[], None]], repeat: int) -> list[float]:
    """Median wall time of each step, timed round-robin (one run of each per round, after three warm-up rounds), so
    that drifts of the machine's speed hit every case alike instead of whichever ran during them."""
    times: list[list[float]] = [[] for _ in steps]
    for round_ in range(repeat + 3):
        for fn, sink in zip(steps, times, strict=True):
            start = time.perf_counter()
            fn()
            if round_ >= 3:
                sink.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def run(out_f: int, in_f: int, tokens: int, repeat: int) -> list[dict[str, object]]:
    """All rows of the table: frozen dense first, then per density the layers with their ratios."""
    x = torch.randn(tokens, in_f, requires_grad=True)
    x_t = torch.randn(tokens, out_f, requires_grad=True)
    frozen = One(out_f, in_f).requires_grad_(False)
    frozen_t = One(in_f, out_f).requires_grad_(False)
    entries: list[tuple[float | None, str, nn.Module, torch.Tensor]] = [
        (None, "frozen dense", frozen, x),
        (None, "frozen dense (transposed)", frozen_t, x_t),
    ]
    for density in (0.005, 0.01, 0.05):
        for name, model in cases(out_f, in_f, density):
            entries.append((density, name, model, x_t if name.startswith("S²FT columns") else x))
    seconds = interleaved([lambda m=m, i=i: step(m, i) for _, _, m, i in entries], repeat)
    rows: list[dict[str, object]] = []
    for (density, name, model, inp), sec in zip(entries, seconds, strict=True):
        rows.append(
            {
                "density": density,
                "layer": name,
                "seconds": sec,
                "saved": saved_bytes(model, inp),
                "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            }
        )
    base, base_t = rows[0], rows[1]
    for density in (0.005, 0.01, 0.05):
        group = [r for r in rows if r["density"] == density]
        lora = group[-1]
        for row in group:
            transposed = str(row["layer"]).startswith("S²FT columns")
            row["vs_frozen"] = row["seconds"] / (base_t if transposed else base)["seconds"]
            row["vs_lora"] = row["seconds"] / lora["seconds"]
            row["saved_vs_lora"] = row["saved"] / lora["saved"]
    return rows


def markdown(rows: list[dict[str, object]], header: str) -> str:
    lines = [
        header,
        "",
        "| density | layer | trainable | ms fwd+bwd | x frozen | x LoRA | saved for backward MiB | saved x LoRA |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        density = "-" if r["density"] is None else f"{r['density']:.1%}"
        ratio = {key: "-" if key not in r else f"{r[key]:.2f}x" for key in ("vs_frozen", "vs_lora", "saved_vs_lora")}
        lines.append(
            f"| {density} | {r['layer']} | {r['trainable']:,} | {r['seconds'] * 1e3:.2f} | {ratio['vs_frozen']} "
            f"| {ratio['vs_lora']} | {r['saved'] / 2**20:.2f} | {ratio['saved_vs_lora']} |"
        )
    return "\n".join(lines)


def table(header: str, columns: Sequence[tuple[str, Callable[[dict[str, Any]], str]]], rows: list[dict]) -> str:
    """A Markdown table under ``header``: one ``(title, cell formatter)`` per column, one line per row."""
    lines = [header, "", "| " + " | ".join(title for title, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row) for _, cell in columns) + " |" for row in rows]
    return "\n".join(lines)


def bench_parser(doc: str, tokens: int, repeat: int, tokens_help: str) -> argparse.ArgumentParser:
    """The flags of every one-layer microbenchmark here: ``--tokens``, ``--repeat``, ``--threads``, ``--write``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=tokens, help=tokens_help)
    parser.add_argument("--repeat", type=int, default=repeat)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--write", default=None, help="also write the Markdown table to this file")
    return parser


def parse(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse the flags and apply ``--threads``."""
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def publish(text: str, path: str | None) -> None:
    """Print the table and, with ``--write``, write it atomically."""
    print(text)
    if path:
        atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))


def main() -> None:
    parser = bench_parser(__doc__, 1024, 30, "rows of x (batch 8 x 128 tokens)")
    parser.add_argument("--out", type=int, default=1536)
    parser.add_argument("--in", dest="in_f", type=int, default=576)
    args = parse(parser)
    rows = run(args.out, args.in_f, args.tokens, args.repeat)
    header = (
        f"Shape {args.out}x{args.in_f} (S²FT columns: {args.in_f}x{args.out}), {args.tokens} tokens, float32, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, median of {args.repeat} round-robin rounds."
    )
    publish(markdown(rows, header), args.write)


if __name__ == "__main__":
    main()
