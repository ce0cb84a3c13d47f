"""Two processes under ``accelerate launch`` (DDP over gloo on CPU): for every method, both ranks end identical."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from conftest import REPO, tiny_llama
from method_configs import MASK_METHODS, TINY_CONFIGS, ddp_config
from peft import get_peft_model
from safetensors.torch import load_file

METHODS = sorted(TINY_CONFIGS)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One 2-process launch that trains every method in turn."""
    accelerate = shutil.which("accelerate")
    if accelerate is None:
        pytest.fail("the accelerate command is not installed (it is a dependency of sparse_peft)")
    out = tmp_path_factory.mktemp("ddp")
    command = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO / "tests" / "ddp_worker.py"), str(out), ",".join(METHODS),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_two_process_ddp_ends_identical(ddp_run, method):
    for rank in (0, 1):
        info = json.loads((ddp_run / f"{method}-rank{rank}.json").read_text())
        assert info == {"world_size": 2, "wrapped": "DistributedDataParallel"}
    a, b = load_file(ddp_run / f"{method}-rank0.safetensors"), load_file(ddp_run / f"{method}-rank1.safetensors")
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    fresh = {k: v for k, v in get_peft_model(tiny_llama(), ddp_config(method)).state_dict().items()}
    trained = [k for k in a if a[k].dtype.is_floating_point]
    comparable = [k for k in trained if _with_adapter(k) in fresh]
    if comparable:
        assert any(not torch.equal(a[k], fresh[_with_adapter(k)]) for k in comparable), "nothing trained"
    else:  # the adapter changed layout during training (diff pruning's projection): its values were learned
        assert trained and any(a[k].abs().sum() > 0 for k in trained)
    if method in MASK_METHODS:
        # the masks were chosen or moved during training, so agreement is not just the shared initial mask
        masks = [k for k in a if MASK_METHODS[method] in k.rsplit(".", 1)[-1]]
        assert masks, f"no mask tensors named *{MASK_METHODS[method]}* in {sorted(a)[:4]}"
        initial = [k for k in masks if _with_adapter(k) in fresh]
        moved = [k for k in initial if not torch.equal(a[k], fresh[_with_adapter(k)])]
        assert moved or not initial, "no mask changed during the run"


def _with_adapter(key: str) -> str:
    """State-dict key of a saved adapter entry in a live model with adapter ``default``."""
    module, _, attribute = key.rpartition(".")
    return f"{module}.{attribute}.default" if not attribute.endswith("weight") else f"{module}.default.{attribute}"
