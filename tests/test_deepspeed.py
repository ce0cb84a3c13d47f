"""DeepSpeed ZeRO on the CPU: two processes of ``tests/deepspeed_worker.py`` (DeepSpeed's own loop, gloo).

Static masks train under ZeRO-2 and ZeRO-3 (partitioned parameters, read by the fused forward), identically on both
ranks; mask changes are refused under every ZeRO stage (DeepSpeed keeps the fp32 master weights and the optimizer
state, so an in-place edit of a parameter is overwritten at its next step). Needs ``deepspeed`` (not a dependency of
sparse_peft): the module is skipped, visibly, where it is not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed to run these tests)")

from deepspeed_worker import CASES


@pytest.fixture(scope="module")
def deepspeed_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               str(REPO / "tests" / "deepspeed_worker.py"), str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return out


def _record(run, case: str, rank: int) -> dict:
    return json.loads((run / f"{case}-rank{rank}.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("case", ["zero2-snell", "zero3-snell", "zero3-lift-static"])
def test_static_masks_train_under_zero(deepspeed_run, case):
    stage = CASES[case][0]
    records = [_record(deepspeed_run, case, rank) for rank in (0, 1)]
    for record in records:
        assert record["kind"] == ("zero3" if stage == 3 else "deepspeed")
        assert record["error"] is None and len(record["losses"]) == 4
    a, b = (load_file(deepspeed_run / f"{case}-rank{rank}.safetensors") for rank in (0, 1))
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert any(v.dtype.is_floating_point and v.abs().sum() > 0 for v in a.values()), "nothing trained"


@pytest.mark.slow
def test_zero3_matches_zero2(deepspeed_run):
    """ZeRO-3 partitions the base weights the fused forward reads: the run is the ZeRO-2 run (same losses; the
    adapters agree up to the summation order of the partitioned gradients)."""
    losses = [_record(deepspeed_run, case, 0)["losses"] for case in ("zero2-snell", "zero3-snell")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    a, b = (load_file(deepspeed_run / f"{case}-rank0.safetensors") for case in ("zero2-snell", "zero3-snell"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4, msg=key)  # Adam on tiny gradients


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("zero2-lift-refresh", "LIFT refreshes its mask every 2 steps"),
        ("zero1-rosa-selects", "RoSA chooses its mask during training"),  # runs under FSDP2, not under ZeRO
    ],
)
def test_mask_changes_refused_under_zero(deepspeed_run, case, reason):
    for rank in (0, 1):
        record = _record(deepspeed_run, case, rank)
        assert record["kind"] == "deepspeed"
        assert record["error"] is not None and "DeepSpeed (DeepSpeedZeroOptimizer" in record["error"]
        assert reason in record["error"] and "train with DDP" in record["error"]
