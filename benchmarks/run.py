"""Benchmark every sparse_peft method against PEFT's LoRA and full fine-tuning on the default real model.

Run by hand (never in CI)::

    python benchmarks/run.py            # full run: 100 steps per method, 100 eval problems
    python benchmarks/run.py --quick    # smoke run, under 10 minutes: 3 steps, 10 eval problems

Each method trains in its own process through ``sparse-peft train`` (same model, task, steps, batch, sequence length,
seed and thread count for all), which writes ``summary.json`` with quality (exact match before/after), median step
time, peak resident memory and the part above the loaded frozen model, optimizer-state bytes, trainable parameters
and adapter bytes. This script collects the summaries into ``RESULTS/results.json``, a Markdown table with ratios to
LoRA measured in the same run, and PNG plots. Learning rates: each method's main-job default
(``sparse_peft/defaults.py``); no per-method sweep is run (``benchmarks/sweep.py`` runs those). SPP and LoRS fine-tune a
2:4-pruned copy of the model (``--prune 2:4``), and so does the ``lora_pruned`` row (PEFT's LoRA on the same pruned
base), which is their quality reference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BASELINES = ("lora", "full", "shira", "supertuning", "lora_pruned")
PRUNED = {"spp": "2:4", "lors": "2:4", "lora_pruned": "2:4"}
ENTRY_SPARSE = ("lift", "spiel", "rosa", "diff_pruning")
STRUCTURED = ("smt", "s2ft")
QUALITY_CLAIM = ("lift", "rosa", "spiel")
WALL_TIME_CLAIM = ("lift", "spiel", "rosa")  # training time including mask refreshes and selections


def all_methods(equal_budget: bool = False) -> list[str]:
    """The baselines and every method; with ``equal_budget`` also ``<method>@lora_budget`` rows next to the methods
    whose main-job budget differs from LoRA's."""
    import sparse_peft
    from sparse_peft.defaults import EQUAL_BUDGET

    methods = [*BASELINES]
    for method in sorted(sparse_peft.METHODS):
        methods += [method, f"{method}{EQUAL_SUFFIX}"] if equal_budget and method in EQUAL_BUDGET else [method]
    return methods


EQUAL_SUFFIX = "@lora_budget"


def run_method(method: str, args: argparse.Namespace, out: Path) -> dict[str, Any] | None:
    """Train one method (or ``<method>@lora_budget``: its config at LoRA's trainable count, ``EQUAL_BUDGET`` in
    ``sparse_peft/defaults.py``) in a fresh process and return its summary (None if it failed; the log says why)."""
    from sparse_peft.defaults import EQUAL_BUDGET

    run_dir = out / "runs" / method
    method, _, budget = method.partition("@")
    if (run_dir / "summary.json").is_file() and args.reuse:
        return json.loads((run_dir / "summary.json").read_text())
    command = [
        sys.executable, "-m", "sparse_peft.cli", "train", "--method", method, "--steps", str(args.steps),
        "--n-eval", str(args.n_eval), "--n-train", str(args.n_train), "--batch-size", str(args.batch_size),
        "--threads", str(args.threads), "--output", str(run_dir.with_name(f"{method}-{int(time.time())}")),
    ]  # fmt: skip
    if method in PRUNED:
        command += ["--prune", PRUNED[method]]
    for key, value in EQUAL_BUDGET[method].items() if budget else ():
        command += ["--set", f"{key}={json.dumps(value)}"]
    if args.quick:
        command += ["--no-reload-check"]
    log = out / "logs" / f"{run_dir.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=os.environ.copy()).returncode
    print(f"{run_dir.name:<14} exit {code} in {time.perf_counter() - start:.0f} s (log: {log})", flush=True)
    produced = Path(command[command.index("--output") + 1]) / "summary.json"
    if code != 0 or not produced.is_file():
        return None
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    if run_dir.exists():
        run_dir = run_dir.with_name(f"{run_dir.name}-previous-{int(time.time())}")
    produced.parent.rename(run_dir)
    return json.loads((run_dir / "summary.json").read_text())


def ratios(rows: dict[str, dict[str, Any]]) -> None:
    """Add ``*_vs_lora`` ratios (same run) to each row."""
    lora = rows.get("lora")
    if lora is None:
        return
    for row in rows.values():
        for key in (
            "median_step_seconds",
            "train_seconds",
            "memory_above_frozen_bytes",
            "optimizer_state_bytes",
            "adapter_bytes",
            "adapter_load_seconds",
        ):
            if row.get(key) is not None and lora.get(key):
                row[f"{key}_vs_lora"] = row[key] / lora[key]


def _fmt(value: Any, kind: str = "") -> str:
    if value is None:
        return "-"
    if kind == "pct":
        return f"{value:.0%}"
    if kind == "mb":
        return f"{value / 2**20:,.1f}"
    if kind == "x":
        return f"{value:.2f}x"
    if kind == "s":
        return f"{value:.2f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def table(rows: dict[str, dict[str, Any]]) -> str:
    header = (
        "| method | trainable | exact match before → after | step s | step vs LoRA | train s | train vs LoRA "
        "| peak RSS MiB | above frozen MiB "
        "| memory vs LoRA | optimizer state MiB | adapter MiB | k·(v+i) MiB | load s | load vs LoRA |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for method, r in rows.items():
        before = (r.get("before") or {}).get("exact_match")
        after = (r.get("after") or {}).get("exact_match")
        lines.append(
            f"| {method} | {_fmt(r.get('trainable_parameters'))} | {_fmt(before, 'pct')} → {_fmt(after, 'pct')} "
            f"| {_fmt(r.get('median_step_seconds'), 's')} | {_fmt(r.get('median_step_seconds_vs_lora'), 'x')} "
            f"| {_fmt(r.get('train_seconds'), 's')} | {_fmt(r.get('train_seconds_vs_lora'), 'x')} "
            f"| {_fmt(r.get('peak_rss_bytes'), 'mb')} | {_fmt(r.get('memory_above_frozen_bytes'), 'mb')} "
            f"| {_fmt(r.get('memory_above_frozen_bytes_vs_lora'), 'x')} | {_fmt(r.get('optimizer_state_bytes'), 'mb')} "
            f"| {_fmt(r.get('adapter_bytes'), 'mb')} | {_fmt(r.get('k_times_value_plus_index_bytes') or None, 'mb')} "
            f"| {_fmt(r.get('adapter_load_seconds'), 's')} | {_fmt(r.get('adapter_load_seconds_vs_lora'), 'x')} |"
        )
    return "\n".join(lines)


def expected_adapter_bytes(row: dict[str, Any]) -> int | None:
    """What an entry-sparse adapter file should hold: ``k·(value bytes + index bytes)``, plus RoSA's LoRA factors
    (float32, ``trainable − k`` of them); None for methods that store no sparse delta."""
    payload = row.get("k_times_value_plus_index_bytes") or 0
    if not payload:
        return None
    if row.get("method") == "rosa":
        payload += 4 * max(0, row["trainable_parameters"] - row["stored_entries"])
    return payload


def _verdict(ok: bool | None, text: str) -> str:
    mark = "n/a" if ok is None else ("met" if ok else "**missed**")
    return f"{mark}: {text}"


def _ratio_target(row: dict[str, Any], key: str, limit: float, label: str) -> str:
    value = row.get(key)
    if value is None:
        return _verdict(None, f"{label} not measured")
    return _verdict(value <= limit, f"{label} {value:.2f}x (target ≤ {limit:g}x)")


def targets(rows: dict[str, dict[str, Any]]) -> str:
    """Where each method stands against the issue's targets (ratios to LoRA from the same run)."""
    lines = ["| method | target | where it stands |", "|---|---|---|"]
    full = rows.get("full") or {}
    lora_quality = ((rows.get("lora") or {}).get("after") or {}).get("exact_match")
    for label, row in rows.items():
        method = label.partition("@")[0]  # "<method>@lora_budget" rows are checked as their method
        checks: list[tuple[str, str]] = []
        if method in ENTRY_SPARSE:
            checks.append(("step ≤ 1.05x LoRA", _ratio_target(row, "median_step_seconds_vs_lora", 1.05, "step")))
            if method in WALL_TIME_CLAIM:
                wall = _ratio_target(row, "train_seconds_vs_lora", 1.10, "training wall time")
                checks.append(("training wall time ≤ 1.10x LoRA", wall))
            memory = _ratio_target(row, "memory_above_frozen_bytes_vs_lora", 1.1, "memory")
            checks.append(("memory ≤ 1.1x LoRA", memory))
            above, full_above = row.get("memory_above_frozen_bytes"), full.get("memory_above_frozen_bytes")
            if above and full_above:
                share = above / full_above
                checks.append(("memory ≤ 1/3 full FT", _verdict(share <= 1 / 3, f"{share:.2f} of full FT")))
            expected = expected_adapter_bytes(row)
            if expected and row.get("adapter_bytes"):
                excess = row["adapter_bytes"] / expected - 1
                checks.append(("adapter ≤ k·(v+i) + 5%", _verdict(abs(excess) <= 0.05, f"{excess:+.1%}")))
        if method in STRUCTURED:
            checks.append(("step ≤ LoRA", _ratio_target(row, "median_step_seconds_vs_lora", 1.0, "step")))
        step_limit = {"spp": 1.15, "lors": 1.15, "snell": 1.5}.get(method)
        if step_limit is not None:
            name = f"step ≤ {step_limit}x LoRA"
            checks.append((name, _ratio_target(row, "median_step_seconds_vs_lora", step_limit, "step")))
        if method not in ("lora", "full") and row.get("adapter_load_seconds") is not None:
            checks.append(("load ≤ 2x LoRA", _ratio_target(row, "adapter_load_seconds_vs_lora", 2.0, "load")))
        after = (row.get("after") or {}).get("exact_match")
        if method in PRUNED and method not in BASELINES:
            pruned = ((rows.get("lora_pruned") or {}).get("after") or {}).get("exact_match")
            ok = None if after is None or pruned is None else after >= 0.9 * pruned
            text = f"{_fmt(after, 'pct')} vs lora_pruned {_fmt(pruned, 'pct')}"
            checks.append(("quality ≥ 90% of lora_pruned", _verdict(ok, text)))
            kept = (row.get("sparsity") or {}).get("zeros_kept_after_merge")
            checks.append(("every base zero kept after merge", _verdict(kept, f"zeros kept: {kept}")))
        elif method not in BASELINES:
            ok = None if after is None or lora_quality is None else after >= 0.9 * lora_quality
            text = f"{_fmt(after, 'pct')} vs LoRA {_fmt(lora_quality, 'pct')}"
            checks.append(("quality ≥ 90% of LoRA", _verdict(ok, text)))
        if method in QUALITY_CLAIM:
            after = (row.get("after") or {}).get("exact_match")
            ok = None if after is None or lora_quality is None else after >= lora_quality
            checks.append(("quality ≥ LoRA", _verdict(ok, f"{_fmt(after, 'pct')} vs LoRA {_fmt(lora_quality, 'pct')}")))
        lines += [f"| {label} | {name} | {verdict} |" for name, verdict in checks]
    return "\n".join(lines)


def plots(rows: dict[str, dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for method, r in rows.items():
        if r.get("after") and r.get("trainable_parameters"):
            axis.scatter(r["trainable_parameters"], r["after"]["exact_match"], s=40)
            axis.annotate(method, (r["trainable_parameters"], r["after"]["exact_match"]), fontsize=8)
    axis.set_xscale("log")
    axis.set_xlabel("trainable parameters")
    axis.set_ylabel("exact match after training")
    axis.set_title("quality vs trainable parameters (SmolLM2-135M, arithmetic task)")
    figure.tight_layout()
    written.append(out / "accuracy_vs_params.png")
    figure.savefig(written[-1], dpi=110)
    plt.close(figure)

    keys = [("median_step_seconds_vs_lora", "step time / LoRA"), ("memory_above_frozen_bytes_vs_lora", "memory / LoRA")]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for axis, (key, label) in zip(axes, keys, strict=True):
        names = [m for m, r in rows.items() if r.get(key) is not None]
        axis.bar(names, [rows[m][key] for m in names])
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_ylabel(label)
        axis.tick_params(axis="x", rotation=45)
    figure.tight_layout()
    written.append(out / "ratios_vs_lora.png")
    figure.savefig(written[-1], dpi=110)
    plt.close(figure)
    return written


def machine() -> dict[str, Any]:
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "commit": commit.strip(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 steps, 10 eval problems, no reload check")
    parser.add_argument("--methods", default=None, help="comma-separated subset (default: LoRA, full FT and all)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--n-eval", type=int, default=None)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for results, logs and runs")
    parser.add_argument("--reuse", action="store_true", help="keep summaries already in OUT/runs (resume a run)")
    parser.add_argument(
        "--equal-budget", action="store_true", help="add <method>@lora_budget rows (LoRA's trainable count)"
    )
    args = parser.parse_args(argv)
    args.steps = args.steps or (3 if args.quick else 100)
    args.n_eval = args.n_eval if args.n_eval is not None else (10 if args.quick else 100)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",") if args.methods else all_methods(args.equal_budget)
    started = {**machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    start = time.perf_counter()
    rows: dict[str, dict[str, Any]] = {}
    for method in methods:
        summary = run_method(method, args, out)
        if summary is not None:
            rows[method] = summary
    ratios(rows)
    started["wall_seconds"] = round(time.perf_counter() - start, 1)
    report = {"settings": vars(args), "machine": started, "results": rows}
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "table.md").write_text(table(rows) + "\n\n" + targets(rows) + "\n")
    written = plots(rows, out)
    print(table(rows))
    print(targets(rows))
    print("plots:", ", ".join(str(p) for p in written))
    missing = sorted(set(methods) - set(rows))
    if missing:
        print(f"FAILED: {', '.join(missing)} (see {out / 'logs'})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
