"""Worker for the 2-process FSDP2 test: ``accelerate launch --multi_gpu --num_processes 2 tests/fsdp_worker.py OUT
TRAINED REFUSED`` (comma-separated case names of :data:`TRAINED` and :data:`REFUSED`).

Every case of ``TRAINED`` trains a tiny Llama for a few steps through TRL's ``SFTTrainer``, each rank on its own shard
of the data: first under DDP (the reference), then under FSDP2 (accelerate's ``fully_shard``, one unit per decoder
layer plus the root). After each run every rank writes the gathered adapter state and the logits of the trained
model; under FSDP2 rank 0 also saves the adapter with ``trainer.save_model``. Every case of ``REFUSED`` is then set
up under FSDP2, and the worker records the error ``trainer.train()`` raises. One launch serves every case.

accelerate 1.15 enables FSDP only on accelerator devices: on the CPU it silently runs DDP, even with an explicit
``fsdp_plugin``. :func:`use_fsdp_on_cpu` sets accelerate's shared state to FSDP before the FSDP trainers are built
(with ``accelerator_config={"use_configured_state": True}`` so that the trainers keep it), which is the state
accelerate sets up by itself on GPUs; everything after that is accelerate's and the trainer's own FSDP2 code.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from datasets import Dataset
from peft import get_peft_model_state_dict
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import INPUT, char_tokenizer, cpu_args, tiny_llama
from method_configs import prepare_base, tiny_config
from trl import SFTConfig, SFTTrainer

import sparse_peft
from sparse_peft.sharding import ShardedTrainingError

TEXTS = [f"sample {i}: " + "abcdefghij"[i % 10] * (3 + i % 5) for i in range(32)]
STEPS = 4

#: Runs trained under DDP and FSDP2: ``case -> (method, overrides of TINY_CONFIGS)``. The static masks, and the first
#: choices of a mask during training that run on FSDP2's local shards (``MASK_CHOSEN_IN_TRAINING``).
TRAINED: dict[str, tuple[str, dict[str, Any]]] = {
    "snell": ("snell", {}),
    "s2ft": ("s2ft", {}),  # selection="random": units fixed when the adapter is created
    "spp": ("spp", {}),
    "lors": ("lors", {}),  # gradient init: calibrated before trainer.train() (CALIBRATE_FIRST)
    "lift": ("lift", {"update_interval": None}),
    "rosa": ("rosa", {"schedule": "default"}),  # the mask from the calibration pass before trainer.train()
    "smt": ("smt", {}),  # blocks selected by the calibration pass before trainer.train()
    "diff_pruning": ("diff_pruning", {"projection_step": None}),  # stage 1 (gated dense diff), no projection
    "rosa_in_training": ("rosa", {}),  # schedule="wl1": LoRA for step 1, statistics in step 2, then the mask
    "smt_in_training": ("smt", {}),  # blocks selected after a 1-step gradient warm-up
}

#: Cases whose data-driven choice runs as sparse_peft.calibrate(trainer.model, ...) before trainer.train().
CALIBRATE_FIRST = ("lors", "rosa", "smt")

#: Cases whose mask is chosen during the run (their index buffers change; all other cases keep theirs).
MASK_CHOSEN_IN_TRAINING = ("rosa_in_training", "smt_in_training")

#: Configurations refused under FSDP2: ``case -> (method, overrides)``; masks moved on trained values, choices that
#: read sharded tensors, and train-start calibrations.
REFUSED: dict[str, tuple[str, dict[str, Any]]] = {
    "lift": ("lift", {"update_interval": 2}),
    "spiel": ("spiel", {}),
    "diff_pruning": ("diff_pruning", {"projection_step": 2}),
    "lors": ("lors", {}),  # gradient init as the callback's train-start calibration
    "rosa_magnitude": ("rosa", {"mask_score": "magnitude"}),  # |W| of the sharded base weight
    "smt_random_init": ("smt", {"init_weights": False}),  # random blocks written into the sharded parameter
}

#: FSDP2 settings, as ``SFTConfig(fsdp=True, fsdp_config=...)`` takes them.
FSDP_CONFIG: dict[str, Any] = {
    "version": 2,
    "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
    "reshard_after_forward": True,
    "state_dict_type": "FULL_STATE_DICT",
}


def sft_args(out: str, name: str, sharded: bool) -> SFTConfig:
    """The run's arguments; ``sharded``: FSDP2 with :data:`FSDP_CONFIG` on the state :func:`use_fsdp_on_cpu` set."""
    fsdp: dict[str, Any] = {}
    if sharded:
        fsdp = {"fsdp": True, "fsdp_config": dict(FSDP_CONFIG), "accelerator_config": {"use_configured_state": True}}
    return cpu_args(
        SFTConfig,
        os.path.join(out, f"trainer-{name}"),
        max_steps=STEPS,
        learning_rate=2e-2,
        logging_steps=1,
        seed=0,
        activation_checkpointing=False,
        **fsdp,
    )


def use_fsdp_on_cpu(out: str) -> str:
    """Configure accelerate's shared state for FSDP on the CPU, with the plugin ``SFTConfig(fsdp_config=FSDP_CONFIG)``
    describes; returns the distributed type accelerate chose by itself (``MULTI_CPU`` in accelerate 1.15, which
    ignores the plugin off accelerators)."""
    PartialState(cpu=True)  # the configured state the trainers' arguments ask for (use_configured_state)
    plugin = FullyShardedDataParallelPlugin(**sft_args(out, "plugin", sharded=True).fsdp_plugin_args)
    chosen = Accelerator(cpu=True, fsdp_plugin=plugin).state.distributed_type
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    return str(chosen.value)


def trainer_for(out: str, name: str, method: str, overrides: dict[str, Any], sharded: bool) -> SFTTrainer:
    """An ``SFTTrainer`` of ``method`` (``TINY_CONFIGS`` with ``overrides``) on its test base, run folder ``name``."""
    return SFTTrainer(
        model=prepare_base(method, tiny_llama()),
        args=sft_args(out, name, sharded),
        train_dataset=Dataset.from_dict({"text": TEXTS}),
        processing_class=char_tokenizer(),
        peft_config=tiny_config(method, **overrides),
        callbacks=[sparse_peft.SparsePeftCallback()],
    )


def adapter_state(model: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict:
    state = get_peft_model_state_dict(model, state_dict=state_dict)
    return {key: value.detach().cpu().contiguous() for key, value in state.items()}


def train(out: str, case: str, rank: int, sharded: bool) -> None:
    """Train ``case`` of :data:`TRAINED`; this rank's files ``{case}-{fsdp|ddp}-…``."""
    mode = "fsdp" if sharded else "ddp"
    trainer = trainer_for(out, f"{case}-{mode}", *TRAINED[case], sharded)
    if case in CALIBRATE_FIRST:
        sparse_peft.calibrate(trainer.model, [INPUT[:2], INPUT[1:]])
    if rank == 0:
        save_file(adapter_state(trainer.model), os.path.join(out, f"{case}-{mode}-initial.safetensors"))
    trainer.train()
    model = trainer.model
    trainable = [p for p in model.parameters() if p.requires_grad]
    # FSDP2: the full tensors gathered on every rank (a collective); DDP: every rank's own replica
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)) if sharded else None
    save_file(adapter_state(model, full), os.path.join(out, f"{case}-{mode}-rank{rank}.safetensors"))
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=INPUT).logits  # FSDP2: a collective, every rank runs the sharded forward
    save_file({"logits": logits.contiguous()}, os.path.join(out, f"{case}-{mode}-logits-rank{rank}.safetensors"))
    if sharded:
        trainer.save_model(os.path.join(out, f"{case}-adapter"))  # gathers on every rank, rank 0 writes
    info = {
        "world_size": torch.distributed.get_world_size(),
        "wrapped": [cls.__name__ for cls in type(trainer.model_wrapped).__mro__[:3]],
        "sharded_trainable": sum(isinstance(p, DTensor) for p in trainable),
        "trainable": len(trainable),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }
    with open(os.path.join(out, f"{case}-{mode}-rank{rank}.json"), "w") as handle:
        json.dump(info, handle)


def try_refused(out: str, case: str, rank: int) -> None:
    """Set up ``case`` of :data:`REFUSED` under FSDP2 and record the error ``trainer.train()`` raises."""
    trainer = trainer_for(out, f"{case}-refused", *REFUSED[case], sharded=True)
    try:
        trainer.train()
        error = None
    except ShardedTrainingError as exc:
        error = str(exc)
    with open(os.path.join(out, f"{case}-refused-rank{rank}.json"), "w") as handle:
        json.dump({"error": error, "steps": trainer.state.global_step}, handle)


def main(out: str, trained: str, refused: str) -> None:
    rank = int(os.environ.get("RANK", "0"))
    cases = [case for case in trained.split(",") if case]
    for case in cases:
        train(out, case, rank, sharded=False)
    chosen = use_fsdp_on_cpu(out)
    with open(os.path.join(out, f"run-rank{rank}.json"), "w") as handle:
        json.dump({"accelerate_chose": chosen}, handle)
    for case in cases:
        train(out, case, rank, sharded=True)
    for case in filter(None, refused.split(",")):
        try_refused(out, case, rank)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
