"""SDDMM microbenchmark: ``∂values[e] = Σ_t g[t, row_e] · x[t, col_e]`` on the CPU, torch's kernel against ours.

Run by hand::

    python benchmarks/sddmm.py --threads 2
    python benchmarks/sddmm.py --threads 2 --write benchmarks/results/<date>/sddmm.md

For SmolLM2-135M's matrix shapes (q/o 576x576, k/v 192x576, gate/up 1536x576, down 576x1536), masks of LoRA's
budget ``(m + n)·16`` entries at random positions, ``g`` and ``x`` as autograd hands them over (``(tokens, out)`` and
``(tokens, in)``, float32), it times

* ``torch.sparse.sampled_addmm`` as the engine called it before (``gᵀ`` made contiguous, a CSR pattern of zeros,
  the values put back in slot order), and
* the compiled kernel of :mod:`sparse_peft.sparse.cpu_kernel` at several token chunk sizes,

round-robin (one call of each per round, after three warm-up rounds), and reports medians, the speed-up, and the
multiply-adds per second. Every case's result is checked against the dense product ``(gᵀx)[rows, cols]`` first.
Compare ratios from one run, not absolute times across machines.
"""

from __future__ import annotations

import torch
from engine import bench_parser, interleaved, parse, publish, table

from sparse_peft.sparse import cpu_kernel
from sparse_peft.sparse.delta import SparsePattern

SHAPES = {
    "q_proj / o_proj": (576, 576),
    "k_proj / v_proj": (192, 576),
    "gate / up_proj": (1536, 576),
    "down_proj": (576, 1536),
}


def torch_sddmm(pattern: SparsePattern, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The engine's previous path: ``sampled_addmm`` on a CSR pattern, values back in slot order."""
    zeros = pattern.matrix(torch.zeros(pattern.row_order.numel()))
    sampled = torch.sparse.sampled_addmm(zeros, g.t().contiguous(), x.contiguous(), beta=0.0)
    result = torch.empty(pattern.row_order.numel())
    result[pattern.row_order] = sampled.values()
    return result


def run(tokens: int, chunks: list[int], repeat: int) -> list[dict[str, object]]:
    rows = []
    for name, (m, n) in SHAPES.items():
        generator = torch.Generator().manual_seed(0)
        k = (m + n) * 16
        flat = torch.randperm(m * n, generator=generator)[:k]
        pattern = SparsePattern.build(flat, (m, n))
        g, x = torch.randn(tokens, m, generator=generator), torch.randn(tokens, n, generator=generator)
        reference = (g.t() @ x).view(-1)[flat]
        calls = {"torch.sparse.sampled_addmm": lambda p=pattern, g=g, x=x: torch_sddmm(p, g, x)}
        for chunk in chunks:
            calls[f"compiled, chunk {chunk}"] = lambda p=pattern, g=g, x=x, c=chunk: cpu_kernel.sddmm(
                g, x, p.crow, p.col_sorted, p.row_order, chunk=c
            )
        for label, call in calls.items():
            error = (call() - reference).abs().max().item()
            assert error < 1e-3 * reference.abs().max().item(), f"{name} {label}: max error {error}"
        seconds = interleaved(list(calls.values()), repeat)
        for (label, _), sec in zip(calls.items(), seconds, strict=True):
            rows.append(
                {
                    "matrix": f"{name} {m}x{n}",
                    "k": k,
                    "kernel": label,
                    "seconds": sec,
                    "speedup": seconds[0] / sec,
                    "gmacs": k * tokens / sec / 1e9,
                }
            )
    return rows


def markdown(rows: list[dict[str, object]], header: str) -> str:
    columns = [
        ("matrix", lambda r: str(r["matrix"])),
        ("entries", lambda r: f"{r['k']:,}"),
        ("kernel", lambda r: str(r["kernel"])),
        ("ms", lambda r: f"{r['seconds'] * 1e3:.2f}"),
        ("speed-up", lambda r: f"{r['speedup']:.2f}x"),
        ("GMAC/s", lambda r: f"{r['gmacs']:.1f}"),
    ]
    return table(header, columns, rows)


def main() -> None:
    parser = bench_parser(__doc__, 800, 20, "rows of g and x (the main job: batch 8, ~100 tokens)")
    parser.add_argument("--chunks", default="64,128,256", help="token chunk sizes of the compiled kernel")
    args = parse(parser)
    if not cpu_kernel.available():
        raise SystemExit("the compiled kernel is not available here (no C compiler, or SPARSE_PEFT_CPU_KERNEL=0)")
    rows = run(args.tokens, [int(c) for c in args.chunks.split(",")], args.repeat)
    header = (
        f"{args.tokens} tokens, masks of (m + n)·16 entries, float32, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, median of {args.repeat} round-robin rounds."
    )
    publish(markdown(rows, header), args.write)


if __name__ == "__main__":
    main()
