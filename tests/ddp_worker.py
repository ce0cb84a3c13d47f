"""Worker for the 2-process DDP test: ``accelerate launch --multi_gpu --num_processes 2 tests/ddp_worker.py OUT M1,M2``.

For each method, each rank trains the same tiny Llama on its own shard of the data (so local gradients differ), then
writes its adapter state; the test checks that the ranks agree. One launch serves every method, so process start-up
is paid once.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from datasets import Dataset
from peft import get_peft_model_state_dict
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import char_tokenizer, cpu_args, tiny_llama
from method_configs import ddp_config
from trl import SFTConfig, SFTTrainer

import sparse_peft

TEXTS = [f"sample {i}: " + "abcdefghij"[i % 10] * (3 + i % 5) for i in range(32)]
STEPS = 6


def sft_args(out: str, name: str, rank: int, steps: int = STEPS) -> SFTConfig:
    return cpu_args(
        SFTConfig,
        os.path.join(out, f"trainer-{name}-{rank}"),
        max_steps=steps,
        gradient_accumulation_steps=2,
        learning_rate=2e-2,
        seed=0,
        activation_checkpointing=False,
        bf16=None,  # TRL's default, i.e. bf16 on (not fp16), as these runs have always had
    )


def trainer_for(model, args: SFTConfig, peft_config=None) -> SFTTrainer:
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"text": TEXTS}),
        processing_class=char_tokenizer(),
        peft_config=peft_config,
        callbacks=[sparse_peft.SparsePeftCallback()],
    )


def train_one(out: str, method: str, rank: int) -> None:
    trainer = trainer_for(tiny_llama(), sft_args(out, method, rank), ddp_config(method))
    trainer.train()
    if method == "diff_pruning":
        # stages cannot change under a live DDP wrapper: stage 1 runs, every rank projects (one deterministic global
        # threshold over synchronised diffs), and stage 3 trains the projected adapter in a second DDP run
        model = trainer.model
        model.base_model.project()
        trainer = trainer_for(model, sft_args(out, f"{method}-stage3", rank, steps=3))
        trainer.train()
    state = {k: v.contiguous() for k, v in get_peft_model_state_dict(trainer.model).items()}
    save_file(state, os.path.join(out, f"{method}-rank{rank}.safetensors"))
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    with open(os.path.join(out, f"{method}-rank{rank}.json"), "w") as handle:
        json.dump({"world_size": world, "wrapped": type(trainer.model_wrapped).__name__}, handle)


def main(out: str, methods: str) -> None:
    rank = int(os.environ.get("RANK", "0"))
    for method in methods.split(","):
        train_one(out, method, rank)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
