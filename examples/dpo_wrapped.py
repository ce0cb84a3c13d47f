"""DPO on a model that is already wrapped: a sparse adapter trained by SFT, then improved with TRL's DPOTrainer.

What it shows:

* a LIFT adapter trained first with ``SFTTrainer`` on the built-in arithmetic task (any already trained adapter,
  e.g. one loaded with ``PeftModel.from_pretrained(..., is_trainable=True)``, is the same case);
* ``DPOTrainer`` given that ``PeftModel`` and no ``peft_config`` on the built-in preference pairs
  (``sparse_peft.tasks.preference_task``: the right answer chosen, a wrong one rejected). TRL then adds an adapter
  ``"ref"`` as the reference model and copies only parameters named ``*.default.*`` into it, which misses sparse
  values and index buffers; ``sparse_peft.SparsePeftCallback()`` copies all of them at the start of training
  (``sparse_peft.dpo.sync_reference_adapter`` does it by hand);
* the checks: the first DPO loss is ln 2 (policy = reference), and after training the ``"ref"`` adapter still holds
  exactly the SFT adapter (the script exits with 1 otherwise). The trained adapter is saved.

Run (SmolLM2-135M-Instruct: 30 SFT steps, then 30 DPO steps; several minutes on a CPU)::

    python examples/dpo_wrapped.py [OUTPUT_DIR]

``SPARSE_PEFT_EXAMPLE_TINY=1 python examples/dpo_wrapped.py`` runs it on a tiny model in seconds.
"""

from __future__ import annotations

import math

import torch
from _tiny import TINY, load_base, output_dir, steps
from peft import get_peft_model, get_peft_model_state_dict
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

import sparse_peft
from sparse_peft.tasks import arithmetic_task, preference_task

CPU_SETTINGS = {"use_cpu": not torch.cuda.is_available(), "bf16": False, "activation_checkpointing": False}


def main() -> int:
    out = output_dir("dpo_wrapped")
    max_steps, batch_size = steps(30), 2 if TINY else 8
    max_length = 256 if TINY else 128
    lr = 1e-2 if TINY else 1e-3
    model, tokenizer = load_base()
    config = sparse_peft.LiftConfig(
        r=2 if TINY else 16, filter_rank=4 if TINY else 32, update_interval=1 if TINY else 10, task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, config)  # the model is wrapped before DPO sees it

    # 1. SFT: the adapter learns the task (the preference pairs below use other problems than these).
    sft_set, _ = arithmetic_task(n_train=max_steps * batch_size, n_eval=0, seed=1)
    sft = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(out / "sft"), max_steps=max_steps, per_device_train_batch_size=batch_size,
            learning_rate=lr, max_length=max_length, logging_steps=10, save_strategy="no", report_to=[],
            disable_tqdm=TINY, **CPU_SETTINGS,
        ),
        train_dataset=sft_set,
        processing_class=tokenizer,
        callbacks=[sparse_peft.SparsePeftCallback()],
    )  # fmt: skip
    sft.train()
    sft_adapter = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}

    # 2. DPO on the wrapped model: TRL adds adapter "ref", the callback makes it an exact copy of "default".
    pairs, _ = preference_task(n_train=max_steps * batch_size, n_eval=0)
    dpo = DPOTrainer(
        model=model,
        args=DPOConfig(
            output_dir=str(out / "dpo"), max_steps=max_steps, per_device_train_batch_size=batch_size,
            learning_rate=lr / 2, max_length=max_length, logging_steps=1, save_strategy="no", report_to=[],
            disable_tqdm=TINY, **CPU_SETTINGS,
        ),
        train_dataset=pairs,
        processing_class=tokenizer,
        callbacks=[sparse_peft.SparsePeftCallback()],
    )  # fmt: skip
    dpo.train()
    logs = [h for h in dpo.state.log_history if "loss" in h]
    first_loss = logs[0]["loss"]
    print(f"adapters: {sorted(model.peft_config)}")
    print(f"first DPO loss {first_loss:.6f} (ln 2 = {math.log(2):.6f}), last {logs[-1]['loss']:.4f}")
    margins = [h["rewards/margins"] for h in logs if "rewards/margins" in h]
    if margins:
        print(f"reward margin (chosen - rejected): first {margins[0]:.4f}, last {margins[-1]:.4f}")

    ref_adapter = get_peft_model_state_dict(model, adapter_name="ref")
    ref_is_sft = ref_adapter.keys() == sft_adapter.keys() and all(
        torch.equal(ref_adapter[k], sft_adapter[k]) for k in sft_adapter
    )
    print(f"reference adapter 'ref' equals the SFT adapter: {ref_is_sft}")

    adapter_dir = out / "adapter"
    model.save_pretrained(adapter_dir, selected_adapters=["default"])
    print(f"DPO-trained adapter saved to {adapter_dir}")
    if abs(first_loss - math.log(2)) > 1e-4 or not ref_is_sft:
        print("FAILED: the reference adapter is not a copy of the adapter DPO started from")
        return 1
    print("OK dpo_wrapped: the reference adapter was an exact copy (first loss ln 2) and stayed frozen")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
