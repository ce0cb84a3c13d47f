"""Serving a trained sparse adapter: convert it to a LoRA, or merge it into the weights.

What it shows:

* a LIFT adapter trained with ``SFTTrainer`` on the built-in arithmetic task;
* PEFT's own ``peft.tuners.lora.conversion.convert_to_lora(model, rank)`` (``ΔW ≈ B·A`` by truncated SVD): the
  relative reconstruction error ``‖ΔW − B·A‖_F / ‖ΔW‖_F`` over all layers, by rank. A trained sparse ``ΔW`` has high
  rank, so the conversion is lossy at usual LoRA ranks: validate the converted adapter before serving it;
* ``save_as_lora(path, model, rank)`` writes an ordinary LoRA adapter that any LoRA-only tool loads (here
  ``PeftModel.from_pretrained`` with no ``import sparse_peft`` needed for it); its logits are compared with the
  sparse adapter's;
* the exact serving path: ``merge_and_unload()`` then ``save_pretrained`` gives a plain transformers model, reloaded
  with ``AutoModelForCausalLM.from_pretrained``.

Checks (exit 1 otherwise): the error falls as the rank grows, the LoRA is closer to the sparse adapter than the base
is, and the merged model reproduces the adapter's logits.

Run (SmolLM2-135M-Instruct, 30 steps of batch 8; the merged model is a 540 MB float32 copy)::

    python examples/convert_to_lora.py [OUTPUT_DIR]

``SPARSE_PEFT_EXAMPLE_TINY=1 python examples/convert_to_lora.py`` runs it on a tiny model in seconds.
"""

from __future__ import annotations

import itertools
import math

import torch
from _tiny import TINY, load_base, output_dir, sft_args, steps
from peft import get_peft_model
from peft.tuners.lora.conversion import convert_to_lora, save_as_lora
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import AutoModelForCausalLM
from trl import SFTTrainer

import sparse_peft
from sparse_peft import PeftModel
from sparse_peft.tasks import arithmetic_task

RANKS = (2, 8, 32) if TINY else (8, 32, 64, 128)  # at most the smallest matrix side (k, v: 32 tiny, 192 real)
SERVE_RANK = 32 if TINY else 64


def relative_error(model: torch.nn.Module, lora_state: dict[str, torch.Tensor]) -> float:
    """``sqrt(Σ_l ‖ΔW_l − B_l·A_l‖² / Σ_l ‖ΔW_l‖²)`` over every adapted layer ``l``."""
    error = total = 0.0
    for name, layer in model.named_modules():
        if isinstance(layer, BaseTunerLayer):
            delta = layer.get_delta_weight("default").float()
            approx = lora_state[f"{name}.lora_B.weight"].float() @ lora_state[f"{name}.lora_A.weight"].float()
            error += float(torch.linalg.norm(delta - approx.to(delta.device))) ** 2
            total += float(torch.linalg.norm(delta)) ** 2
    return math.sqrt(error / total)


def main() -> int:
    out = output_dir("convert_to_lora")
    max_steps, batch_size = steps(30), 2 if TINY else 8
    train_set, eval_set = arithmetic_task(n_train=max_steps * batch_size, n_eval=4)
    model, tokenizer = load_base()
    config = sparse_peft.LiftConfig(
        r=2 if TINY else 16, filter_rank=4 if TINY else 32, update_interval=1 if TINY else 10, task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, config)
    args = sft_args(out / "trainer", max_steps, batch_size, 1e-2 if TINY else 1e-3)
    callbacks = [sparse_peft.SparsePeftCallback()]
    SFTTrainer(model=model, args=args, train_dataset=train_set, processing_class=tokenizer, callbacks=callbacks).train()
    model.eval()

    texts = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in eval_set]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    with torch.no_grad():
        sparse_logits = model(**batch).logits
        with model.disable_adapter():
            base_gap = (model(**batch).logits - sparse_logits).abs().max().item()

    # 1. To LoRA: the reconstruction error by rank, then a LoRA adapter on disk.
    errors = [relative_error(model, convert_to_lora(model, rank)[1]) for rank in RANKS]
    for rank, error in zip(RANKS, errors, strict=True):
        print(f"LoRA rank {rank:>4}: relative error of ΔW {error:.4f}")
    save_as_lora(out / "lora", model, rank=SERVE_RANK)
    lora = PeftModel.from_pretrained(load_base()[0], out / "lora").eval()  # a plain LoRA adapter
    with torch.no_grad():
        lora_gap = (lora(**batch).logits - sparse_logits).abs().max().item()
    print(
        f"rank-{SERVE_RANK} LoRA saved to {out / 'lora'}: max |logit difference| to the sparse adapter {lora_gap:.2e}"
    )
    print(f"(the base without any adapter differs from it by {base_gap:.2e})")

    # 2. Merged weights: exact, and a plain transformers model.
    merged = model.merge_and_unload()
    merged.save_pretrained(out / "merged")
    tokenizer.save_pretrained(out / "merged")
    served = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        merged_gap = (served(**batch).logits - sparse_logits).abs().max().item()
    print(f"merged model saved to {out / 'merged'}: max |logit difference| to the sparse adapter {merged_gap:.2e}")

    falling = all(a > b for a, b in itertools.pairwise(errors))
    if not falling or lora_gap >= base_gap or merged_gap > 1e-4:
        print("FAILED: the LoRA error does not fall with rank, the LoRA misses the adapter, or the merge differs")
        return 1
    print("OK convert_to_lora: LoRA conversion measured, merged model reproduces the adapter")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
