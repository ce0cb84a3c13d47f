"""LIFT's mask refresh on a trained adapter: the warm subspace iteration against the exact SVD.

Run by hand, on an adapter the main job saved (``sparse-peft train --method lift`` or ``benchmarks/run.py``)::

    python benchmarks/refresh.py benchmarks/results/<date>/runs/lift
    python benchmarks/refresh.py RUN_DIR --write benchmarks/results/<date>/refresh.md

For every LIFT layer it forms ``W + ΔW`` from the trained adapter, selects the mask the next refresh would pick with
the exact float32 SVD and with the warm refresh (subspace iteration from the base weight's basis, 1 and 2
iterations, and 0: the base's basis alone), and reports how many of the exact mask's entries each picks (mean and
worst layer) and the time of a whole-model refresh with each (the base's basis is computed once beforehand, as the
first selection does in training). Times are medians of the per-layer sums over ``--repeat`` passes, run
round-robin so drift hits every variant alike; compare ratios from one run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from peft import PeftModel

import sparse_peft
from sparse_peft.models import load_model_and_tokenizer
from sparse_peft.sparse.io import atomic_write
from sparse_peft.sparse.select import principal_score_and_basis, topk_positions, warm_principal_score

VARIANTS = ("exact", "warm 0", "warm 1", "warm 2")


def layer_masks(layer: sparse_peft.LiftLinear, basis: torch.Tensor) -> tuple[dict[str, set[int]], dict[str, float]]:
    """The refresh mask of one layer by each variant, and each variant's seconds."""
    config = layer.adapter_configs["default"]
    k = layer.values["default"].numel()
    current = layer.base_weight_float() + layer.get_delta_weight("default").float()
    masks, seconds = {}, {}
    for variant in VARIANTS:
        start = time.perf_counter()
        if variant == "exact":
            score = principal_score_and_basis(current, config.filter_rank)[0]
        else:
            score = warm_principal_score(current, config.filter_rank, basis, niter=int(variant.split()[1]))
        positions = topk_positions(score, k, seed=config.seed)
        seconds[variant] = time.perf_counter() - start
        masks[variant] = set(positions.tolist())
    return masks, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", help="folder of a saved LIFT adapter (adapter_config.json + safetensors)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--write", default=None, help="also write the Markdown table to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base, _ = load_model_and_tokenizer()
    model = PeftModel.from_pretrained(base, args.adapter)
    layers = [m for m in model.modules() if isinstance(m, sparse_peft.LiftLinear)]
    if not layers:
        raise SystemExit(f"{args.adapter} holds no LIFT adapter")
    config = layers[0].adapter_configs["default"]
    bases = [principal_score_and_basis(layer.base_weight_float(), config.filter_rank)[1] for layer in layers]
    agreement: dict[str, list[float]] = {v: [] for v in VARIANTS if v != "exact"}
    moved: list[float] = []
    totals: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for round_ in range(args.repeat):
        spent = dict.fromkeys(VARIANTS, 0.0)
        for layer, basis in zip(layers, bases, strict=True):
            masks, seconds = layer_masks(layer, basis)
            for variant in VARIANTS:
                spent[variant] += seconds[variant]
            if round_ == 0:
                truth = masks["exact"]
                for variant in agreement:
                    agreement[variant].append(len(masks[variant] & truth) / len(truth))
                current = set(layer.indices["default"].tolist())
                moved.append(1 - len(current & truth) / len(truth))
        for variant in VARIANTS:
            totals[variant].append(spent[variant])
    exact_seconds = statistics.median(totals["exact"])
    lines = [
        f"LIFT adapter {args.adapter}: {len(layers)} layers, filter_rank={config.filter_rank}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeat} whole-model refreshes.",
        f"The next refresh would move {statistics.mean(moved):.1%} of the mask on average (exact SVD).",
        "",
        "| refresh | agreement with exact (mean) | worst layer | seconds per refresh | x exact |",
        "|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        seconds = statistics.median(totals[variant])
        if variant == "exact":
            lines.append(f"| exact SVD | 100% | 100% | {seconds:.2f} | 1.00x |")
            continue
        values = agreement[variant]
        lines.append(
            f"| {variant} iterations | {statistics.mean(values):.2%} | {min(values):.2%} | {seconds:.2f} "
            f"| {seconds / exact_seconds:.2f}x |"
        )
    text = "\n".join(lines)
    print(text)
    if args.write:
        atomic_write(args.write, lambda tmp: Path(tmp).write_text(text + "\n"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
