"""Worker for the 2-process DeepSpeed test: ``python -m torch.distributed.run --nproc_per_node 2
tests/deepspeed_worker.py OUT``.

DeepSpeed directly (``deepspeed.initialize`` on its CPU accelerator over gloo), with the schedule hooks of a custom
loop: accelerate 1.15 does not run DeepSpeed on a CPU-only machine (``use_cpu`` turns it off; without it accelerate
falls back to one process per launch). Each case trains a tiny Llama for a few steps, each rank on its own rows, and
writes what it saw: the sharding sparse_peft detects, the losses, the adapter state gathered on every rank, and the
error :func:`sparse_peft.sharding.check_sharded_training` raises, if any.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import deepspeed
import torch
from peft import get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import INPUT, tiny_llama
from method_configs import prepare_base, tiny_config

import sparse_peft
from sparse_peft.sharding import ShardedTrainingError, check_sharded_training, sharded_by

STEPS = 4

#: ``case -> (ZeRO stage, method, overrides of TINY_CONFIGS)``.
CASES: dict[str, tuple[int, str, dict[str, Any]]] = {
    "zero2-snell": (2, "snell", {}),
    "zero3-snell": (3, "snell", {}),
    "zero3-lift-static": (3, "lift", {"update_interval": None}),
    "zero2-lift-refresh": (2, "lift", {"update_interval": 2}),
    "zero1-rosa-selects": (1, "rosa", {}),
}


def run(out: str, case: str, rank: int, group: Any) -> None:
    stage, method, overrides = CASES[case]
    model = get_peft_model(prepare_base(method, tiny_llama()), tiny_config(method, **overrides))
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 2e-2, "weight_decay": 0.0, "torch_adam": True}},
        "steps_per_print": 10_000,
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=config)
    sharding = sharded_by(model, optimizer)
    record: dict[str, Any] = {"kind": sharding.kind if sharding else None, "error": None, "losses": []}
    try:
        check_sharded_training(model, optimizer, STEPS)
    except ShardedTrainingError as exc:
        record["error"] = str(exc)
    if record["error"] is None:
        context = sparse_peft.ScheduleContext(total_steps=STEPS, group=group)
        rows = INPUT[rank : rank + 2]
        for step in range(1, STEPS + 1):
            sparse_peft.begin_step(model, step, context)
            loss = engine(input_ids=rows, labels=rows).loss
            engine.backward(loss)
            sparse_peft.before_optimizer_step(model, context)
            engine.step()
            sparse_peft.refresh_masks(model, step, optimizer, context)
            record["losses"].append(loss.item())
        with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=stage == 3):
            state = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}
        save_file(state, os.path.join(out, f"{case}-rank{rank}.safetensors"))
    with open(os.path.join(out, f"{case}-rank{rank}.json"), "w") as handle:
        json.dump(record, handle)


def main(out: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    rank = torch.distributed.get_rank()
    group = torch.distributed.new_group(backend="gloo")
    for case in CASES:
        run(out, case, rank, group)


if __name__ == "__main__":
    main(sys.argv[1])
