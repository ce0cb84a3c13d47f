"""Prune a model to 2:4 sparsity, fine-tune it with SPP, merge, and check that the 2:4 pattern survives.

What it shows:

* ``sparse_peft.prune_model(model, sparse_peft.parse_prune_spec("2:4"), batches)``: Wanda pruning (``|W|·‖x‖`` from
  a few calibration prompts) to the 2:4 pattern sparse tensor cores accelerate, in place, with a report;
* SPP (``sparse_peft.SppConfig``), a sparsity-preserving adapter: ``W' = W ⊙ (1 + s·β·α̂)`` can only rescale the
  entries the pruned base kept (``sparse_peft.LorsConfig`` works the same way here, with a masked LoRA);
* ``merge_and_unload()``: the merged model computes what the adapter did, and ``sparse_peft.measure_sparsity``
  confirms 2:4 still holds in every layer and every zero of the pruned base is still zero (exit 1 otherwise).

Run (SmolLM2-135M-Instruct, 40 steps of batch 8)::

    python examples/prune_spp_merge.py [OUTPUT_DIR]

``SPARSE_PEFT_EXAMPLE_TINY=1 python examples/prune_spp_merge.py`` runs it on a tiny model in seconds.
"""

from __future__ import annotations

import torch
from _tiny import TINY, load_base, output_dir, sft_args, steps
from peft import get_peft_model
from trl import SFTTrainer

import sparse_peft
from sparse_peft.prune import zero_sets, zeros_kept
from sparse_peft.tasks import arithmetic_task


def main() -> int:
    out = output_dir("prune_spp_merge")
    max_steps, batch_size = steps(40), 2 if TINY else 8
    train_set, eval_set = arithmetic_task(n_train=max_steps * batch_size, n_eval=4)
    model, tokenizer = load_base()

    # 1. Prune: Wanda needs a few calibration batches (dicts of model inputs, unpadded).
    prompts = [
        tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        for row in train_set.select(range(4 if TINY else 16))
    ]
    batches = [dict(tokenizer(text, return_tensors="pt", add_special_tokens=False)) for text in prompts]
    spec = sparse_peft.parse_prune_spec("2:4")  # = "wanda:2:4"; "magnitude:2:4" needs no batches
    report = sparse_peft.prune_model(model, spec, batches)
    print(f"pruned {spec}: {report}")
    pruned_zeros = zero_sets(model)  # weight == 0 of every pruned layer, to compare after the merge

    # 2. Fine-tune the pruned model with SPP.
    config = sparse_peft.SppConfig(groups=4 if TINY else 16, scaling=2.0, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    args = sft_args(out / "trainer", max_steps, batch_size, 2e-2 if TINY else 4e-3)
    # SPP has no schedule; the callback is harmless here and runs LoRS's gradient init if you switch to LorsConfig.
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        processing_class=tokenizer,
        callbacks=[sparse_peft.SparsePeftCallback()],
    )
    trainer.train()
    model.save_pretrained(out / "adapter")

    # 3. Merge and check the pattern.
    texts = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in eval_set]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    model.eval()
    with torch.no_grad():
        adapted = model(**batch).logits
        with model.disable_adapter():
            moved = (adapted - model(**batch).logits).abs().max().item()
    print(f"the trained adapter moves the logits by up to {moved:.2e}")
    merged = model.merge_and_unload()
    with torch.no_grad():
        diff = (merged(**batch).logits - adapted).abs().max().item()
    after = sparse_peft.measure_sparsity(merged, n_m=(2, 4))
    kept = zeros_kept(pruned_zeros, merged)
    print(f"after merge_and_unload: {after}")
    print(f"every zero of the pruned base kept: {kept}")
    print(f"merged vs adapter: max |logit difference| = {diff:.2e}")
    if not (after.nm_holds and kept) or diff > 1e-3 or moved == 0:
        print("FAILED: nothing trained, or the merge broke the 2:4 pattern or changed the outputs")
        return 1
    print("OK prune_spp_merge: 2:4 holds after training and merging")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
