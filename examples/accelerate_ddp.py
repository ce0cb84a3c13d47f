"""Distributed data-parallel training with ``accelerate launch``: two processes, one sparse adapter, identical ranks.

What it shows:

* an ordinary ``SFTTrainer`` script with a SpIEL adapter (a fixed-size sparse delta whose entries are dropped and
  regrown during training) and ``sparse_peft.SparsePeftCallback()``, launched as two processes; each process trains
  on its own shard of the built-in arithmetic task;
* the statistics behind every mask decision are all-reduced on a process group of their own, so both ranks choose
  the same entries: at the end the script compares a digest of every adapter tensor (values **and** indices)
  across ranks and exits with 1 if they differ. It also reports how many entries changed since the start;
* ``trainer.save_model`` writes the adapter once (main process).

Run (SmolLM2-135M-Instruct, 40 steps of batch 4 per process; on a CPU, both processes share its cores)::

    accelerate launch --config_file examples/accelerate_config.yaml examples/accelerate_ddp.py [OUTPUT_DIR]

``SPARSE_PEFT_EXAMPLE_TINY=1`` runs it on a tiny model in seconds. Without GPUs the processes run on the CPU over gloo
(``use_cpu=True`` below); the same command on a machine with two GPUs trains one process per GPU.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from _tiny import TINY, load_base, output_dir, steps
from peft import get_peft_model, get_peft_model_state_dict
from trl import SFTConfig, SFTTrainer

import sparse_peft
from sparse_peft.tasks import arithmetic_task


def digest(state: dict[str, torch.Tensor]) -> str:
    """A SHA-256 over every tensor of an adapter state dict, in key order."""
    hasher = hashlib.sha256()
    for key in sorted(state):
        hasher.update(key.encode())
        hasher.update(state[key].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def indices(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in get_peft_model_state_dict(model).items() if k.endswith("indices")}


def main() -> int:
    out = output_dir("accelerate_ddp")
    max_steps, batch_size = steps(40), 2 if TINY else 4
    train_set, _ = arithmetic_task(n_train=4 * max_steps * batch_size, n_eval=0)
    model, tokenizer = load_base()
    config = sparse_peft.SpielConfig(
        **({"density": 0.1} if TINY else {"r": 16}),  # r: LoRA r=16's budget, (m + n)·16 entries per matrix
        reselection_steps=2 if TINY else 20,  # drop-and-regrow every R optimizer steps ...
        window_steps=1 if TINY else 5,  # ... from gradient statistics of the S steps before
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    start = indices(model)

    args = SFTConfig(
        output_dir=str(out / "trainer"),
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=1e-2 if TINY else 1e-3,
        logging_steps=1 if TINY else 10,
        max_length=256 if TINY else 128,
        save_strategy="no",
        report_to=[],
        seed=0,
        use_cpu=not torch.cuda.is_available(),  # on CPUs: gloo between the processes
        bf16=False,
        activation_checkpointing=False,
        disable_tqdm=TINY,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        processing_class=tokenizer,
        callbacks=[sparse_peft.SparsePeftCallback()],
    )
    trainer.train()

    state = get_peft_model_state_dict(model)
    mine = digest(state)
    world = dist.get_world_size() if dist.is_initialized() else 1
    digests = [mine] * world
    if world > 1:
        dist.all_gather_object(digests, mine)
    moved = sum(int((state[k] != start[k]).sum()) for k in start)
    trainer.save_model(str(out / "adapter"))  # the main process writes, the others wait

    if trainer.accelerator.is_main_process:
        print(f"processes: {world}, wrapped as {type(trainer.model_wrapped).__name__}")
        print(f"SpIEL entries moved since the start: {moved:,} of {sum(v.numel() for v in start.values()):,}")
        for rank, value in enumerate(digests):
            print(f"rank {rank}: adapter digest {value[:16]}")
        print(f"adapter saved to {out / 'adapter'}")
    if len(set(digests)) != 1:
        print("FAILED: the ranks ended with different adapters")
        return 1
    if trainer.accelerator.is_main_process:
        print(f"OK accelerate_ddp: {world} processes ended with identical adapters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
