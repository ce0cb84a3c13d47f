"""benchmarks/run.py without training: row names, the commands it runs, and its tables and plots on synthetic
summaries (``subprocess.run`` is replaced by a fake that writes a summary)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO


def _load_run():
    spec = importlib.util.spec_from_file_location("benchmarks_run", REPO / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module while the class is built
    spec.loader.exec_module(module)
    return module


run = _load_run()

MiB = 2**20


def summary(method: str, after: float | None = 0.5, n: int = 100, memory: int = 1000 * MiB, **extra) -> dict:
    """A synthetic ``summary.json`` of ``sparse-peft train``."""
    return {
        "method": method,
        "batch_size": 8,
        "before": {"exact_match": 0.0, "number_match": 0.0, "n": n} if after is not None else None,
        "after": {"exact_match": after, "number_match": after, "n": n} if after is not None else None,
        "trainable_parameters": 4_884_480,
        "median_step_seconds": 3.0,
        "train_seconds": 300.0,
        "peak_rss_bytes": memory + 1300 * MiB,
        "memory_above_frozen_bytes": memory,
        "optimizer_state_bytes": 37 * MiB,
        "adapter_bytes": 19 * MiB,
        "adapter_load_seconds": 0.25,
        "loss_curve": [[10, 1.2], [20, 0.8], [30, 0.6]],
        **extra,
    }


def synthetic_rows() -> dict[str, dict]:
    rows = {
        "lora": summary("lora", 0.54, memory=1800 * MiB),
        "lora#seed1": summary("lora", 0.54, memory=1810 * MiB, median_step_seconds=9.0),
        "full": summary("full", 0.60, memory=6000 * MiB, adapter_bytes=None, trainable_parameters=134_515_008),
        "shira": summary("shira", 0.54),
        "lift": summary("lift", 0.54, memory=1800 * MiB, median_step_seconds=4.5),
        "lift#seed1": summary("lift", 0.50, memory=1800 * MiB),
        "spiel": summary("spiel", 0.37, memory=2200 * MiB),
        "spiel#seed1": summary("spiel", 0.35, memory=2200 * MiB),
        "smt@lora_budget": summary("smt", 0.53),
    }
    run.ratios(rows)
    return rows


# ---- row names -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "label, expected",
    [
        ("lora", run.RowName("lora")),
        ("lora#seed1", run.RowName("lora", seed=1)),
        ("lift@mem16", run.RowName("lift", memory_batch=16)),
        ("rosa@lora_budget", run.RowName("rosa", lora_budget=True)),
        ("rosa@lora_budget#seed2", run.RowName("rosa", lora_budget=True, seed=2)),
        ("rosa@lora_budget@mem16", run.RowName("rosa", lora_budget=True, memory_batch=16)),
        ("diff_pruning#seed1@mem8", run.RowName("diff_pruning", seed=1, memory_batch=8)),
    ],
)
def test_row_names(label, expected):
    assert run.parse_row(label) == expected
    assert expected.seed0 == label.partition("#")[0].removesuffix(f"@mem{expected.memory_batch}")


def test_misspelt_row_is_refused():
    with pytest.raises(ValueError, match="expected <method>"):
        run.parse_row("lift@lora-budget")


def test_seed_and_memory_rows():
    labels = run.seed_rows(["lora", "full", "lift", "smt@lora_budget"], [0, 1, 2], run.SEED_METHODS)
    assert labels == ["lora", "lora#seed1", "lora#seed2", "full", "lift", "lift#seed1", "lift#seed2", "smt@lora_budget"]
    assert run.seed_rows(["lora", "lift"], [0], run.SEED_METHODS) == ["lora", "lift"]
    memory = run.memory_rows(labels, [8, 16], main_batch=8)  # batch 8 comes from the main runs; seeds are not rerun
    assert memory == ["lora@mem16", "full@mem16", "lift@mem16", "smt@lora_budget@mem16"]
    assert run.memory_rows(labels, [8], main_batch=8) == []


def test_option_defaults_and_parsing():
    args = run.parse_args([])
    assert args.seeds == [0, 1] and args.seed_methods == ["lora", "lift", "spiel", "rosa"]
    assert args.memory_batch_sizes == [8] and args.memory_steps == 5
    quick = run.parse_args(["--quick", "--memory-batch-sizes", "8,16", "--seed-methods", "lora,lift"])
    assert quick.seeds == [0] and quick.memory_batch_sizes == [8, 16] and quick.seed_methods == ["lora", "lift"]
    assert run.parse_args(["--seeds", "0,1,2"]).seeds == [0, 1, 2]
    with pytest.raises(SystemExit):
        run.parse_args(["--seeds", "1"])  # the <method> rows are seed 0


# ---- commands --------------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_train(monkeypatch):
    """``subprocess.run`` that records ``sparse-peft train`` commands and writes a summary into their --output folder
    (other commands, such as matplotlib's font lookup, run)."""
    commands: list[list[str]] = []
    real_run = subprocess.run

    def fake_run(command, **kwargs):
        if "sparse_peft.cli" not in command:
            return real_run(command, **kwargs)
        commands.append(command)
        output = Path(command[command.index("--output") + 1])
        output.mkdir(parents=True)
        method = command[command.index("--method") + 1]
        batch = int(command[command.index("--batch-size") + 1])
        (output / "summary.json").write_text(json.dumps(summary(method, memory=batch * 100 * MiB)))
        return SimpleNamespace(returncode=0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    return commands


def _value(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_run_method_for_an_extra_seed(fake_train, tmp_path):
    args = run.parse_args(["--out", str(tmp_path)])
    result = run.run_method("lora#seed1", args, tmp_path)
    [command] = fake_train
    assert command[2:4] == ["sparse_peft.cli", "train"]
    assert _value(command, "--method") == "lora" and _value(command, "--seed") == "1"
    assert _value(command, "--steps") == "100" and _value(command, "--n-eval") == "100"
    assert _value(command, "--batch-size") == "8"
    assert "--task-seed" not in command  # the problems stay those of task seed 0 (the CLI's default)
    assert "--no-reload-check" not in command and "--set" not in command
    assert result["method"] == "lora"
    assert result["library_commit"] == run.library_commit() != ""  # the row records the tree it ran from
    assert json.loads((tmp_path / "runs" / "lora#seed1" / "summary.json").read_text()) == result
    assert (tmp_path / "logs" / "lora#seed1.log").is_file()


def test_run_method_for_a_memory_run(fake_train, tmp_path):
    args = run.parse_args(["--out", str(tmp_path), "--memory-batch-sizes", "8,16"])
    result = run.run_method("lift@mem16", args, tmp_path)
    [command] = fake_train
    assert _value(command, "--method") == "lift" and _value(command, "--seed") == "0"
    assert _value(command, "--batch-size") == "16" and _value(command, "--steps") == "5"
    assert _value(command, "--n-eval") == "0" and "--no-reload-check" in command
    assert "--set" not in command  # "@mem16" is no budget suffix
    assert result["memory_above_frozen_bytes"] == 1600 * MiB
    assert (tmp_path / "runs" / "lift@mem16" / "summary.json").is_file()


def test_commands_of_budget_and_pruned_rows(tmp_path):
    args = run.parse_args(["--quick"])
    command = run.train_command("rosa@lora_budget@mem16", args, tmp_path / "x")
    assert _value(command, "--set") == "density=0.023" and _value(command, "--batch-size") == "16"
    command = run.train_command("lora_pruned#seed1", args, tmp_path / "x")
    assert _value(command, "--prune") == "2:4" and _value(command, "--seed") == "1"
    assert _value(command, "--steps") == "3" and "--no-reload-check" in command


def test_reuse_reads_a_kept_run(fake_train, tmp_path):
    kept = tmp_path / "runs" / "lora#seed1"
    kept.mkdir(parents=True)
    (kept / "summary.json").write_text(json.dumps(summary("lora", 0.42)))
    args = run.parse_args(["--out", str(tmp_path), "--reuse"])
    assert run.run_method("lora#seed1", args, tmp_path)["after"]["exact_match"] == 0.42
    assert fake_train == []


def test_reuse_reads_a_recorded_summary_in_a_fresh_checkout(fake_train, tmp_path):
    """``runs/`` is not committed: a run spanning sessions resumes from ``summaries.json``, which every row adds to."""
    args = run.parse_args(["--out", str(tmp_path)])
    first = run.run_method("lora#seed1", args, tmp_path)
    assert json.loads((tmp_path / "summaries.json").read_text()) == {"lora#seed1": first}
    shutil.rmtree(tmp_path / "runs")  # what a fresh clone has
    reuse = run.parse_args(["--out", str(tmp_path), "--reuse"])
    assert run.run_method("lora#seed1", reuse, tmp_path) == first
    assert len(fake_train) == 1


def test_a_rerun_keeps_the_older_run_and_installs_the_new_one(fake_train, tmp_path):
    kept = tmp_path / "runs" / "lora"
    kept.mkdir(parents=True)
    (kept / "summary.json").write_text(json.dumps(summary("lora", 0.42)))
    args = run.parse_args(["--out", str(tmp_path)])  # no --reuse: trains again
    result = run.run_method("lora", args, tmp_path)
    assert json.loads((kept / "summary.json").read_text()) == result != summary("lora", 0.42)
    [previous] = (tmp_path / "runs").glob("lora-previous-*")
    assert json.loads((previous / "summary.json").read_text())["after"]["exact_match"] == 0.42


def test_main_without_training(fake_train, tmp_path, monkeypatch):
    monkeypatch.setattr(run, "machine", lambda: {"commit": "test"})
    argv = ["--out", str(tmp_path), "--methods", "lora,lift,shira", "--memory-batch-sizes", "8,16", "--steps", "2"]
    assert run.main(argv) == 0
    trained = [f"{_value(c, '--method')}/{_value(c, '--seed')}/{_value(c, '--batch-size')}" for c in fake_train]
    main_runs = ["lora/0/8", "lora/1/8", "lift/0/8", "lift/1/8", "shira/0/8"]
    assert trained == [*main_runs, "lora/0/16", "lift/0/16", "shira/0/16"]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["results"]) == {"lora", "lora#seed1", "lift", "lift#seed1", "shira"}  # @mem runs are no rows
    assert results["results"]["lift"][run.AT_BATCH] == {"8": 800 * MiB, "16": 1600 * MiB}
    text = (tmp_path / "table.md").read_text()
    assert "above loaded model at batch 16 MiB" in text and "quality ≥ LoRA" in text
    charts = {"accuracy_vs_params.png", "ratios_vs_lora.png", "loss_curves.png"}
    assert {p.name for p in tmp_path.glob("*.png")} == charts


# ---- memory ----------------------------------------------------------------------------------------------------------
def test_attach_memory_and_memory_table():
    rows = synthetic_rows()
    memory = {
        "lora@mem16": summary("lora", None, memory=3400 * MiB),
        "lift@mem16": summary("lift", None, memory=3400 * MiB),
        "spiel@mem16": summary("spiel", None, memory=3000 * MiB),
        "ghost@mem16": summary("ghost", None),  # its main run failed: nothing to attach to
    }
    run.attach_memory(rows, memory, main_batch=8)
    assert rows["lora"][run.AT_BATCH] == {8: 1800 * MiB, 16: 3400 * MiB}
    assert run.AT_BATCH not in rows["lora#seed1"] and "ghost" not in rows
    text = run.memory_table(rows)
    header = text.splitlines()[2]
    for column in ("at batch 8 MiB", "at batch 16 MiB", "growth 8→16 MiB", "growth vs LoRA", "optimizer state MiB"):
        assert column in header
    lora = next(line for line in text.splitlines() if line.startswith("| lora |"))
    # 1800 → 3400 MiB: 1600 MiB growth; 37 MiB optimizer state, 19 MiB adapter
    assert lora == "| lora | 1,800.0 | 1.00x | 3,400.0 | 1.00x | 1,600.0 | 1.00x | 37.0 | 19.0 |"
    spiel = next(line for line in text.splitlines() if line.startswith("| spiel |"))
    assert "| 800.0 | 0.50x | 37.0 |" in spiel  # grows half as much as LoRA
    assert "shira" not in text and "#seed" not in text  # no memory run: not in the memory table


def test_memory_table_reads_json_keys_and_is_empty_with_one_batch():
    rows = {"lora": summary("lora", memory_above_frozen_bytes_at_batch={"8": 10 * MiB, "16": 20 * MiB})}
    assert "| lora | 10.0 | 1.00x | 20.0 | 1.00x | 10.0 | 1.00x | 37.0 |" in run.memory_table(rows)
    assert run.memory_table({"lora": summary("lora", memory_above_frozen_bytes_at_batch={8: 1})}) == ""
    assert run.memory_table(synthetic_rows()) == ""


# ---- quality over seeds --------------------------------------------------------------------------------------------
def test_quality_over_seeds():
    rows = synthetic_rows()
    lift = run.quality(rows, "lift")
    assert lift.values == (0.54, 0.50) and lift.n == 200 and lift.mean == pytest.approx(0.52)
    assert str(lift) == "52.0% (seeds: 54%, 50%)"
    assert str(run.quality(rows, "shira")) == "54%"
    assert run.quality({"x": summary("x", None)}, "x") is None


def test_noise_is_the_binomial_error_of_the_difference():
    # 50% vs 54% over 200 problems each: SE = sqrt(.25/200 + .2484/200) = 4.99 points
    close = run.noise(run.Quality((0.5, 0.5), 200), run.Quality((0.54, 0.54), 200))
    assert close == "-4.0 points (2 SE 10.0): within noise"
    far = run.noise(run.Quality((0.37, 0.35), 200), run.Quality((0.54, 0.54), 200))
    assert far.endswith("beyond noise") and far.startswith("-18.0 points")
    assert run.noise(run.Quality((1.0,), 100), run.Quality((1.0,), 100)).endswith("within noise")
    # against 90% of LoRA: 45% vs 48.6%, SE = sqrt(.2475/100 + .81 · .2484/100)
    ninety = run.noise(run.Quality((0.45,), 100), run.Quality((0.54,), 100), factor=0.9)
    assert ninety == "-3.6 points (2 SE 13.4): within noise"


def test_table_folds_seeds_into_their_row():
    rows = synthetic_rows()
    text = run.table(rows)
    assert "#seed" not in text
    lines = {line.split(" | ")[0].removeprefix("| "): line for line in text.splitlines()[2:]}
    assert list(lines) == ["lora", "full", "shira", "lift", "spiel", "smt@lora_budget"]
    assert "| 0% → 54.0% (seeds: 54%, 54%) |" in lines["lora"]
    assert "| 0% → 52.0% (seeds: 54%, 50%) |" in lines["lift"]
    assert "| 0% → 54% |" in lines["shira"]
    assert "| 1.50x |" in lines["lift"]  # step ratio against LoRA's seed-0 row (3.0 s), not its seed-1 row (9.0 s)


def test_targets_use_seed_means_and_state_the_noise():
    text = run.targets(synthetic_rows())
    assert "#seed" not in text
    lift = [line for line in text.splitlines() if line.startswith("| lift |")]
    quality = next(line for line in lift if "| quality ≥ LoRA |" in line)
    assert "**missed**: 52.0% (seeds: 54%, 50%) vs LoRA 54.0% (seeds: 54%, 54%); gap to LoRA -2.0 points" in quality
    assert quality.endswith("within noise |")
    ninety = next(line for line in lift if "| quality ≥ 90% of LoRA |" in line)
    assert "met: " in ninety and "gap to 90% of LoRA +3.4 points" in ninety
    assert "step 1.50x" in next(line for line in lift if "step ≤ 1.05x LoRA" in line)
    spiel = next(line for line in text.splitlines() if line.startswith("| spiel | quality ≥ LoRA |"))
    assert spiel.endswith("beyond noise |")
    smt = next(line for line in text.splitlines() if line.startswith("| smt@lora_budget | quality ≥ 90% of LoRA"))
    assert "53% vs LoRA 54.0%" in smt


STEPS_TABLES = """SmolLM2-135M-Instruct, batch 8, float32, 2 threads, median of 100 round-robin rounds.

| method | trainable | step s (median) | x LoRA | slowest timed step s |
|---|---|---|---|---|
| lora | 4,884,480 | 3.71 | 1.00x | 8.63 |
| lift | 4,884,480 | 3.50 | 0.94x | 8.86 |
| smt | 2,949,120 | 2.92 | 0.74x | 3.25 |

| method | total of the timed steps s | x LoRA |
|---|---|---|
| lora | 383.3 | 1.00x |
| lift | 452.3 | 1.18x |
"""


def test_read_interleaved_takes_steps_tables(tmp_path):
    path = tmp_path / "steps.md"
    path.write_text(STEPS_TABLES)
    found = run.read_interleaved(path)
    assert found == {"lora": {"step": 1.0, "wall": 1.0}, "lift": {"step": 0.94, "wall": 1.18}, "smt": {"step": 0.74}}
    (tmp_path / "other.md").write_text("| method | accuracy |\n|---|---|\n| lora | 54% |\n")
    with pytest.raises(ValueError, match="no table of benchmarks/steps.py"):
        run.read_interleaved(tmp_path / "other.md")


def rows_with_interleaved(tmp_path: Path) -> dict[str, dict]:
    """The synthetic rows with their ratios and the interleaved ones of ``STEPS_TABLES`` (as ``steps-final.md``)."""
    path = tmp_path / "steps-final.md"
    path.write_text(STEPS_TABLES)
    rows = synthetic_rows()
    run.ratios(rows)
    run.attach_interleaved(rows, [path])
    return rows


def test_read_interleaved_reads_what_steps_py_writes(tmp_path, monkeypatch):
    """The tables of ``benchmarks/steps.py`` (its own ``table``, on runners with made-up times) parse back."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("benchmarks_steps", REPO / "benchmarks" / "steps.py")
    steps = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(steps)
    model = torch.nn.Linear(2, 2)
    runners = [
        SimpleNamespace(method="lora", times=[4.0, 4.0, 4.4], model=model),
        SimpleNamespace(method="lift", times=[3.6, 3.6, 8.0], model=model),
    ]
    path = tmp_path / "steps.md"
    path.write_text(steps.table(runners, rounds=3, warmup=0, setting="tiny", wall=True))
    assert run.read_interleaved(path) == {
        "lora": {"step": 1.0, "wall": 1.0},
        "lift": {"step": 0.9, "wall": 1.23},
    }  # 15.2 / 12.4 s


def test_targets_take_the_interleaved_ratios(tmp_path):
    rows = rows_with_interleaved(tmp_path)
    assert rows["lora"]["interleaved"]["step"] == {"ratio": 1.0, "source": "steps-final.md"}
    assert "interleaved" not in rows["smt@lora_budget"]  # another config than the one steps.py times
    text = run.targets(rows)
    step = next(line for line in text.splitlines() if line.startswith("| lift | step ≤ 1.05x LoRA"))
    assert "met: step 0.94x interleaved (steps-final.md; this row's own 1.50x; target ≤ 1.05x)" in step
    wall = next(line for line in text.splitlines() if line.startswith("| lift | training wall time"))
    assert "**missed**: training wall time 1.18x interleaved (steps-final.md; this row's own 1.00x" in wall
    spiel = next(line for line in text.splitlines() if line.startswith("| spiel | step ≤ 1.05x LoRA"))
    assert "interleaved" not in spiel  # not in the file: its own row's ratio
    lift_line = next(line for line in run.table(rows).splitlines() if line.startswith("| lift |"))
    assert "| 1.50x | 0.94x |" in lift_line and "| 1.00x | 1.18x |" in lift_line


def test_interleaved_option_must_name_files(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run.parse_args(["--interleaved", str(tmp_path / "missing.md")])
    assert "is not a file (write one with benchmarks/steps.py --write)" in capsys.readouterr().err


def test_report_puts_the_memory_table_between_table_and_targets():
    rows = synthetic_rows()
    run.attach_memory(rows, {"lora@mem16": summary("lora", None, memory=3400 * MiB)}, main_batch=8)
    parts = run.report(rows).split("\n\n")
    assert parts[0].startswith("| method | trainable") and parts[1].startswith("Memory above the loaded model")
    assert parts[2].startswith("| method | above loaded model") and parts[3].startswith("| method | target")


# ---- plots -----------------------------------------------------------------------------------------------------------
def test_plots_write_every_chart(tmp_path):
    written = run.plots(synthetic_rows(), tmp_path)
    assert [p.name for p in written] == ["accuracy_vs_params.png", "ratios_vs_lora.png", "loss_curves.png"]
    assert all(p.stat().st_size > 1000 for p in written)
    rows = {label: {**row, "loss_curve": []} for label, row in synthetic_rows().items()}
    (tmp_path / "no-curves").mkdir()
    written = run.plots(rows, tmp_path / "no-curves")
    assert [p.name for p in written] == ["accuracy_vs_params.png", "ratios_vs_lora.png"]


def test_step_ratio_prefers_the_interleaved_one(tmp_path):
    rows = rows_with_interleaved(tmp_path)
    assert run._step_ratio(rows["lift"]) == (0.94, True)
    assert run._step_ratio(rows["spiel"]) == (1.0, False)
    assert run.ratios_plot(rows, tmp_path / "ratios.png").stat().st_size > 1000


def test_loss_curves_draw_every_row_and_dash_the_extra_seeds(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    drawn: dict[str, dict] = {}
    plot = Axes.plot

    def spy(self, *args, **kwargs):
        drawn[kwargs["label"]] = kwargs
        return plot(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", spy)
    rows = synthetic_rows()
    assert run.loss_plot(rows, tmp_path / "loss.png").is_file()
    assert set(drawn) == set(rows)
    assert drawn["lift#seed1"]["linestyle"] == "--" and drawn["lift"]["linestyle"] == "-"
    assert drawn["lift#seed1"]["color"] == drawn["lift"]["color"] != drawn["lora"]["color"]
    assert len({run._hue(i) for i in range(20)}) == 20 and [run._hue(i) for i in range(3)] == [0, 2, 4]


def test_label_heights_spread_labels_of_neighbouring_points():
    points = [("a", 4.9e6, 0.50), ("b", 4.88e6, 0.505), ("c", 4.5e6, 0.51), ("far", 1.3e6, 0.505), ("low", 4.9e6, 0.1)]
    heights = run.label_heights(points, gap=0.02)
    assert heights["a"] == 0.50 and heights["low"] == 0.1 and heights["far"] == 0.505  # nothing below to avoid
    assert heights["b"] == pytest.approx(0.52) and heights["c"] == pytest.approx(0.54)  # stacked above "a"


def test_accuracy_plot_marks_the_peers(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    markers: dict[float, str] = {}
    scatter = Axes.scatter

    def spy(self, x, y, *args, **kwargs):
        if kwargs.get("s") == 40:  # the seed means, one per row
            markers[x] = kwargs["marker"]
        return scatter(self, x, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "scatter", spy)
    rows = {
        label: {**summary(label, 0.5), "trainable_parameters": i + 1}
        for i, label in enumerate(["lora", "full", "shira", "supertuning", "lora_pruned", "lift", "rosa@lora_budget"])
    }
    run.accuracy_plot(rows, tmp_path / "accuracy.png")
    assert markers == {1: "s", 2: "s", 3: "s", 4: "s", 5: "s", 6: "o", 7: "o"}


def test_adapter_size_check_reads_the_stored_bytes():
    """The file must hold what the layers' storage reports account for (within 5%); old summaries fall back to
    ``k·(value + index bytes)``."""
    rows = synthetic_rows()
    rows["lift"]["stored_bytes"] = 19 * MiB
    rows["spiel"]["stored_bytes"] = 15 * MiB
    text = run.targets(rows)
    lines = [line for line in text.splitlines() if "adapter ≤ stored bytes + 5%" in line]
    assert any(line.startswith("| lift |") and "met: +0.0%" in line for line in lines)
    assert any(line.startswith("| spiel |") and "**missed**: +26.7%" in line for line in lines)
    assert "| 19.0 | 19.0 |" in next(line for line in run.table(rows).splitlines() if line.startswith("| lift |"))
    assert run.expected_adapter_bytes({"k_times_value_plus_index_bytes": 100}) == 100
