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
from conftest import char_tokenizer, tiny_llama
from method_configs import ddp_config
from trl import SFTConfig, SFTTrainer

import sparse_peft

TEXTS = [f"sample {i}: " + "abcdefghij"[i % 10] * (3 + i % 5) for i in range(32)]
STEPS = 6


def train_one(out: str, method: str, rank: int) -> None:
    args = SFTConfig(
        output_dir=os.path.join(out, f"trainer-{method}-{rank}"),
        max_steps=STEPS,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=2e-2,
        report_to=[],
        save_strategy="no",
        max_length=32,
        use_cpu=True,
        seed=0,
        activation_checkpointing=False,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=tiny_llama(),
        args=args,
        train_dataset=Dataset.from_dict({"text": TEXTS}),
        processing_class=char_tokenizer(),
        peft_config=ddp_config(method),
        callbacks=[sparse_peft.SparsePeftCallback()],
    )
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
