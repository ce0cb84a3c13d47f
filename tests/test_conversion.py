"""PEFT's ``convert_to_lora`` / ``save_as_lora`` on sparse_peft adapters: ``ΔW ≈ B·A`` by truncated SVD."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import INPUT, tiny_llama
from method_configs import PRUNED_BASE, TINY_CONFIGS, prepare_base, tiny_config
from peft import PeftModel, get_peft_model
from peft.tuners.lora.conversion import convert_to_lora, save_as_lora
from peft.tuners.tuners_utils import BaseTunerLayer
from test_all_methods import train_steps

from sparse_peft import LiftConfig

#: Every method here is additive, ``W' = W + ΔW`` (SPP's ``W̃ ⊙ (1 + s·β·α̂)`` is ``W̃ + W̃ ⊙ s·β·α̂``).
ADDITIVE = sorted(TINY_CONFIGS)


def adapted(model) -> dict[str, BaseTunerLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def lora_delta(state_dict: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return state_dict[f"{name}.lora_B.weight"] @ state_dict[f"{name}.lora_A.weight"]


def relative_errors(model, state_dict: dict[str, torch.Tensor], adapter: str = "default") -> tuple[float, float]:
    """``sqrt(Σ_l ‖ΔW_l − B_l A_l‖² / Σ_l ‖ΔW_l‖²)`` over the layers, and the largest per-layer relative error."""
    error, total, worst = 0.0, 0.0, 0.0
    for name, layer in adapted(model).items():
        delta = layer.get_delta_weight(adapter).float()
        layer_error = float(torch.linalg.norm(delta - lora_delta(state_dict, name)))
        layer_norm = float(torch.linalg.norm(delta))
        error, total = error + layer_error**2, total + layer_norm**2
        worst = max(worst, layer_error / layer_norm if layer_norm else layer_error)
    assert total > 0, "the adapter's ΔW is zero everywhere: nothing was trained"
    return math.sqrt(error / total), worst


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT).logits


@pytest.fixture(scope="module")
def lift_model():
    model = get_peft_model(tiny_llama(), tiny_config("lift"))
    train_steps(model, steps=4)  # with LIFT's refreshes: the delta has frozen entries too
    return model.eval()


def test_reconstruction_error_decreases_with_rank(lift_model):
    ranks = (2, 4, 8, 16, 32)  # 32 is the full rank of the 32 x 64 k / v projections
    errors = [relative_errors(lift_model, convert_to_lora(lift_model, rank)[1])[0] for rank in ranks]
    print("\nLIFT ΔW, relative Frobenius error of the LoRA by rank: " + ", ".join(f"{e:.4f}" for e in errors))
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    assert errors[0] > 0.1  # a trained sparse delta is far from rank 2
    # rank=1.0 keeps the singular values holding all the energy; PEFT's float32 cumulative sum reaches the total a
    # few singular values early (they hold ~1e-7 of it), hence a relative error of ~1e-4 rather than ~1e-7
    full, worst = relative_errors(lift_model, convert_to_lora(lift_model, 1.0)[1])
    print(f"energy threshold 1.0: {full:.2e} (worst layer {worst:.2e})")
    assert full < 1e-3 and worst < 1e-3, (full, worst)


def test_full_rank_lora_reproduces_the_adapter(lift_model, tmp_path):
    config, _ = convert_to_lora(lift_model, 1.0)
    assert config.r == 1 and config.rank_pattern  # per-layer ranks from the energy threshold
    save_as_lora(tmp_path, lift_model, rank=1.0)
    lora = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    expected, got = logits(lift_model), logits(lora)
    with lift_model.disable_adapter():
        base = logits(lift_model)
    print(f"\nfull-rank LoRA vs LIFT: max |Δlogit| {float((got - expected).abs().max()):.2e}")
    assert not torch.allclose(expected, base, atol=1e-3)
    assert torch.allclose(got, expected, atol=1e-4)


@pytest.mark.filterwarnings("ignore:.*were not initialised from the gradient:UserWarning")  # LoRS without calibration
@pytest.mark.parametrize("method", ADDITIVE)
def test_convert_to_lora_for_every_additive_method(method, tmp_path):
    base = prepare_base(method, tiny_llama())
    model = get_peft_model(base, tiny_config(method))
    train_steps(model, steps=4)  # every schedule runs: SMT picks blocks, RoSA its mask, diff pruning projects
    model.eval()
    config, state_dict = convert_to_lora(model, 1.0)
    full, worst = relative_errors(model, state_dict)
    assert worst < 1e-3, (method, full, worst)  # see test_reconstruction_error_decreases_with_rank
    save_as_lora(tmp_path, model, rank=1.0)
    lora = PeftModel.from_pretrained(prepare_base(method, tiny_llama()), tmp_path).eval()
    assert torch.allclose(logits(lora), logits(model), atol=1e-4), method
    _, low = convert_to_lora(model, 2)
    assert all(t.shape[0] == 2 for k, t in low.items() if k.endswith("lora_A.weight"))


@pytest.mark.parametrize("method", PRUNED_BASE)
def test_weight_recompute_delta_is_the_same_while_merged(method):
    model = get_peft_model(prepare_base(method, tiny_llama()), tiny_config(method, init_weights=False)).eval()
    before = {name: layer.get_delta_weight("default") for name, layer in adapted(model).items()}
    model.merge_adapter()
    try:
        for name, layer in adapted(model).items():
            assert torch.allclose(layer.get_delta_weight("default"), before[name], atol=1e-6), name
    finally:
        model.unmerge_adapter()


def test_a_layer_without_the_adapter_is_named():
    model = get_peft_model(tiny_llama(), LiftConfig(r=2, filter_rank=4))
    model.add_adapter("qv", LiftConfig(r=2, filter_rank=4, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match=r"layer model\.layers\.0\.self_attn\.k_proj holds no adapter 'qv'"):
        convert_to_lora(model, 4, adapter_name="qv")
