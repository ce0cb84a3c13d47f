"""Benchmark every sparse_peft method against PEFT's LoRA and full fine-tuning on the default real model.

Run by hand (never in CI)::

    python benchmarks/run.py            # full run: 100 steps per method, 100 eval problems, seeds 0 and 1
    python benchmarks/run.py --quick    # smoke run, under 10 minutes: 3 steps, 10 eval problems, seed 0

Each method trains in its own process through ``sparse-peft train`` (same model, task, steps, batch, sequence length,
task problems and thread count for all), which writes ``summary.json`` with quality (exact match before/after),
median step time, peak resident memory and the part above the loaded frozen model, optimizer-state bytes, trainable
parameters, adapter bytes and the training loss curve. LoRA, LIFT, SpIEL and RoSA (``--seed-methods``) also train
with the other training seeds of ``--seeds`` (rows ``<method>#seed<s>``, on the same problems); the table and the
quality targets give their seed mean, the per-seed values and whether the gap to LoRA is within the binomial noise of
the eval set. ``--memory-batch-sizes`` adds a short run per row and extra batch size (``<row>@mem<B>``) and a table of
the memory above the loaded model per batch size: what grows with the batch (activations) and what does not
(trainable state). This script collects the summaries into ``RESULTS/results.json``, a Markdown table with ratios to
LoRA (its seed-0 row) measured in the same run, and PNG plots (quality vs trainable parameters, ratios to LoRA, every
row's loss curve). ``--interleaved`` names tables of ``benchmarks/steps.py`` (methods timed step by step in turn in
one process): the table shows their step and training-time ratios next to the rows' own, and the targets use them,
since rows trained one after another on this machine differ by its drift (tens of percent over minutes) as much as
by their method. Learning rates: each method's main-job default (``sparse_peft/defaults.py``); no per-method sweep is
run (``benchmarks/sweep.py`` runs those). SPP and LoRS fine-tune a 2:4-pruned copy of the model (``--prune 2:4``), and
so does the ``lora_pruned`` row (PEFT's LoRA on the same pruned base), which is their quality reference.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparse_peft.sparse.io import atomic_write, install_dir

HERE = Path(__file__).resolve().parent
BASELINES = ("lora", "full", "shira", "supertuning", "lora_pruned")
PRUNED = {"spp": "2:4", "lors": "2:4", "lora_pruned": "2:4"}
ENTRY_SPARSE = ("lift", "spiel", "rosa", "diff_pruning")
STRUCTURED = ("smt", "s2ft")
QUALITY_CLAIM = ("lift", "rosa", "spiel")
WALL_TIME_CLAIM = ("lift", "spiel", "rosa")  # training time including mask refreshes and selections
SEED_METHODS = ("lora", "lift", "spiel", "rosa")  # rows trained with every seed of --seeds
EQUAL_SUFFIX = "@lora_budget"
SEED_MARK = "#seed"
MEMORY_MARK = "@mem"
AT_BATCH = "memory_above_frozen_bytes_at_batch"
# the columns of benchmarks/steps.py's tables (it writes its headers with these): ratios to LoRA of methods timed
# step by step in turn, the median step ("step") and, with --wall, the total of every step ("wall")
STEP_COLUMN, WALL_COLUMN, RATIO_COLUMN = "step s (median)", "total of the timed steps s", "x LoRA"
INTERLEAVED = {STEP_COLUMN: "step", WALL_COLUMN: "wall"}
INTERLEAVED_KIND = {"median_step_seconds_vs_lora": "step", "train_seconds_vs_lora": "wall"}  # the row's own ratio

Rows = dict[str, dict[str, Any]]


def all_methods(equal_budget: bool = False) -> list[str]:
    """The baselines and every method; with ``equal_budget`` also ``<method>@lora_budget`` rows next to the methods
    whose main-job budget differs from LoRA's."""
    import sparse_peft
    from sparse_peft.defaults import EQUAL_BUDGET

    methods = [*BASELINES]
    for method in sorted(sparse_peft.METHODS):
        methods += [method, f"{method}{EQUAL_SUFFIX}"] if equal_budget and method in EQUAL_BUDGET else [method]
    return methods


# ---- rows: <method>[@lora_budget][#seed<s>][@mem<B>] ---------------------------------------------------------------
@dataclass(frozen=True)
class RowName:
    """What a row label means: ``<method>[@lora_budget][#seed<s>][@mem<B>]``."""

    method: str
    lora_budget: bool = False
    seed: int = 0
    memory_batch: int | None = None

    @property
    def seed0(self) -> str:
        """The label of the table row this one belongs to (seed 0, the main batch size)."""
        return self.method + (EQUAL_SUFFIX if self.lora_budget else "")


def _split_suffix(label: str, mark: str) -> tuple[str, int | None]:
    head, sep, tail = label.rpartition(mark)
    return (head, int(tail)) if sep and tail.isdigit() else (label, None)


def parse_row(label: str) -> RowName:
    """The method, budget, training seed and memory batch size that a row label names."""
    rest, batch = _split_suffix(label, MEMORY_MARK)
    rest, seed = _split_suffix(rest, SEED_MARK)
    method, sep, budget = rest.partition("@")
    if sep and sep + budget != EQUAL_SUFFIX:
        raise ValueError(f"row {label!r}: expected <method>[{EQUAL_SUFFIX}][{SEED_MARK}<s>][{MEMORY_MARK}<B>]")
    return RowName(method, bool(sep), seed or 0, batch)


def seed_rows(labels: Sequence[str], seeds: Sequence[int], seed_methods: Sequence[str]) -> list[str]:
    """``labels``, each one of ``seed_methods`` followed by a ``<label>#seed<s>`` row per seed s other than 0."""
    rows: list[str] = []
    for label in labels:
        rows += [label] + [f"{label}{SEED_MARK}{s}" for s in seeds if s and label in seed_methods]
    return rows


def memory_rows(labels: Sequence[str], batch_sizes: Sequence[int], main_batch: int) -> list[str]:
    """A short ``<label>@mem<B>`` run per seed-0 row and per batch size B other than the main runs' one."""
    seed0 = [label for label in labels if parse_row(label).seed == 0]
    return [f"{label}{MEMORY_MARK}{b}" for label in seed0 for b in batch_sizes if b != main_batch]


def main_labels(rows: Rows) -> list[str]:
    """The rows of the tables: every row but the extra training seeds (folded into their seed-0 row)."""
    return [label for label in rows if parse_row(label).seed == 0]


# ---- runs ----------------------------------------------------------------------------------------------------------
def train_command(label: str, args: argparse.Namespace, output: Path) -> list[str]:
    """The ``sparse-peft train`` command of one row: ``<method>@lora_budget`` trains the method's config at LoRA's
    trainable count (``EQUAL_BUDGET`` in ``sparse_peft/defaults.py``), ``#seed<s>`` with training seed s (the task's
    problems stay those of task seed 0), ``@mem<B>`` ``--memory-steps`` steps at batch B without evaluation or
    reload check."""
    from sparse_peft.defaults import EQUAL_BUDGET

    row = parse_row(label)
    memory = row.memory_batch is not None
    steps, n_eval = (args.memory_steps, 0) if memory else (args.steps, args.n_eval)
    batch = row.memory_batch or args.batch_size
    command = [
        sys.executable, "-m", "sparse_peft.cli", "train", "--method", row.method, "--steps", str(steps),
        "--n-eval", str(n_eval), "--n-train", str(args.n_train), "--batch-size", str(batch),
        "--seed", str(row.seed), "--threads", str(args.threads), "--output", str(output),
    ]  # fmt: skip
    if row.method in PRUNED:
        command += ["--prune", PRUNED[row.method]]
    for key, value in EQUAL_BUDGET[row.method].items() if row.lora_budget else ():
        command += ["--set", f"{key}={json.dumps(value)}"]
    if args.quick or memory:
        command += ["--no-reload-check"]
    return command


def run_method(label: str, args: argparse.Namespace, out: Path) -> dict[str, Any] | None:
    """Train one row (:func:`train_command`) in a fresh process and return its summary (None if it failed; the log
    says why). The run is kept under ``OUT/runs/<label>`` (an older folder there is kept as ``-previous-``) and its
    summary recorded in ``OUT/summaries.json``; ``--reuse`` reads either instead of training again (the recorded one
    lets a run that spans sessions resume from a fresh checkout, where ``runs/`` is not committed)."""
    run_dir = out / "runs" / label
    if args.reuse:
        if (run_dir / "summary.json").is_file():
            return json.loads((run_dir / "summary.json").read_text())
        if label in recorded_summaries(out):
            return recorded_summaries(out)[label]
    output = run_dir.with_name(f"{label}-{int(time.time())}")
    command = train_command(label, args, output)
    commit = library_commit()  # the tree this row's process imports (a run spanning sessions may see several)
    log = out / "logs" / f"{label}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=os.environ.copy()).returncode
    print(f"{label:<14} exit {code} in {time.perf_counter() - start:.0f} s (log: {log})", flush=True)
    if code != 0 or not (output / "summary.json").is_file():
        return None
    summary = {**json.loads((output / "summary.json").read_text()), "library_commit": commit}
    atomic_write(str(output / "summary.json"), lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    install_dir(str(output), str(run_dir))
    record_summary(out, label, summary)
    return summary


def recorded_summaries(out: Path) -> Rows:
    """The summaries recorded in ``OUT/summaries.json``, by row label (empty when there is none)."""
    path = out / "summaries.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def record_summary(out: Path, label: str, summary: dict[str, Any]) -> None:
    """Add (or replace) one row's summary in ``OUT/summaries.json`` (atomic write)."""
    rows = {**recorded_summaries(out), label: summary}
    atomic_write(str(out / "summaries.json"), lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=1)))


def collect(labels: Sequence[str], args: argparse.Namespace, out: Path) -> Rows:
    """The summaries of the rows that ran (or were reused), by label."""
    rows = {}
    for label in labels:
        summary = run_method(label, args, out)
        if summary is not None:
            rows[label] = summary
    return rows


def attach_memory(rows: Rows, memory: Rows, main_batch: int) -> None:
    """Give each row ``memory_above_frozen_bytes_at_batch``: ``{main batch: its own run's, B: its @mem<B> run's}``."""
    for label, summary in memory.items():
        row = rows.get(label.rpartition(MEMORY_MARK)[0])
        if row is None:
            continue
        at = row.get(AT_BATCH) or {main_batch: row.get("memory_above_frozen_bytes")}
        at[parse_row(label).memory_batch] = summary.get("memory_above_frozen_bytes")
        row[AT_BATCH] = dict(sorted(at.items()))


def ratios(rows: Rows) -> None:
    """Add ``*_vs_lora`` ratios (same run, LoRA's seed-0 row) to each row."""
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


def read_interleaved(path: Path) -> dict[str, dict[str, float]]:
    """The ratios to LoRA in a table written by ``benchmarks/steps.py --write``: ``{method: {"step": x, "wall":
    y}}``, "step" from its table of median steps, "wall" from its ``--wall`` table of totals."""
    found: dict[str, dict[str, float]] = {}
    kind, column = None, None
    for line in path.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if cells and cells[0] == "method":
            kind = next((INTERLEAVED[c] for c in cells if c in INTERLEAVED), None)
            column = cells.index(RATIO_COLUMN) if RATIO_COLUMN in cells else None
        elif not cells:
            kind, column = None, None
        elif kind and column is not None and not set(cells[0]) <= set("-") and cells[column].endswith("x"):
            found.setdefault(cells[0], {})[kind] = float(cells[column][:-1])
    if not found:
        header = f"'| method | ... | {RATIO_COLUMN} |'"
        raise ValueError(f"{path}: no table of benchmarks/steps.py (a {header} header) found")
    return found


def attach_interleaved(rows: Rows, paths: Sequence[Path]) -> None:
    """Give each default-config seed-0 row the step / wall-time ratios measured interleaved by ``steps.py`` (later
    files win), as ``interleaved = {"step": {"ratio", "source"}, ...}``: the targets take these ratios, since
    ``run.py``'s rows train one after another while this machine's speed drifts by tens of percent."""
    for path in paths:
        for method, measured in read_interleaved(path).items():
            row = rows.get(method)
            if row is None:
                continue
            for kind, ratio in measured.items():
                row.setdefault("interleaved", {})[kind] = {"ratio": ratio, "source": path.name}


# ---- quality over seeds ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Quality:
    """Exact match after training of one row over its training seeds (seed 0 first)."""

    values: tuple[float, ...]
    n: int  # eval problems over all seeds

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    def __str__(self) -> str:
        if len(self.values) == 1:
            return _fmt(self.values[0], "pct")
        return f"{self.mean:.1%} (seeds: {', '.join(_fmt(v, 'pct') for v in self.values)})"


def seed_runs(rows: Rows, label: str) -> list[dict[str, Any]]:
    """The row ``label`` and its ``<label>#seed<s>`` rows, by seed."""
    names = [name for name in rows if name == label or name.startswith(label + SEED_MARK)]
    return [rows[name] for name in sorted(names, key=lambda name: parse_row(name).seed)]


def quality(rows: Rows, label: str) -> Quality | None:
    """Exact match after training of ``label`` over its seeds (None when no run of it was evaluated)."""
    after = [run["after"] for run in seed_runs(rows, label) if run.get("after")]
    if not after:
        return None
    return Quality(tuple(a["exact_match"] for a in after), sum(a.get("n") or 0 for a in after))


def noise(mine: Quality, reference: Quality, factor: float = 1.0) -> str:
    """How far ``mine`` is from ``factor`` × ``reference``, against the binomial standard error of that difference
    (seed means; ``n`` = eval problems × seeds on each side): within noise when under 2 SE."""
    if not mine.n or not reference.n:
        return "noise unknown (no eval count)"
    p1, p2 = mine.mean, reference.mean
    se = math.sqrt(p1 * (1 - p1) / mine.n + factor**2 * p2 * (1 - p2) / reference.n)
    diff = p1 - factor * p2
    within = diff == 0 or abs(diff) < 2 * se
    return f"{diff * 100:+.1f} points (2 SE {2 * se * 100:.1f}): {'within' if within else 'beyond'} noise"


# ---- tables ---------------------------------------------------------------------------------------------------------
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


def _exact_match(rows: Rows, label: str) -> str:
    before = (rows[label].get("before") or {}).get("exact_match")
    return f"{_fmt(before, 'pct')} → {quality(rows, label) or '-'}"


def _interleaved(row: dict[str, Any], kind: str) -> float | None:
    return ((row.get("interleaved") or {}).get(kind) or {}).get("ratio")


def table(rows: Rows) -> str:
    """One line per row; a row's extra seeds are folded into its exact-match cell (seed mean and per-seed values).
    The "interleaved" columns are the ratios of ``--interleaved`` (``steps.py``: methods timed step by step in turn),
    those of record; the rows' own ratios compare runs made minutes or hours apart."""
    header = (
        "| method | trainable | exact match before → after | step s | step vs LoRA | interleaved | train s "
        "| train vs LoRA | interleaved "
        "| peak RSS MiB | above frozen MiB "
        "| memory vs LoRA | optimizer state MiB | adapter MiB | stored MiB | load s | load vs LoRA |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for method in main_labels(rows):
        r = rows[method]
        lines.append(
            f"| {method} | {_fmt(r.get('trainable_parameters'))} | {_exact_match(rows, method)} "
            f"| {_fmt(r.get('median_step_seconds'), 's')} | {_fmt(r.get('median_step_seconds_vs_lora'), 'x')} "
            f"| {_fmt(_interleaved(r, 'step'), 'x')} "
            f"| {_fmt(r.get('train_seconds'), 's')} | {_fmt(r.get('train_seconds_vs_lora'), 'x')} "
            f"| {_fmt(_interleaved(r, 'wall'), 'x')} "
            f"| {_fmt(r.get('peak_rss_bytes'), 'mb')} | {_fmt(r.get('memory_above_frozen_bytes'), 'mb')} "
            f"| {_fmt(r.get('memory_above_frozen_bytes_vs_lora'), 'x')} | {_fmt(r.get('optimizer_state_bytes'), 'mb')} "
            f"| {_fmt(r.get('adapter_bytes'), 'mb')} | {_fmt(expected_adapter_bytes(r), 'mb')} "
            f"| {_fmt(r.get('adapter_load_seconds'), 's')} | {_fmt(r.get('adapter_load_seconds_vs_lora'), 'x')} |"
        )
    return "\n".join(lines)


def at_batch(row: dict[str, Any]) -> dict[int, int | None]:
    """``memory_above_frozen_bytes_at_batch`` with integer batch sizes (``results.json`` holds them as strings)."""
    return {int(b): v for b, v in (row.get(AT_BATCH) or {}).items()}


def _ratio(value: float | None, reference: float | None) -> float | None:
    return None if value is None or reference is None or reference <= 0 else value / reference


def _growth(at: dict[int, int | None], first: int, last: int) -> int | None:
    low, high = at.get(first), at.get(last)
    return None if low is None or high is None else high - low


def _memory_line(label: str, row: dict[str, Any], lora: dict[int, int | None], batches: list[int]) -> str:
    mine, first, last = at_batch(row), batches[0], batches[-1]
    cells = [f"{_fmt(mine.get(b), 'mb')} | {_fmt(_ratio(mine.get(b), lora.get(b)), 'x')}" for b in batches]
    growth = _growth(mine, first, last)
    cells += [_fmt(growth, "mb"), _fmt(_ratio(growth, _growth(lora, first, last)), "x")]
    cells += [_fmt(row.get("optimizer_state_bytes"), "mb"), _fmt(row.get("adapter_bytes"), "mb")]
    return f"| {label} | " + " | ".join(cells) + " |"


def memory_table(rows: Rows) -> str:
    """Memory above the loaded model per batch size (``--memory-batch-sizes``), its growth with the batch
    (activations) and the optimizer state and adapter sizes, with ratios to LoRA; empty when one batch size was
    measured. No "batch 0" intercept: a larger batch also pads to longer sequences, so the growth is not linear in
    the batch size (a smoke run put LoRA's linear intercept at -538 MiB)."""
    labels = [label for label in main_labels(rows) if at_batch(rows[label])]
    batches = sorted({b for label in labels for b in at_batch(rows[label])})
    if len(batches) < 2:
        return ""
    first, last = batches[0], batches[-1]
    columns = [f"above loaded model at batch {b} MiB | batch {b} vs LoRA" for b in batches]
    columns += [f"growth {first}→{last} MiB", "growth vs LoRA"]
    columns += ["optimizer state MiB", "adapter MiB"]
    header = "| method | " + " | ".join(columns) + " |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    lora = at_batch(rows.get("lora") or {})
    lines += [_memory_line(label, rows[label], lora, batches) for label in labels]
    caption = "Memory above the loaded model by batch size (the main batch from the main runs, the others from the "
    caption += "short `@mem<B>` runs): the growth is activations; the optimizer state and the adapter do not grow."
    return caption + "\n\n" + "\n".join(lines)


# ---- targets --------------------------------------------------------------------------------------------------------
def expected_adapter_bytes(row: dict[str, Any]) -> int | None:
    """What an adapter file should hold: the ``stored_bytes`` of its layers' storage reports (every tensor they save,
    RoSA's LoRA factors included); summaries written before 2026-12-02 have ``k·(value bytes + index bytes)`` of the
    entry-sparse methods instead, plus RoSA's float32 LoRA factors (``trainable − k``). None when nothing is
    accounted."""
    if row.get("stored_bytes"):
        return int(row["stored_bytes"])
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
    """``row[key] ≤ limit``; for a step or wall-time ratio, the one measured interleaved when the row has it (its own
    row's ratio then follows in brackets)."""
    interleaved = (row.get("interleaved") or {}).get(INTERLEAVED_KIND.get(key))
    value = row.get(key)
    if interleaved is not None:
        own = f"; this row's own {value:.2f}x" if value is not None else ""
        text = f"{label} {interleaved['ratio']:.2f}x interleaved ({interleaved['source']}{own}; target ≤ {limit:g}x)"
        return _verdict(interleaved["ratio"] <= limit, text)
    if value is None:
        return _verdict(None, f"{label} not measured")
    return _verdict(value <= limit, f"{label} {value:.2f}x (target ≤ {limit:g}x)")


def _quality_check(rows: Rows, label: str, reference: str, factor: float) -> tuple[str, str]:
    """``quality ≥ [factor of] reference`` on the seed means, and whether the gap is within the eval set's noise."""
    name = "LoRA" if reference == "lora" else reference
    target = name if factor == 1 else f"{factor:.0%} of {name}"
    mine, ref = quality(rows, label), quality(rows, reference)
    if mine is None or ref is None:
        return f"quality ≥ {target}", _verdict(None, f"{mine or '-'} vs {name} {ref or '-'}")
    text = f"{mine} vs {name} {ref}; gap to {target} {noise(mine, ref, factor)}"
    return f"quality ≥ {target}", _verdict(mine.mean >= factor * ref.mean, text)


def _cost_checks(rows: Rows, label: str) -> list[tuple[str, str]]:
    """Step time, wall time, memory, adapter size and load time against LoRA's seed-0 row and full FT."""
    row, method = rows[label], parse_row(label).method
    full = rows.get("full") or {}
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
            checks.append(("adapter ≤ stored bytes + 5%", _verdict(abs(excess) <= 0.05, f"{excess:+.1%}")))
    if method in STRUCTURED:
        checks.append(("step ≤ LoRA", _ratio_target(row, "median_step_seconds_vs_lora", 1.0, "step")))
    step_limit = {"spp": 1.15, "lors": 1.15, "snell": 1.5}.get(method)
    if step_limit is not None:
        name = f"step ≤ {step_limit}x LoRA"
        checks.append((name, _ratio_target(row, "median_step_seconds_vs_lora", step_limit, "step")))
    if method not in ("lora", "full") and row.get("adapter_load_seconds") is not None:
        checks.append(("load ≤ 2x LoRA", _ratio_target(row, "adapter_load_seconds_vs_lora", 2.0, "load")))
    return checks


def _quality_checks(rows: Rows, label: str) -> list[tuple[str, str]]:
    """Quality against LoRA (lora_pruned for the methods on a pruned base), on the seed means."""
    method = parse_row(label).method
    checks: list[tuple[str, str]] = []
    if method in PRUNED and method not in BASELINES:
        checks.append(_quality_check(rows, label, "lora_pruned", 0.9))
        kept = (rows[label].get("sparsity") or {}).get("zeros_kept_after_merge")
        checks.append(("every base zero kept after merge", _verdict(kept, f"zeros kept: {kept}")))
    elif method not in BASELINES:
        checks.append(_quality_check(rows, label, "lora", 0.9))
    if method in QUALITY_CLAIM:
        checks.append(_quality_check(rows, label, "lora", 1.0))
    return checks


def targets(rows: Rows) -> str:
    """Where each method stands against the issue's targets: costs as ratios to LoRA's seed-0 row from the same run,
    quality on the seed means with whether the gap is within noise (``<method>@lora_budget`` rows are checked as their
    method)."""
    lines = ["| method | target | where it stands |", "|---|---|---|"]
    for label in main_labels(rows):
        checks = _cost_checks(rows, label) + _quality_checks(rows, label)
        lines += [f"| {label} | {name} | {verdict} |" for name, verdict in checks]
    return "\n".join(lines)


def report(rows: Rows) -> str:
    """``table.md``: the table, the memory table (with ``--memory-batch-sizes``) and the targets."""
    return "\n\n".join(part for part in (table(rows), memory_table(rows), targets(rows)) if part) + "\n"


# ---- plots ----------------------------------------------------------------------------------------------------------
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def label_heights(points: Sequence[tuple[str, float, float]], gap: float) -> dict[str, float]:
    """Heights for the labels of ``(label, x, y)`` points so that labels of points at about the same x (within a
    factor 1.4) stand at least ``gap`` apart: in each such group, from the lowest point up, each label at its point's
    y or just above the label below it."""
    heights: dict[str, float] = {}
    placed: list[tuple[float, float]] = []  # (x, label height) of the labels placed so far
    for label, x, y in sorted(points, key=lambda point: point[2]):
        below = [h for px, h in placed if max(px, x) / min(px, x) < 1.4 and h > y - gap]
        heights[label] = max([y, *(h + gap for h in below)])
        placed.append((x, heights[label]))
    return heights


def accuracy_plot(rows: Rows, path: Path) -> Path:
    """Seed-mean exact match against trainable parameters (per-seed values as small hollow marks); the peers
    (PEFT's LoRA, ShiRA and Super-Tuning, full FT, LoRA on the pruned base) as grey squares, sparse_peft's methods
    as blue dots."""
    from matplotlib.lines import Line2D

    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 6))
    points = []
    for label in main_labels(rows):
        score, x = quality(rows, label), rows[label].get("trainable_parameters")
        if score is None or not x:
            continue
        marker, color = ("s", "tab:gray") if parse_row(label).method in BASELINES else ("o", "tab:blue")
        axis.scatter(x, score.mean, s=40, marker=marker, color=color)
        if len(score.values) > 1:
            seeds = [x] * len(score.values)
            axis.scatter(seeds, score.values, s=14, marker=marker, facecolors="none", edgecolors=color)
        points.append((label, x, score.mean))
    heights = label_heights(points, gap=0.022 * max((y for _, _, y in points), default=1.0))
    for label, x, y in points:  # labels right of their point, spread apart, with a thin line back to it
        line = {"arrowstyle": "-", "color": "0.6", "linewidth": 0.5}
        axis.annotate(label, (x, y), xytext=(x * 1.15, heights[label]), fontsize=8, va="center", arrowprops=line)
    handles = [
        Line2D([], [], marker="s", color="tab:gray", linestyle="", label="peers: PEFT LoRA, ShiRA, Super-Tuning, full"),
        Line2D([], [], marker="o", color="tab:blue", linestyle="", label="sparse_peft methods"),
    ]
    axis.legend(handles=handles, fontsize=8, loc="lower right")
    axis.set_xscale("log")
    axis.set_xlabel("trainable parameters")
    axis.set_ylabel("exact match after training (seed mean)")
    axis.set_title("quality vs trainable parameters (SmolLM2-135M, arithmetic task)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _step_ratio(row: dict[str, Any]) -> tuple[float | None, bool]:
    """The row's step ratio to LoRA: the interleaved one when ``--interleaved`` measured it (True), else its own."""
    interleaved = _interleaved(row, "step")
    return (interleaved, True) if interleaved is not None else (row.get("median_step_seconds_vs_lora"), False)


def ratios_plot(rows: Rows, path: Path) -> Path:
    """Step time and memory above the loaded model as ratios to LoRA, one bar per row (seed 0); the step bars of
    rows timed interleaved (``--interleaved``) are drawn dark, those of the rows' own runs light."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    step = {m: _step_ratio(rows[m]) for m in main_labels(rows)}
    memory = {m: (rows[m].get("memory_above_frozen_bytes_vs_lora"), True) for m in main_labels(rows)}
    for axis, values, label in ((axes[0], step, "step time / LoRA"), (axes[1], memory, "memory / LoRA")):
        names = [m for m, (value, _) in values.items() if value is not None]
        colours = ["tab:blue" if values[m][1] else "lightsteelblue" for m in names]
        axis.bar(names, [values[m][0] for m in names], color=colours)
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_ylabel(label)
        axis.tick_params(axis="x", rotation=45)
    if any(interleaved for _, interleaved in step.values()):
        axes[0].set_title("dark: interleaved (steps.py); light: the row's own run", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _hue(index: int) -> int:
    """tab20 index of the ``index``-th row: its ten dark colours first, then their light pairs."""
    return (2 * index) % 20 + (index // 10) % 2


def loss_plot(rows: Rows, path: Path) -> Path | None:
    """Every row's training loss (its summary's ``loss_curve``) on one chart; a row's extra seeds in its colour,
    dashed and lighter. None when no row recorded a curve."""
    curves = {label: row["loss_curve"] for label, row in rows.items() if row.get("loss_curve")}
    if not curves:
        return None
    plt = _pyplot()
    palette = plt.get_cmap("tab20")
    colors: dict[str, Any] = {}
    figure, axis = plt.subplots(figsize=(10, 5.5))
    for label, curve in curves.items():
        row = parse_row(label)
        color = colors.setdefault(row.seed0, palette(_hue(len(colors))))
        style = {"linestyle": "--", "alpha": 0.55} if row.seed else {"linestyle": "-", "alpha": 1.0}
        steps, losses = zip(*curve, strict=True)
        axis.plot(steps, losses, color=color, linewidth=1.2, label=label, **style)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss")
    axis.set_title("training loss (extra training seeds dashed)")
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plots(rows: Rows, out: Path) -> list[Path]:
    """``accuracy_vs_params.png``, ``ratios_vs_lora.png`` and ``loss_curves.png`` (when curves were recorded)."""
    written = [accuracy_plot(rows, out / "accuracy_vs_params.png"), ratios_plot(rows, out / "ratios_vs_lora.png")]
    loss = loss_plot(rows, out / "loss_curves.png")
    return [*written, loss] if loss else written


# ---- main -----------------------------------------------------------------------------------------------------------
def library_commit() -> str:
    """The short commit of the checkout this script (and the rows it starts) runs from."""
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
    return result.stdout.strip()


def machine() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "commit": library_commit(),
    }


def _int_list(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 steps, 10 eval problems, no reload check")
    parser.add_argument("--methods", default=None, help="comma-separated subset (default: LoRA, full FT and all)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--n-eval", type=int, default=None)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for results, logs and runs")
    parser.add_argument(
        "--reuse", action="store_true", help="keep rows already in OUT/runs or OUT/summaries.json (resume a run)"
    )
    parser.add_argument(
        "--equal-budget", action="store_true", help="add <method>@lora_budget rows (LoRA's trainable count)"
    )
    parser.add_argument(
        "--seeds",
        type=_int_list,
        default=None,
        help="training seeds, comma-separated, 0 included (default: 0,1; --quick: 0); each seed s > 0 adds a "
        "<method>#seed<s> row after each --seed-methods row (same task problems)",
    )
    parser.add_argument(
        "--seed-methods", default=",".join(SEED_METHODS), help="rows trained with every seed (default: %(default)s)"
    )
    parser.add_argument(
        "--memory-batch-sizes",
        type=_int_list,
        default=None,
        help="batch sizes at which to measure memory, comma-separated (default: --batch-size only); each other size "
        "B adds a short <row>@mem<B> run per row (no evaluation, no reload check)",
    )
    parser.add_argument("--memory-steps", type=int, default=5, help="steps of the @mem<B> runs (default: 5)")
    parser.add_argument(
        "--interleaved",
        default="",
        help="comma-separated tables of benchmarks/steps.py --write: the targets take their step (and, from a --wall "
        "table, training-time) ratios to LoRA instead of the rows' own, which train at different times",
    )
    args = parser.parse_args(argv)
    args.steps = args.steps or (3 if args.quick else 100)
    args.n_eval = args.n_eval if args.n_eval is not None else (10 if args.quick else 100)
    args.seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1])
    if 0 not in args.seeds:
        parser.error("--seeds must include 0 (the <method> rows train with seed 0)")
    args.seed_methods = [m for m in args.seed_methods.split(",") if m]
    args.memory_batch_sizes = args.memory_batch_sizes or [args.batch_size]
    args.interleaved = [Path(p) for p in args.interleaved.split(",") if p]
    for path in args.interleaved:
        if not path.is_file():
            parser.error(f"--interleaved: {path} is not a file (write one with benchmarks/steps.py --write)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",") if args.methods else all_methods(args.equal_budget)
    labels = seed_rows(methods, args.seeds, args.seed_methods)
    extra = memory_rows(labels, args.memory_batch_sizes, args.batch_size)
    for label in labels + extra:
        parse_row(label)  # a misspelt row fails here, before any training
    started = {**machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    start = time.perf_counter()
    rows = collect(labels, args, out)
    memory = collect(extra, args, out)
    attach_memory(rows, memory, args.batch_size)
    ratios(rows)
    attach_interleaved(rows, args.interleaved)
    started["wall_seconds"] = round(time.perf_counter() - start, 1)
    started["row_commits"] = {label: row.get("library_commit") for label, row in {**rows, **memory}.items()}
    results = {"settings": vars(args), "machine": started, "results": rows}
    text = json.dumps(results, indent=2, default=str)
    atomic_write(str(out / "results.json"), lambda tmp: Path(tmp).write_text(text))
    atomic_write(str(out / "table.md"), lambda tmp: Path(tmp).write_text(report(rows)))
    written = plots(rows, out)
    print(report(rows))
    print("plots:", ", ".join(str(p) for p in written))
    missing = sorted(set(labels + extra) - set(rows) - set(memory))
    if missing:
        print(f"FAILED: {', '.join(missing)} (see {out / 'logs'})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
