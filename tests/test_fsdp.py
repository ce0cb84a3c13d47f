"""Sharded training: two processes under ``accelerate launch`` with FSDP2 (``fully_shard``, gloo on the CPU).

The static-mask configurations of every method, and the first choices of a mask during training that run on the local
shards (RoSA's selection, SMT's warm-up), train under FSDP2 and match the same runs under DDP; mask surgery on trained
values, choices that read sharded tensors and train-start calibrations are refused before the first step, naming the
alternatives. The in-process tests check the rules behind the refusal without launching anything.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import types

import pytest
import torch
from conftest import INPUT, REPO, tiny_llama
from fsdp_worker import MASK_CHOSEN_IN_TRAINING, REFUSED, TRAINED
from method_configs import prepare_base, tiny_config
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import sparse_peft
from sparse_peft.sharding import (
    MaskChange,
    ShardedTrainingError,
    Sharding,
    check_sharded_training,
    moving_masks,
    sharded_by,
)

#: What each refused configuration's error names.
REFUSAL_REASONS = {
    "lift": "LIFT refreshes its mask every 2 steps (update_interval=2)",
    "spiel": "SpIEL drops and regrows entries every 3 steps",
    "diff_pruning": "diff pruning projects its dense diff to a sparse delta after step 2",
    "lors": "still need their calibration pass",
    "rosa_magnitude": "RoSA chooses its mask from the base weight during training (mask_score='magnitude')",
    "smt_random_init": "SMT selects its blocks in training and fills them with random values (init_weights=False)",
}


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """One 2-process launch: every trained case under DDP, then under FSDP2, then the refusals."""
    accelerate = shutil.which("accelerate")
    if accelerate is None:
        pytest.fail("the accelerate command is not installed (it is a dependency of sparse_peft)")
    out = tmp_path_factory.mktemp("fsdp")
    command = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO / "tests" / "fsdp_worker.py"), str(out), ",".join(TRAINED), ",".join(REFUSED),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return out


def _state(run, case: str, tag: str) -> dict[str, torch.Tensor]:
    return load_file(run / f"{case}-{tag}.safetensors")


@pytest.mark.slow
def test_accelerate_runs_ddp_on_cpu_unless_told(fsdp_run):
    """Upstream limit the worker works around: accelerate 1.15 turns an FSDP request on the CPU into DDP. When this
    fails, accelerate sets up FSDP on the CPU by itself and ``use_fsdp_on_cpu`` in the worker can go."""
    for rank in (0, 1):
        assert json.loads((fsdp_run / f"run-rank{rank}.json").read_text()) == {"accelerate_chose": "MULTI_CPU"}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(TRAINED))
def test_trains_under_fsdp2(fsdp_run, case):
    for rank in (0, 1):
        info = json.loads((fsdp_run / f"{case}-fsdp-rank{rank}.json").read_text())
        assert info["world_size"] == 2
        assert info["wrapped"][:2] == [f"FSDP{info['wrapped'][2]}", "FSDPModule"], info["wrapped"]
        assert info["trainable"] > 0 and info["sharded_trainable"] == info["trainable"], info  # all are DTensors
        assert all(torch.isfinite(torch.tensor(info["losses"]))) and len(info["losses"]) == 4
    a, b = _state(fsdp_run, case, "fsdp-rank0"), _state(fsdp_run, case, "fsdp-rank1")
    assert a.keys() == b.keys() and a
    for key in a:  # index buffers are not sharded: each rank keeps its own copy, which must agree
        assert torch.equal(a[key], b[key]), key
    initial = _state(fsdp_run, case, "fsdp-initial")
    assert initial.keys() == a.keys()
    moved = [k for k in a if a[k].dtype.is_floating_point and not torch.equal(a[k], initial[k])]
    assert moved, "no adapter tensor changed during the FSDP run"
    masks = [k for k in a if not a[k].dtype.is_floating_point]
    chosen = [k for k in masks if not torch.equal(a[k], initial[k])]
    if case in MASK_CHOSEN_IN_TRAINING:
        assert chosen, "the mask was not chosen during the run"
    else:
        assert not chosen, f"a static mask moved: {chosen}"


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(TRAINED))
def test_fsdp2_matches_ddp(fsdp_run, case):
    """The same data, steps and seeds under DDP: the sharded run learns the same adapter (up to summation order)."""
    sharded, replicated = _state(fsdp_run, case, "fsdp-rank0"), _state(fsdp_run, case, "ddp-rank0")
    assert sharded.keys() == replicated.keys()
    for key in sharded:
        torch.testing.assert_close(sharded[key], replicated[key], rtol=1e-4, atol=1e-5, msg=key)
    logits = [_state(fsdp_run, case, f"{mode}-logits-rank0")["logits"] for mode in ("fsdp", "ddp")]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-5)
    losses = [json.loads((fsdp_run / f"{case}-{mode}-rank0.json").read_text())["losses"] for mode in ("fsdp", "ddp")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(TRAINED))
def test_fsdp2_adapter_reloads_in_one_process(fsdp_run, case):
    """``trainer.save_model`` under FSDP2 writes the gathered adapter; it loads into a fresh base in one process and
    gives the logits of the trained sharded model."""
    folder = fsdp_run / f"{case}-adapter"
    saved = load_file(folder / "adapter_model.safetensors")
    gathered = _state(fsdp_run, case, "fsdp-rank0")
    assert saved.keys() == gathered.keys()
    for key in saved:
        assert torch.equal(saved[key], gathered[key]), key
    model = PeftModel.from_pretrained(prepare_base(TRAINED[case][0], tiny_llama()), folder).eval()
    with torch.no_grad():
        logits = model(input_ids=INPUT).logits
    expected = _state(fsdp_run, case, "fsdp-logits-rank0")["logits"]
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(_state(fsdp_run, case, "fsdp-logits-rank1")["logits"], expected, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(REFUSED))
def test_mask_surgery_refused_under_fsdp2(fsdp_run, case):
    for rank in (0, 1):
        record = json.loads((fsdp_run / f"{case}-refused-rank{rank}.json").read_text())
        assert record["error"] is not None, f"{case} trained under FSDP2"
        assert record["steps"] == 0
        message = record["error"]
        assert "sharded model (FSDP2 (fully_shard))" in message
        assert REFUSAL_REASONS[case] in message
        assert "train with DDP" in message and "sparse_peft.calibrate(trainer.model, batches)" in message


# ---- the rules, in one process -------------------------------------------------------------------------------------
def _peft(method: str, **overrides):
    return get_peft_model(prepare_base(method, tiny_llama()), tiny_config(method, **overrides))


@pytest.mark.parametrize(
    ("method", "overrides", "change"),
    [
        ("lift", {"update_interval": 2}, "surgery"),
        ("lift", {"update_interval": None}, None),
        ("spiel", {}, "surgery"),
        ("rosa", {}, "shard_local"),  # wl1: statistics, then the first choice of the mask
        ("rosa", {"mask_score": "random"}, "shard_local"),
        ("rosa", {"mask_score": "magnitude"}, "surgery"),
        ("rosa", {"schedule": "lora_only", "density": 0.0}, None),
        ("smt", {}, "shard_local"),
        ("smt", {"init_weights": False}, "surgery"),
        ("diff_pruning", {"projection_step": 2}, "surgery"),
        ("diff_pruning", {"projection_step": None}, None),
        ("snell", {}, None),
        ("s2ft", {}, None),
        ("spp", {}, None),
        ("lors", {}, None),
    ],
)
def test_moving_masks_by_configuration(method, overrides, change):
    found = moving_masks(_peft(method, **overrides), total_steps=6)
    if change is None:
        assert found == {}
    else:
        assert found and {c.shard_local for c in found.values()} == {change == "shard_local"}, found


def test_moving_masks_counts_steps():
    """A refresh or a projection due after the run's last step does not happen in it; one due at the last step does
    (the callback's step-end hook runs after the last step too)."""
    assert moving_masks(_peft("lift", update_interval=7), total_steps=6) == {}
    assert moving_masks(_peft("lift", update_interval=6), total_steps=6)
    assert moving_masks(_peft("lift", update_interval=7), total_steps=0)  # length unknown: it may move
    assert moving_masks(_peft("diff_pruning", projection_step=7), total_steps=6) == {}
    assert moving_masks(_peft("diff_pruning", projection_step=6), total_steps=6)


@pytest.mark.parametrize("method", ["rosa", "smt"])
def test_calibration_before_training_makes_masks_static(method):
    model = _peft(method, **({"schedule": "default"} if method == "rosa" else {}))
    assert moving_masks(model, total_steps=6)
    sparse_peft.calibrate(model, [INPUT[:2], INPUT[1:]])
    assert moving_masks(model, total_steps=6) == {}


def test_unknown_scheduled_layer_counts_as_moving():
    """A layer class with schedule hooks but no rule cannot be checked, so it is refused rather than trusted."""
    model = _peft("snell")
    layer = next(m for m in model.modules() if isinstance(m, sparse_peft.SnellLinear))
    layer.__class__ = type("ScheduledSnell", (sparse_peft.SnellLinear,), {"on_step_end": lambda *a, **k: 0})
    reason = "ScheduledSnell has a training schedule that sparse_peft cannot check"
    assert list(moving_masks(model).values()) == [MaskChange(reason, shard_local=False)]


def test_unsharded_models_are_never_refused():
    """One process and DDP run every schedule: the check only acts on sharded models."""
    model = _peft("lift", update_interval=2)
    assert sharded_by(model) is None
    check_sharded_training(model, torch.optim.AdamW(model.parameters()), total_steps=6, pending_calibration=["x"])


@pytest.mark.parametrize(("kind", "refused"), [("fsdp2", False), ("fsdp1", True), ("zero3", True), ("dtensor", True)])
def test_shard_local_choices_run_only_under_fsdp2(monkeypatch, kind, refused):
    """RoSA's first choice of its mask runs on FSDP2's local shards; FSDP1's flat shards, ZeRO-3 partitions and other
    DTensor layouts (tensor parallelism: each rank sees partial activations) refuse it."""
    monkeypatch.setattr(sparse_peft.sharding, "sharded_by", lambda model, optimizer=None: Sharding(kind, kind))
    model = _peft("rosa")
    if refused:
        with pytest.raises(ShardedTrainingError, match=r"RoSA chooses its mask during training"):
            check_sharded_training(model, total_steps=6)
    else:
        check_sharded_training(model, total_steps=6)
    with pytest.raises(ShardedTrainingError, match="LIFT refreshes its mask"):  # surgery: refused everywhere
        check_sharded_training(_peft("lift", update_interval=2), total_steps=6)


def _deepspeed_like_optimizer(model):
    """A stand-in for accelerate's wrapper around a DeepSpeed ZeRO optimizer: only the class's module matters to the
    detection (``tests/test_deepspeed.py`` runs the real one where DeepSpeed is installed)."""
    zero = type("DeepSpeedZeroOptimizer", (), {"__module__": "deepspeed.runtime.zero.stage_1_and_2"})()
    zero.optimizer = torch.optim.AdamW(model.parameters())
    return types.SimpleNamespace(optimizer=types.SimpleNamespace(optimizer=zero))


def test_deepspeed_optimizer_refuses_mask_changes_but_not_static_masks():
    model = _peft("rosa")
    sharding = sharded_by(model, _deepspeed_like_optimizer(model))
    assert sharding is not None and sharding.kind == "deepspeed"
    assert sharding.description.startswith("DeepSpeed (DeepSpeedZeroOptimizer")
    with pytest.raises(ShardedTrainingError, match=r"DeepSpeed \(DeepSpeedZeroOptimizer.*RoSA chooses its mask"):
        check_sharded_training(model, _deepspeed_like_optimizer(model), total_steps=6)
    static = _peft("lift", update_interval=None)
    check_sharded_training(static, _deepspeed_like_optimizer(static), total_steps=6)


def test_zero3_partitioned_parameters_are_detected():
    model = _peft("snell")
    next(model.parameters()).ds_id = 0  # what DeepSpeed ZeRO-3 puts on every partitioned parameter
    assert sharded_by(model) == Sharding("zero3", "DeepSpeed ZeRO-3 (partitioned parameters)")
    with pytest.raises(ShardedTrainingError, match="still need their calibration pass"):
        check_sharded_training(model, total_steps=6, pending_calibration=["default"])
