"""Adapter load time, side by side: ``PeftModel.from_pretrained`` of saved adapters, timed round-robin.

Run by hand, on the adapters a benchmark run saved::

    python benchmarks/load.py benchmarks/results/<date>/runs --methods lora,rosa,lift,spiel --repeat 3

Each round loads every adapter once onto a fresh copy of the base (the copy is made before the clock starts), so
machine drift hits all alike; the table gives the median seconds and the ratio to LoRA's. ``sparse-peft train``'s
own ``adapter_load_seconds`` is one load per run, taken minutes apart from the other methods' loads.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from peft import PeftModel

import sparse_peft  # noqa: F401  (registers the methods with PEFT)
from sparse_peft.models import load_model_and_tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", help="folder holding one saved adapter per method (benchmarks/run.py's runs/)")
    parser.add_argument("--methods", default="lora,rosa,lift,spiel")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = ["lora", *[m for m in args.methods.split(",") if m and m != "lora"]]
    missing = [m for m in methods if not (Path(args.runs) / m / "adapter_config.json").is_file()]
    if missing:
        raise SystemExit(f"no saved adapter for {', '.join(missing)} under {args.runs}")
    base, _ = load_model_and_tokenizer()
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.repeat):
        for method in methods:
            fresh = copy.deepcopy(base)
            start = time.perf_counter()
            PeftModel.from_pretrained(fresh, str(Path(args.runs) / method))
            seconds[method].append(time.perf_counter() - start)
            del fresh
    lora = statistics.median(seconds["lora"])
    print(f"| method | load s (median of {args.repeat}) | x LoRA |\n|---|---|---|")
    for method in methods:
        median = statistics.median(seconds[method])
        print(f"| {method} | {median:.3f} | {median / lora:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
