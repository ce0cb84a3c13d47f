"""Sweep a method's learning rate and config fields on the main job, and write the table.

Run by hand (never in CI)::

    python benchmarks/sweep.py snell --lr 5e-4,1e-3,2e-3 --grid sparsity=0.9,0.5 --out benchmarks/results/sweeps/snell
    python benchmarks/sweep.py lors --lr 5e-4,1e-3 --set gradient_init=true --prune 2:4 --out ... --reuse

Every point of the grid (learning rates x the product of the ``--grid`` fields, plus the fixed ``--set`` fields on
top of the method's main-job defaults) trains in its own process through ``sparse-peft train`` (SmolLM2-135M, the
built-in task, 100 steps, batch 8 unless changed; no reload check), so each row is a main-job run. ``--reuse`` keeps
the points whose summary is already in OUT (a sweep spread over several sessions). The table (``OUT/sweep.md``,
rewritten after every point over every finished point in OUT, earlier invocations' included) gives exact match
before/after, the first and last logged loss, the largest logged
gradient norm and the median step time; ``OUT/sweep.json`` holds the full summaries with their loss curves.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sparse_peft.sparse.io import atomic_write, install_dir


def grid_points(grid: list[str]) -> list[dict[str, Any]]:
    """``["a=1,2", "b=x"]`` -> ``[{"a": 1, "b": "x"}, {"a": 2, "b": "x"}]`` (values parsed as JSON when possible)."""
    axes: list[list[tuple[str, Any]]] = []
    for item in grid:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--grid expects KEY=V1,V2,..., got {item!r}")
        axes.append([(key, _value(v)) for v in raw.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)] if axes else [{}]


def _value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def point_name(lr: float | None, fields: dict[str, Any], seed: int = 0, sparse_lr: float | None = None) -> str:
    parts = [f"lr={lr:g}"] if lr is not None else []
    parts += [f"sparse_lr={sparse_lr:g}"] if sparse_lr is not None else []
    parts += [f"seed={seed}"] if seed else []
    parts += [f"{k}={json.dumps(v)}" for k, v in sorted(fields.items())]
    return ",".join(parts).replace('"', "").replace(" ", "") or "defaults"


def run_point(
    method: str, lr: float | None, fields: dict[str, Any], args: argparse.Namespace, out: Path
) -> dict[str, Any] | None:
    """Train one point in a fresh process; its summary (None if it failed: the log says why)."""
    name = point_name(lr, {**_fixed(args.set), **fields}, args.seed, args.sparse_lr)
    done = out / "runs" / name / "summary.json"
    if args.reuse and name in completed(out):
        return completed(out)[name]
    run_dir = out / "runs" / f"{name}-{int(time.time())}"
    command = [
        sys.executable, "-m", "sparse_peft.cli", "train", "--method", method, "--steps", str(args.steps),
        "--n-eval", str(args.n_eval), "--batch-size", str(args.batch_size), "--no-reload-check",
        "--output", str(run_dir),
    ]  # fmt: skip
    if lr is not None:
        command += ["--lr", f"{lr:g}"]
    if args.seed:
        command += ["--seed", str(args.seed)]
    if args.prune:
        command += ["--prune", args.prune]
    if args.sparse_lr is not None:
        command += ["--sparse-lr", f"{args.sparse_lr:g}"]
    for key, value in {**_fixed(args.set), **fields}.items():
        command += ["--set", f"{key}={json.dumps(value)}"]
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=os.environ.copy()).returncode
    print(f"{method} {name}: exit {code} in {time.perf_counter() - start:.0f} s (log: {log})", flush=True)
    if code != 0 or not (run_dir / "summary.json").is_file():
        return None
    install_dir(str(run_dir), str(done.parent))
    return json.loads(done.read_text())


def _fixed(pairs: list[str]) -> dict[str, Any]:
    result = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}")
        result[key] = _value(raw)
    return result


def table(method: str, rows: dict[str, dict[str, Any]]) -> str:
    lines = [
        f"| {method} point | trainable | exact match before → after | first → last loss | max grad norm | step s |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        before, after = (r.get("before") or {}).get("exact_match"), (r.get("after") or {}).get("exact_match")
        losses = [loss for _, loss in r.get("loss_curve") or []]
        norms = [norm for _, norm in r.get("grad_norm_curve") or []]
        loss = f"{losses[0]:.3f} → {losses[-1]:.3f}" if losses else "-"
        lines.append(
            f"| {name} | {r.get('trainable_parameters', 0):,} | {_pct(before)} → {_pct(after)} | {loss} "
            f"| {max(norms):.3g} | {r.get('median_step_seconds', float('nan')):.2f} |"
            if norms
            else f"| {name} | {r.get('trainable_parameters', 0):,} | {_pct(before)} → {_pct(after)} | {loss} | - "
            f"| {r.get('median_step_seconds', float('nan')):.2f} |"
        )
    return "\n".join(lines)


def completed(out: Path) -> dict[str, dict[str, Any]]:
    """Every finished point, by name: those recorded in ``OUT/sweep.json`` (earlier sessions', whose ``runs/`` are
    not committed) and those in ``OUT/runs`` (a run folder's summary wins over the recorded one)."""
    recorded = out / "sweep.json"
    rows: dict[str, dict[str, Any]] = json.loads(recorded.read_text()) if recorded.is_file() else {}
    for summary in sorted((out / "runs").glob("*/summary.json")):
        name = summary.parent.name
        if "-previous-" not in name:
            rows[name] = json.loads(summary.read_text())
    return rows


def write_tables(method: str, out: Path) -> None:
    """``OUT/sweep.md`` and ``OUT/sweep.json`` over all finished points (atomic writes)."""
    rows = completed(out)
    atomic_write(str(out / "sweep.md"), lambda tmp: Path(tmp).write_text(table(method, rows) + "\n"))
    atomic_write(str(out / "sweep.json"), lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=1)))


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method")
    parser.add_argument("--lr", default=None, help="comma-separated learning rates (default: the main-job one)")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="a swept config field")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a fixed config field")
    parser.add_argument("--prune", default=None, help="prune the base first, e.g. 2:4 (SPP, LoRS, lora on 2:4)")
    parser.add_argument("--sparse-lr", type=float, default=None, help="RoSA: the sparse values' learning rate")
    parser.add_argument("--seed", type=int, default=0, help="training seed (a point's name carries it when not 0)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--n-eval", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", required=True, help="folder for the table, summaries and logs")
    parser.add_argument("--reuse", action="store_true", help="keep points already in OUT (runs/ or sweep.json)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    rates = [float(v) for v in args.lr.split(",")] if args.lr else [None]
    rows: dict[str, dict[str, Any]] = {}
    failed = []
    for lr, fields in itertools.product(rates, grid_points(args.grid)):
        summary = run_point(args.method, lr, fields, args, out)
        name = point_name(lr, {**_fixed(args.set), **fields}, args.seed, args.sparse_lr)
        if summary is None:
            failed.append(name)
            continue
        rows[name] = summary
        write_tables(args.method, out)
    print(table(args.method, completed(out)))
    if failed:
        print(f"FAILED: {', '.join(failed)} (see {out / 'logs'})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
