"""Bad input gets a clear error that names what is wrong and how to fix it."""

from __future__ import annotations

import pytest
import torch
from conftest import INPUT, tiny_llama
from peft import PeftModel, get_peft_model

from sparse_peft import LiftConfig


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_density_outside_unit_interval(density):
    with pytest.raises(ValueError, match=r"LiftConfig.density must be in \(0, 1\]"):
        LiftConfig(density=density)


@pytest.mark.parametrize("rank", [0, -3, 1.5])
def test_rank_not_positive(rank):
    with pytest.raises(ValueError, match="LiftConfig.r must be a positive integer"):
        LiftConfig(r=rank)


def test_bad_svd_and_interval():
    with pytest.raises(ValueError, match="LiftConfig.svd"):
        LiftConfig(svd="fast")
    with pytest.raises(ValueError, match="LiftConfig.update_interval"):
        LiftConfig(update_interval=-1)


def test_filter_rank_larger_than_matrix():
    with pytest.raises(ValueError, match=r"filter_rank=40 is larger than the matrix .*k_proj of shape \(32, 64\)"):
        get_peft_model(tiny_llama(), LiftConfig(filter_rank=40))


def test_budget_larger_than_matrix_is_capped_but_density_one_is_full():
    model = get_peft_model(tiny_llama(), LiftConfig(r=1000, filter_rank=4))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.values["default"].numel() == 64 * 64


def test_no_target_module_matched():
    with pytest.raises(ValueError, match="not found in the base model"):
        get_peft_model(tiny_llama(), LiftConfig(target_modules=["does_not_exist"], filter_rank=4))


def test_non_linear_target():
    with pytest.raises(TypeError, match=r"LIFT can only adapt linear layers.*'model.embed_tokens' is a Embedding"):
        get_peft_model(tiny_llama(), LiftConfig(target_modules=["embed_tokens"], filter_rank=4))


def test_target_parameters_refused():
    with pytest.raises(ValueError, match="target_parameters is not supported"):
        LiftConfig(target_parameters=["weight"])


def _saved_adapter(tmp_path, base):
    model = get_peft_model(base, LiftConfig(r=2, filter_rank=4, init_weights=False))
    model.save_pretrained(tmp_path)
    return model


def test_loading_into_base_of_other_shapes(tmp_path):
    _saved_adapter(tmp_path, tiny_llama())
    other = tiny_llama(intermediate_size=96)
    with pytest.raises(ValueError, match=r"mlp.gate_proj.*trained on a base model with other layer shapes"):
        PeftModel.from_pretrained(other, tmp_path)


def test_truncated_adapter_file(tmp_path):
    _saved_adapter(tmp_path, tiny_llama())
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"adapter_model.safetensors' is corrupted or truncated"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_garbage_adapter_file(tmp_path):
    _saved_adapter(tmp_path, tiny_llama())
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="corrupted or truncated"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def _edit_saved_tensors(tmp_path, edit):
    """Save an adapter, then rewrite its safetensors file through ``edit(tensors)``."""
    from safetensors.torch import load_file, save_file

    _saved_adapter(tmp_path, tiny_llama())
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _key(tensors, suffix):
    return next(k for k in tensors if k.endswith(suffix))


def test_adapter_file_missing_entries(tmp_path):
    _edit_saved_tensors(tmp_path, lambda t: t.pop(_key(t, "layers.1.mlp.up_proj.sparse_peft_lift_indices")))
    with pytest.raises(ValueError, match=r"no sparse_peft_lift_indices for .*layers.1.mlp.up_proj"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_adapter_indices_out_of_range(tmp_path):
    def corrupt(tensors):
        tensors[_key(tensors, "layers.0.self_attn.q_proj.sparse_peft_lift_indices")][0] = 10**6

    _edit_saved_tensors(tmp_path, corrupt)
    with pytest.raises(ValueError, match="point outside its weight"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_good_adapter_still_loads_after_guards(tmp_path):
    base = tiny_llama()
    model = _saved_adapter(tmp_path, base)
    expected = model(INPUT).logits.detach()
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.allclose(loaded(INPUT).logits, expected, atol=1e-6)
