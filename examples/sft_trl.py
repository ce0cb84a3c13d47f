"""Supervised fine-tuning with TRL's SFTTrainer and a sparse method (LIFT), then save and reload the adapter.

What it shows:

* ``get_peft_model(model, sparse_peft.LiftConfig(...))``: LIFT trains the principal weights of every linear layer at
  LoRA r=16's budget;
* TRL's ``SFTTrainer`` on the built-in arithmetic task (``sparse_peft.tasks.arithmetic_task``, conversational
  prompt-completion rows), with ``sparse_peft.SparsePeftCallback()``, which runs LIFT's mask refreshes between
  optimizer steps (without it the first mask never changes);
* exact match on a few held-out problems before and after training;
* ``save_pretrained`` and ``PeftModel.from_pretrained`` onto a freshly loaded base: the reloaded model must give the
  trained model's logits (the script exits with 1 otherwise).

Run (SmolLM2-135M-Instruct, 60 steps of batch 8; a few minutes on a laptop CPU)::

    python examples/sft_trl.py [OUTPUT_DIR]

``SPARSE_PEFT_EXAMPLE_TINY=1 python examples/sft_trl.py`` runs it on a tiny model in seconds.
"""

from __future__ import annotations

import torch
from _tiny import TINY, load_base, output_dir, steps
from datasets import Dataset
from peft import get_peft_model
from transformers import PreTrainedTokenizerBase
from trl import SFTConfig, SFTTrainer

import sparse_peft
from sparse_peft import PeftModel
from sparse_peft.tasks import arithmetic_task, evaluate_exact_match


def prompt_batch(tokenizer: PreTrainedTokenizerBase, dataset: Dataset, n: int = 4) -> dict[str, torch.Tensor]:
    """A padded batch of ``n`` chat-templated prompts, to compare logits."""
    texts = [
        tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False) for row in dataset
    ]
    return dict(tokenizer(texts[:n], return_tensors="pt", padding=True, add_special_tokens=False))


def main() -> int:
    out = output_dir("sft_trl")
    max_steps, batch_size = steps(60), 2 if TINY else 8
    train_set, eval_set = arithmetic_task(n_train=max_steps * batch_size, n_eval=4 if TINY else 20)

    model, tokenizer = load_base()
    before = evaluate_exact_match(model, tokenizer, eval_set)["exact_match"]

    config = sparse_peft.LiftConfig(
        r=2 if TINY else 16,  # LoRA r=16's budget: (m + n)·16 entries per matrix
        filter_rank=4 if TINY else 32,
        update_interval=1 if TINY else 20,  # refresh the mask every this many optimizer steps
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    model.print_trainable_parameters()

    args = SFTConfig(
        output_dir=str(out / "trainer"),
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=1e-2 if TINY else 1e-3,
        lr_scheduler_type="linear",
        logging_steps=1 if TINY else 10,
        max_length=256 if TINY else 128,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        bf16=False,  # TRL's default is bf16, which CPUs refuse
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
    losses = [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]
    after = evaluate_exact_match(model, tokenizer, eval_set)["exact_match"]
    print(f"losses: {losses}")
    print(f"exact match on {len(eval_set)} eval problems: {before:.0%} before, {after:.0%} after")

    adapter_dir = out / "adapter"
    model.save_pretrained(adapter_dir)  # adapter_config.json + adapter_model.safetensors
    print(f"adapter saved to {adapter_dir}")

    fresh_base, _ = load_base()
    reloaded = PeftModel.from_pretrained(fresh_base, adapter_dir)
    batch = prompt_batch(tokenizer, eval_set)
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        diff = (model(**batch).logits - reloaded(**batch).logits).abs().max().item()
    print(f"reload: max |logit difference| = {diff:.2e}")
    if diff > 1e-4:
        print("FAILED: the reloaded adapter does not reproduce the trained model")
        return 1
    print("OK sft_trl: trained, saved and reloaded exactly")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
