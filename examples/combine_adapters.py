"""Composable sparse fine-tuning: train a "language" and a "task" adapter separately, then add them.

What it shows (Ansell et al., ACL 2022: sparse fine-tunings of one base add like vectors):

* two LIFT adapters trained on the same base on different data: ``language`` on unlabelled text (here the
  questions of the built-in task as plain text, standing in for text of a target language or domain) and ``task``
  on the built-in arithmetic task's prompt-completion pairs; each saved with ``save_pretrained``;
* both loaded onto one fresh base (``PeftModel.from_pretrained(..., adapter_name=...)`` and ``load_adapter``) and
  combined with ``sparse_peft.add_weighted_sparse_adapter(model, ["language", "task"], [1.0, 1.0], "language_task")``:
  a new LIFT adapter with ``ΔW = ΔW_language + ΔW_task`` on the union of their entries;
* the checks: the combined ``ΔW`` equals the sum in every layer, and the combination saved with
  ``save_pretrained(..., selected_adapters=["language_task"])`` reloads on its own onto a fresh base with the same
  logits (exit 1 otherwise).

``combination_type="ties"`` / ``"dare_linear"`` / ``"dare_ties"`` handle adapters that collide;
``sparse_peft.add_sparse_soup`` averages adapters that share one mask.

Run (SmolLM2-135M-Instruct, two adapters of 30 steps of batch 8)::

    python examples/combine_adapters.py [OUTPUT_DIR]

``SPARSE_PEFT_EXAMPLE_TINY=1 python examples/combine_adapters.py`` runs it on a tiny model in seconds.
"""

from __future__ import annotations

from pathlib import Path

import torch
from _tiny import TINY, load_base, output_dir, sft_args, steps
from datasets import Dataset
from peft import get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from trl import SFTTrainer

import sparse_peft
from sparse_peft import PeftModel
from sparse_peft.tasks import arithmetic_problems, arithmetic_task

MAX_STEPS, BATCH_SIZE = steps(30), 2 if TINY else 8


def train_adapter(dataset: Dataset, folder: Path) -> None:
    """Train a LIFT adapter on ``dataset`` from a fresh base and save it to ``folder``."""
    model, tokenizer = load_base()
    config = sparse_peft.LiftConfig(
        r=2 if TINY else 16, filter_rank=4 if TINY else 32, update_interval=1 if TINY else 10, task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, config)
    args = sft_args(folder.parent / f"trainer-{folder.name}", MAX_STEPS, BATCH_SIZE, 1e-2 if TINY else 1e-3)
    callbacks = [sparse_peft.SparsePeftCallback()]
    SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks).train()
    model.save_pretrained(folder)


def main() -> int:
    out = output_dir("combine_adapters")
    n = MAX_STEPS * BATCH_SIZE
    # unlabelled text (language modelling) and the task's prompt-completion pairs, from different problems
    text = Dataset.from_dict({"text": [question for question, _ in arithmetic_problems(n, seed=1)]})
    task, eval_set = arithmetic_task(n_train=n, n_eval=4)
    train_adapter(text, out / "language")
    train_adapter(task, out / "task")

    base, tokenizer = load_base()
    model = PeftModel.from_pretrained(base, out / "language", adapter_name="language")
    model.load_adapter(out / "task", adapter_name="task")
    sparse_peft.add_weighted_sparse_adapter(model, ["language", "task"], [1.0, 1.0], "language_task")
    model.set_adapter("language_task")

    worst = 0.0
    entries = dict.fromkeys(("language", "task", "language_task"), 0)
    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and "language_task" in module.adapter_configs:
            deltas = {name: module.get_delta_weight(name) for name in entries}
            worst = max(worst, (deltas["language_task"] - deltas["language"] - deltas["task"]).abs().max().item())
            for name, delta in deltas.items():
                entries[name] += int((delta != 0).sum())
    print("non-zero entries of ΔW: " + ", ".join(f"{name} {count:,}" for name, count in entries.items()))
    print(f"max |ΔW_language_task - (ΔW_language + ΔW_task)| = {worst:.2e}")

    model.save_pretrained(out / "combined", selected_adapters=["language_task"])  # -> combined/language_task
    reloaded = PeftModel.from_pretrained(load_base()[0], out / "combined" / "language_task")
    texts = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in eval_set]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        diff = (model(**batch).logits - reloaded(**batch).logits).abs().max().item()
    print(f"combined adapter saved to {out / 'combined' / 'language_task'}; reload max |logit difference| = {diff:.2e}")
    if worst > 1e-6 or diff > 1e-4 or entries["language_task"] == 0:
        print("FAILED: the combination is not the sum of the adapters, or it does not reload")
        return 1
    print("OK combine_adapters: language + task added, saved and reloaded")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
