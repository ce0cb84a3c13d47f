"""QLoRA-style training: a sparse method (RoSA) on a bitsandbytes 4-bit NF4 base.

What it shows:

* loading the base in 4 bits: ``AutoModelForCausalLM.from_pretrained(..., quantization_config=BitsAndBytesConfig(
  load_in_4bit=True, bnb_4bit_quant_type="nf4", ...))`` (here from a ``save_pretrained`` copy of the float model;
  a Hub id works the same way). The frozen base stays in NF4; sparse_peft dequantizes one layer at a time, only
  transiently;
* RoSA (LoRA + a sparse delta whose mask comes from gradient statistics collected after a LoRA warm-up) trained with
  ``SFTTrainer`` and ``sparse_peft.SparsePeftCallback()``, the sparse values at their own, lower learning rate
  (``sparse_peft.use_rosa_learning_rates``). ``SFTTrainer`` casts the adapter of a quantized model to bfloat16;
  ``SparsePeftCallback`` casts it back to float32 when training starts, so small updates of the sparse values are
  not rounded away;
* the adapter saved, and reloaded onto a freshly quantized base: every adapter tensor must come back exactly (exit 1
  otherwise). The logits are compared too, strictly on GPUs and on the tiny model; on CPUs, bitsandbytes 0.50 is
  known to give a real-size 4-bit model other base outputs after training through ``Trainer`` (README, *Quantized
  bases*), so there the logit difference is only printed.

Merging into a 4-bit base re-quantizes and is lossy: to merge, load the base unquantized and merge there
(``examples/convert_to_lora.py`` shows the merged-weights path).

Run (SmolLM2-135M-Instruct in NF4, 40 steps of batch 8: LoRA only for 20 steps, 4 steps of gradient collection, then
LoRA + sparse; needs ``bitsandbytes``)::

    python examples/qlora_4bit.py [OUTPUT_DIR]

``SPARSE_PEFT_EXAMPLE_TINY=1 python examples/qlora_4bit.py`` runs it on a tiny model in seconds.
"""

from __future__ import annotations

import tempfile

import torch
from _tiny import TINY, load_base, output_dir, sft_args, steps
from peft import get_peft_model, get_peft_model_state_dict
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from trl import SFTTrainer

import sparse_peft
from sparse_peft import PeftModel
from sparse_peft.tasks import arithmetic_task


def load_4bit(folder: str) -> torch.nn.Module:
    """The model saved in ``folder`` with its linear layers in bitsandbytes NF4 (float32 compute)."""
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quantization, device_map=device, dtype=torch.float32
    )


def main() -> int:
    import bitsandbytes as bnb

    out = output_dir("qlora_4bit")
    max_steps, batch_size = steps(40, tiny=3), 2 if TINY else 8
    # the schedule follows the run's length, so a shortened run (SPARSE_PEFT_EXAMPLE_STEPS) trains the sparse part too
    warmup, window = (1, 1) if TINY else (max(1, max_steps // 2), max(1, min(4, max_steps // 10)))
    train_set, eval_set = arithmetic_task(n_train=max_steps * batch_size, n_eval=4)
    float_model, tokenizer = load_base()
    base_folder = tempfile.TemporaryDirectory(prefix="qlora-base-")
    float_model.save_pretrained(base_folder.name)
    del float_model
    model = load_4bit(base_folder.name)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    print(f"base: {len(quantized)} linear layers in 4 bits ({quantized[0].weight.quant_type})")

    config = sparse_peft.RosaConfig(
        r=2 if TINY else 8,
        lora_alpha=4 if TINY else 16,
        density=0.05 if TINY else 0.02,  # the sparse delta: this fraction of every matrix
        schedule=f"wl{warmup}",  # LoRA alone for the first N steps (40 steps: N = 20) ...
        window_steps=window,  # ... then N..N+G: gradient statistics that choose the sparse mask (G = 4)
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    args = sft_args(out / "trainer", max_steps, batch_size, 1e-2 if TINY else 1e-3, max(1, min(10, max_steps // 4)))
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        processing_class=tokenizer,
        callbacks=[sparse_peft.SparsePeftCallback()],
    )
    sparse_peft.use_rosa_learning_rates(trainer, sparse_lr=1e-3 if TINY else 1e-4)  # LoRA at args.learning_rate
    trainer.train()
    losses = [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]
    print(f"losses: {losses}")
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    sparse_trained = sum(int((v != 0).sum()) for k, v in state.items() if k.endswith("rosa_values"))
    print(f"sparse values trained after the mask was chosen: {sparse_trained:,}")

    adapter_dir = out / "adapter"
    model.save_pretrained(adapter_dir)
    reloaded = PeftModel.from_pretrained(load_4bit(base_folder.name), adapter_dir)
    again = get_peft_model_state_dict(reloaded)
    same = state.keys() == again.keys() and all(
        state[k].dtype == again[k].dtype and torch.equal(state[k], again[k].to(state[k].device)) for k in state
    )
    print(f"reload onto a fresh 4-bit base: every adapter tensor equal: {same}")

    texts = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in eval_set]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        diff = (model(**batch).logits - reloaded(**batch).logits).abs().max().item()
    strict = torch.cuda.is_available() or TINY  # see the module docstring for real-size 4-bit models on CPUs
    print(f"reload: max |logit difference| = {diff:.2e}" + ("" if strict else " (not checked on CPU, see above)"))
    base_folder.cleanup()
    if not same or sparse_trained == 0 or (strict and diff > 1e-4):
        print("FAILED: the sparse part did not train, or the reloaded adapter differs")
        return 1
    print("OK qlora_4bit: RoSA trained on an NF4 base and reloaded exactly")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
