"""bitsandbytes 4-bit and 8-bit bases (both run on CPU with bitsandbytes 0.50)."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import INPUT, quantized_base
from peft import get_peft_model

from sparse_peft import LiftConfig, LiftLinear, refresh_masks

bnb = pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_trains_and_refreshes(base_dir, bits):
    model = get_peft_model(quantized_base(base_dir, bits), LiftConfig(r=2, filter_rank=4, update_interval=1))
    layer = next(m for m in model.modules() if isinstance(m, LiftLinear))
    expected_backend = "Bnb4bitBackend" if bits == 4 else "Bnb8bitBackend"
    assert type(layer.quantization_backend).__name__ == expected_backend
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for step in range(1, 4):
        loss = model(INPUT, labels=INPUT).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        refresh_masks(model, step, optimizer)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert layer.values["default"].abs().sum() > 0


def test_merge_into_quantized_base_warns(base_dir):
    model = get_peft_model(quantized_base(base_dir, 4), LiftConfig(r=2, filter_rank=4, init_weights=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.merge_adapter()
    assert any("lossy" in str(w.message) for w in caught)
    model.unmerge_adapter()


def test_sft_trainer_keeps_adapters_on_a_4bit_base_in_float32(base_dir, tmp_path):
    """TRL casts trainable parameters of quantized models to bfloat16; the callback casts the sparse adapter back to
    float32 before the first step (sub-ULP updates of sparse values would vanish in bfloat16)."""
    from conftest import sft_trainer

    from sparse_peft import SparsePeftCallback

    model = get_peft_model(quantized_base(base_dir, 4), LiftConfig(r=2, filter_rank=4, update_interval=None))
    trainer = sft_trainer(model, tmp_path / "out", [SparsePeftCallback()], max_steps=2, learning_rate=1e-2)
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.bfloat16 for p in trainable)  # TRL's cast, which this test undoes
    trainer.train()
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters() if p.requires_grad)
    layer = next(m for m in trainer.model.modules() if isinstance(m, LiftLinear))
    assert layer.values["default"].abs().sum() > 0


def test_float32_cast_also_casts_a_resumed_optimizer_state(base_dir):
    """On resume the optimizer loads its moments in the parameters' (TRL-cast) bfloat16; the cast back to float32
    takes them along, so AdamW steps on one dtype."""
    from sparse_peft.callbacks import _float32_adapters_on_quantized_bases

    model = get_peft_model(quantized_base(base_dir, 4), LiftConfig(r=2, filter_rank=4, update_interval=None))
    params = [p for p in model.parameters() if p.requires_grad]
    for param in params:
        param.data = param.data.to(torch.bfloat16)  # what TRL does to a quantized model's trainable parameters
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model(INPUT, labels=INPUT).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    assert optimizer.state[params[0]]["exp_avg"].dtype == torch.bfloat16
    assert _float32_adapters_on_quantized_bases(model, optimizer) == len(params)
    for param in params:
        assert param.dtype == torch.float32
        assert all(v.dtype == torch.float32 for v in optimizer.state[param].values() if v.dim() > 0)
    model(INPUT, labels=INPUT).loss.backward()
    optimizer.step()  # one dtype: steps without error
