"""DPO through TRL's DPOTrainer: the first loss is ln 2 for every method, also with a pre-wrapped PeftModel."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import char_tokenizer, cpu_args
from helpers_tasks import tiny_chat_model
from method_configs import TINY_CONFIGS, tiny_config
from peft import get_peft_model
from trl import DPOConfig, DPOTrainer

import sparse_peft
from sparse_peft import SparsePeftCallback
from sparse_peft.dpo import sync_reference_adapter
from sparse_peft.tasks import preference_task


def dpo_first_loss(tmp_path, model, peft_config=None, callbacks=None) -> float:
    train, _ = preference_task(n_train=4, n_eval=0)
    args = cpu_args(
        DPOConfig,
        tmp_path,
        max_steps=1,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        max_length=256,
        activation_checkpointing=False,
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=train,
        processing_class=char_tokenizer(),
        peft_config=peft_config,
        callbacks=callbacks,
    )
    trainer.train()
    return next(h["loss"] for h in trainer.state.log_history if "loss" in h)


IDENTITY_METHODS = sorted(m for m in TINY_CONFIGS if sparse_peft.METHODS[m][0].identity_at_init)


@pytest.mark.parametrize("method", IDENTITY_METHODS)
def test_first_dpo_loss_is_ln2_with_peft_config(tmp_path, method):
    """TRL's reference is the model with the adapter disabled; a fresh adapter is the identity, so policy = ref."""
    loss = dpo_first_loss(tmp_path, tiny_chat_model(), tiny_config(method), [SparsePeftCallback()])
    assert loss == pytest.approx(math.log(2), abs=1e-6)


def test_snell_is_not_the_identity_at_init():
    """SNELL has no trainable identity point, so DPO must use a wrapped model (reference = frozen copy)."""
    assert not sparse_peft.SnellConfig.identity_at_init
    model = get_peft_model(tiny_chat_model(), tiny_config("snell"))
    with torch.no_grad(), model.disable_adapter():
        base = model(torch.tensor([[5, 6, 7]])).logits
    assert not torch.equal(model(torch.tensor([[5, 6, 7]])).logits, base)


def _pretrained_adapter(method: str):
    """A wrapped model whose adapter is not the identity (as if trained before): values perturbed after wrapping."""
    model = get_peft_model(tiny_chat_model(), tiny_config(method))
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.5 * torch.randn_like(param))
    if method == "diff_pruning":  # a trained diff-pruning adapter is projected (stage 3); stage 1 samples its gates
        model.base_model.project()
    return model


@pytest.mark.parametrize("method", sorted(TINY_CONFIGS))
def test_first_dpo_loss_is_ln2_with_wrapped_model(tmp_path, method):
    loss = dpo_first_loss(tmp_path, _pretrained_adapter(method), callbacks=[SparsePeftCallback()])
    assert loss == pytest.approx(math.log(2), abs=1e-6)


def test_without_the_sync_the_reference_differs(tmp_path):
    """TRL alone copies only parameters named ``*.default.*``: the reference adapter misses the sparse values."""
    loss = dpo_first_loss(tmp_path, _pretrained_adapter("lift"))
    assert abs(loss - math.log(2)) > 1e-3


def test_sync_copies_values_and_indices():
    model = _pretrained_adapter("lift")
    model.add_adapter("ref", model.peft_config["default"])
    layer = next(m for m in model.modules() if hasattr(m, "adapter_configs"))
    layer.indices["ref"].copy_(torch.flip(layer.indices["ref"], [0]))
    assert sync_reference_adapter(model) > 0
    assert torch.equal(layer.indices["ref"], layer.indices["default"])
    assert torch.equal(layer.values["ref"], layer.values["default"])
    assert not layer.values["ref"].requires_grad
