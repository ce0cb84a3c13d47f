"""Two processes under ``accelerate launch`` (DDP over gloo on CPU): every rank ends with the same masks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from conftest import REPO, tiny_llama
from peft import get_peft_model
from safetensors.torch import load_file

import sparse_peft


@pytest.mark.slow
@pytest.mark.parametrize("method", ["spiel", "lift"])
def test_two_process_ddp_ends_with_identical_masks(tmp_path, method):
    accelerate = shutil.which("accelerate")
    if accelerate is None:
        pytest.fail("the accelerate command is not installed (it is a dependency of sparse_peft)")
    command = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO / "tests" / "ddp_worker.py"), str(tmp_path), method,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    for rank in (0, 1):
        info = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert info == {"world_size": 2, "wrapped": "DistributedDataParallel"}
    a, b = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert a.keys() == b.keys() and any("indices" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the masks really moved during training (so agreement is not just the shared initial mask)
    config = (
        sparse_peft.SpielConfig(density=0.1, reselection_steps=3, selection_accumulation_steps=2)
        if method == "spiel"
        else sparse_peft.LiftConfig(rank=2, filter_rank=4, update_interval=2)
    )
    fresh = {k: v for k, v in get_peft_model(tiny_llama(), config).state_dict().items() if k.endswith(".default")}
    moved = [
        k for k in a if k.endswith("_indices") and "frozen" not in k
        and not torch.equal(a[k], fresh[k.replace("_indices", "_indices.default")])
    ]  # fmt: skip
    assert moved, "no mask changed during the DDP run"
