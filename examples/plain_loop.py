"""A plain PyTorch training loop (no Trainer): the three schedule hooks, and the calibration pass for SMT.

What it shows:

* **SpIEL** (entries dropped and regrown during training) in a hand-written loop. Without a ``Trainer`` nothing
  runs ``sparse_peft.SparsePeftCallback``, so the loop calls its three hooks itself::

      sparse_peft.begin_step(model, step)                          # before the step's forward/backward passes
      sparse_peft.before_optimizer_step(model, optimizer=optimizer)  # gradients final (clipped), before .step()
      optimizer.step(); optimizer.zero_grad()
      sparse_peft.refresh_masks(model, step, optimizer)            # after the step: mask changes that are due

  (``step`` counts optimizer steps from 1). ``refresh_masks`` returns how many slots moved; the Adam moments move
  with their slots.
* **SMT** (top blocks of ``q``, ``k``, ``v`` by gradient) with its blocks chosen by
  ``sparse_peft.calibrate(model, batches)`` on a few batches *before the optimizer exists*: SMT sizes its block
  storage to the chosen blocks, so the trainable count is exactly ``num_blocks · block_size²``. The same three hooks
  then run in its loop (they do nothing for SMT once its blocks are chosen, so one loop serves every method).

The script exits with 1 if no SpIEL slot moved, or SMT's trainable count is not its budget.

Run (SmolLM2-135M-Instruct: 40 SpIEL steps, then SMT calibrated on 160 examples and 20 steps, batch 8)::

    python examples/plain_loop.py

``SPARSE_PEFT_EXAMPLE_TINY=1 python examples/plain_loop.py`` runs it on a tiny model in seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from _tiny import TINY, load_base, steps
from peft import get_peft_model
from transformers import PreTrainedTokenizerBase

import sparse_peft
from sparse_peft.tasks import arithmetic_task

BATCH_SIZE = 2 if TINY else 8
MAX_LENGTH = 256 if TINY else 128


def batches(
    tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]], batch_size: int = BATCH_SIZE
) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches of chat-formatted prompt + answer; the loss is on the answer tokens only."""
    for start in range(0, len(rows) - batch_size + 1, batch_size):
        ids, labels = [], []
        for row in rows[start : start + batch_size]:
            prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
            full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
            n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            tokens = tokenizer(full, add_special_tokens=False)["input_ids"][:MAX_LENGTH]
            ids.append(tokens)
            labels.append([-100] * n_prompt + tokens[n_prompt:])
        width = max(len(t) for t in ids)
        pad = tokenizer.pad_token_id
        yield {
            "input_ids": torch.tensor([t + [pad] * (width - len(t)) for t in ids]),
            "attention_mask": torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in ids]),
            "labels": torch.tensor([t + [-100] * (width - len(t)) for t in labels]),
        }


def train(model: torch.nn.Module, data: Iterator[dict[str, torch.Tensor]], max_steps: int, lr: float) -> list[int]:
    """The loop: AdamW over the trainable parameters, gradient clipping, the three hooks; slots moved per step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    moved = []
    for step in range(1, max_steps + 1):
        sparse_peft.begin_step(model, step)
        loss = model(**next(data)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        sparse_peft.before_optimizer_step(model, optimizer=optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        moved.append(sparse_peft.refresh_masks(model, step, optimizer))
        print(f"step {step}: loss {loss.item():.4f}, slots moved {moved[-1]:,}")
    model.eval()
    return moved


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def main() -> int:
    spiel_steps, smt_steps = steps(40), steps(20)
    train_rows, _ = arithmetic_task(n_train=(spiel_steps + smt_steps + 20) * BATCH_SIZE, n_eval=0)
    rows = list(train_rows)

    # 1. SpIEL: drop-and-regrow driven by the hooks.
    model, tokenizer = load_base()
    reselection = 2 if TINY else max(2, spiel_steps // 2)  # 40 steps: R = 20, S = 5 (the paper's defaults)
    spiel = sparse_peft.SpielConfig(
        **({"density": 0.1} if TINY else {"r": 16}),  # r: LoRA r=16's budget, (m + n)·16 entries per matrix
        reselection_steps=reselection,
        window_steps=max(1, reselection // 4),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, spiel)
    print(f"SpIEL: {trainable(model):,} trainable values")
    moved = train(model, batches(tokenizer, rows), spiel_steps, lr=1e-2 if TINY else 1e-3)

    # 2. SMT: blocks chosen by the calibration pass, then the same loop.
    model, _ = load_base()
    window_steps = 1 if TINY else 20
    smt = sparse_peft.SmtConfig(
        block_size=16 if TINY else 64,
        num_blocks=4 if TINY else 330,
        window_steps=window_steps,  # also the calibration pass's size: window_steps batches
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, smt)
    data = batches(tokenizer, rows[spiel_steps * BATCH_SIZE :])
    calibration = [next(data) for _ in range(window_steps)]
    model.train()
    chosen = sparse_peft.calibrate(model, calibration)  # before the optimizer: storage is resized to the blocks
    budget = smt.num_blocks * smt.block_size**2
    print(f"SMT calibrated on {window_steps * BATCH_SIZE} examples: {chosen}; trainable {trainable(model):,}")
    train(model, data, smt_steps, lr=1e-2 if TINY else 1e-3)

    print(f"SpIEL slots moved in total: {sum(moved):,}; SMT trainable {trainable(model):,} = budget {budget:,}")
    if sum(moved) == 0 or trainable(model) != budget:
        print("FAILED: SpIEL's mask never moved, or SMT does not train exactly its budget")
        return 1
    print("OK plain_loop: hooks drove SpIEL's mask, calibration chose SMT's blocks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
