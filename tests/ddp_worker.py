"""Worker for the 2-process DDP test: ``accelerate launch --multi_gpu --num_processes 2 tests/ddp_worker.py OUT``.

Each rank trains the same tiny Llama on its own shard of the data (so local gradients differ), then writes its
adapter state and a log of the masks after every step; the test checks that the ranks agree.
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
from trl import SFTConfig, SFTTrainer

import sparse_peft

TEXTS = [f"sample {i}: " + "abcdefghij"[i % 10] * (3 + i % 5) for i in range(32)]


def main(out: str, method: str) -> None:
    rank = int(os.environ.get("RANK", "0"))
    if method == "spiel":
        config = sparse_peft.SpielConfig(density=0.1, reselection_steps=3, selection_accumulation_steps=2)
    else:
        config = sparse_peft.LiftConfig(rank=2, filter_rank=4, update_interval=2)
    args = SFTConfig(
        output_dir=os.path.join(out, f"trainer-{rank}"),
        max_steps=6,
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
        peft_config=config,
        callbacks=[sparse_peft.SparsePeftCallback()],
    )
    trainer.train()
    state = {k: v.contiguous() for k, v in get_peft_model_state_dict(trainer.model).items()}
    save_file(state, os.path.join(out, f"rank{rank}.safetensors"))
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump({"world_size": world, "wrapped": type(trainer.model_wrapped).__name__}, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "spiel")
