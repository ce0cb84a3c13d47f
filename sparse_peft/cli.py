"""``sparse-peft``: the command line. It parses and prints; the work is in :mod:`sparse_peft.pipeline`.

``sparse-peft train`` fine-tunes a real model with a registered sparse method on CPU (or a GPU when present) and
reports before/after quality, trainable parameters, step time and what the adapter stores, then reloads the saved
adapter in a fresh model and checks that it reproduces the trained model's outputs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from . import METHODS
from .defaults import BASELINES
from .pipeline import RunSpec, canonical_method, run_train
from .prune import PruneSpec, parse_prune_spec

logger = logging.getLogger("sparse_peft")


def parse_set(pairs: list[str]) -> dict[str, Any]:
    """``["rank=8", "svd=exact"]`` -> ``{"rank": 8, "svd": "exact"}``; values are parsed as JSON when possible."""
    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            result[key] = json.loads(raw)
        except json.JSONDecodeError:
            result[key] = raw
    return result


def train(args: argparse.Namespace) -> int:
    spec = RunSpec(
        method=args.method,
        overrides=parse_set(args.set),
        model=args.model,
        data=args.data,
        eval_data=args.eval_data,
        n_train=args.n_train,
        n_eval=args.n_eval,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        sparse_lr=args.sparse_lr,
        max_length=args.max_length,
        seed=args.seed,
        task_seed=args.task_seed,
        threads=args.threads,
        output=args.output,
        prune=args.prune,
        quantize=args.quantize,
        reload_check=args.reload_check,
    )
    summary, code = run_train(spec)
    print_summary(summary)
    if code:
        diff = summary["reload_max_abs_logit_diff"]
        print(f"ERROR: the reloaded adapter does not reproduce the trained model (max |Δlogit| = {diff:.2e})")
    return code


def print_summary(summary: dict[str, Any]) -> None:
    before, after = summary["before"], summary["after"]
    lines = ["", "=" * 64, f"method                 {summary['method']}"]
    if before and after:
        lines += [
            f"exact match            {before['exact_match']:.1%} -> {after['exact_match']:.1%}",
            f"number match           {before['number_match']:.1%} -> {after['number_match']:.1%}",
        ]
    lines += [
        f"trainable parameters   {summary['trainable_parameters']:,}",
        f"median step time       {summary['median_step_seconds']:.3f} s "
        f"(training {summary['train_seconds']:.1f} s, slowest step {summary['max_step_seconds']:.2f} s)",
        f"adapter bytes on disk  {summary['adapter_bytes'] or 0:,}  "
        f"(stored: {summary['stored_entries']:,} learned numbers, {summary['stored_bytes']:,} bytes with indices)",
        f"peak RSS in training   {(summary['peak_rss_bytes'] or 0) / 2**20:,.0f} MiB "
        f"({(summary['memory_above_frozen_bytes'] or 0) / 2**20:,.0f} MiB above the loaded model); optimizer state "
        f"{summary['optimizer_state_bytes'] / 2**20:,.1f} MiB",
        f"reload check           max |Δlogit| = {summary['reload_max_abs_logit_diff']:.2e}, max |Δadapter tensor| = "
        f"{summary['reload_max_abs_adapter_diff']:.2e}",
        f"adapter load time      {_fmt_seconds(summary.get('adapter_load_seconds'))} (PeftModel.from_pretrained)",
        f"adapter saved to       {summary['adapter_dir']}",
        "=" * 64,
    ]
    print("\n".join(lines), flush=True)


def _fmt_seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _prune_spec(text: str) -> PruneSpec:
    try:
        return parse_prune_spec(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-peft", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="fine-tune a model with a sparse method and report before/after")
    t.add_argument(
        "--method",
        default="lift",
        type=canonical_method,
        choices=sorted([*METHODS, *BASELINES]),
        help="sparse method (default: lift; diff-pruning is accepted for diff_pruning); 'lora', 'full', 'shira' "
        "and 'supertuning' train the benchmarks' baselines (PEFT LoRA r=16, full fine-tuning, PEFT's ShiRA and "
        "Super-Tuning at LoRA's trainable count)",
    )
    t.add_argument(
        "--quantize", choices=["4bit", "8bit"], default=None, help="train on a bitsandbytes base (after --prune)"
    )
    t.add_argument("--no-reload-check", dest="reload_check", action="store_false", help="skip the reload check")
    t.add_argument("--model", default=None, help="local model directory or .gguf (default: SmolLM2-135M-Instruct)")
    t.add_argument(
        "--data", default=None, help="local .jsonl file or datasets.save_to_disk folder (default: built-in task)"
    )
    t.add_argument("--eval-data", default=None, help="evaluation set with an 'answer' column (for --data)")
    t.add_argument("--n-train", type=int, default=2000, help="built-in task: training problems")
    t.add_argument(
        "--n-eval", type=int, default=100, help="built-in task: eval problems (the train split never depends on it)"
    )
    t.add_argument("--steps", type=int, default=100, help="optimizer steps")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--lr", type=float, default=None, help="learning rate (default: the method's main-job default)")
    t.add_argument(
        "--sparse-lr",
        type=float,
        default=None,
        help="RoSA only: learning rate of the sparse values S, while the LoRA factors use --lr (the paper trains S "
        "slower); default: the method's main-job default, else --lr",
    )
    t.add_argument("--max-length", type=int, default=128)
    t.add_argument("--seed", type=int, default=0, help="training seed (adapter init, data order)")
    t.add_argument(
        "--task-seed", type=int, default=0, help="built-in task: seed of its problems (default 0: the same eval set)"
    )
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    t.add_argument("--output", default=None, help="new folder for the adapter (default: runs/<method>-<time>)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="method config field, repeatable")
    t.add_argument(
        "--prune",
        type=_prune_spec,
        default=None,
        metavar="SPEC",
        help="prune the base before fine-tuning: wanda:0.5, magnitude:0.5, 2:4 (= wanda:2:4), magnitude:4:8; Wanda "
        "calibrates on 16 training prompts",
    )
    for kind in ("sft", "dpo"):
        sub.add_parser(kind, help=f"TRL {kind.upper()} with a sparse method (--config recipes/{kind}/METHOD.yaml)")
    i = sub.add_parser("inspect", help="per-layer table and PNG heatmap of a saved adapter")
    i.add_argument("adapter_dir", help="folder written by save_pretrained")
    i.add_argument("--png", default=None, help="heatmap path (default: ADAPTER_DIR/sparsity.png); 'none' to skip")
    i.add_argument("--module", default=None, help="matrix whose mask the heatmap shows (default: the first)")
    i.add_argument(
        "--compare",
        default=None,
        metavar="EARLIER_DIR",
        help="an earlier save of the same run: per module, how much of the mask moved (table and mask-moved.png)",
    )
    e = sub.add_parser("env", help="versions for a bug report, checked against the tested set (constraints.txt)")
    e.add_argument(
        "--freeze", default=None, metavar="PATH", help="write this environment as a tested set to PATH instead"
    )
    return parser


def inspect_adapter(args: argparse.Namespace) -> int:
    from .inspector import format_movement, format_table, mask_movement, read_adapter, write_heatmap, write_movement_map

    if args.compare is not None:
        movement = mask_movement(args.compare, args.adapter_dir)
        print(format_movement(movement))
        if args.png != "none":
            title = f"mask moved: {Path(args.compare).name} → {Path(args.adapter_dir).name}"
            png = write_movement_map(movement, args.png or Path(args.adapter_dir) / "mask-moved.png", title)
            print(f"map written to {png}")
        return 0
    config, reports = read_adapter(args.adapter_dir)
    print(format_table(config, reports))
    if args.png != "none":
        png = write_heatmap(args.adapter_dir, args.png or Path(args.adapter_dir) / "sparsity.png", args.module)
        print(f"heatmap written to {png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("SPARSE_PEFT_LOG", "WARNING"))
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("sft", "dpo"):  # TRL-style flags, parsed by TRL's own parser
        from .recipes import run

        return run(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "train":
        return train(args)
    if args.command == "inspect":
        return inspect_adapter(args)
    if args.command == "env":
        from .env import main as env_main

        return env_main(args.freeze)
    return 2


if __name__ == "__main__":
    sys.exit(main())
