"""Saving and loading: indices really come from the file, in a fresh process, through every PEFT loader."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import INPUT, run_python, tiny_llama
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import sparse_peft
from sparse_peft import LiftConfig, LiftLinear, __version__, delete_adapter, refresh_masks
from sparse_peft.compat import TRANSFORMERS_ADAPTER_API


def _trained_adapter(base_dir, out_dir):
    """Train a LIFT adapter with mask refreshes (so indices differ from a fresh selection) and save it."""
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir), LiftConfig(r=2, filter_rank=4, update_interval=1)
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for step in range(1, 4):
        model(INPUT, labels=INPUT).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        refresh_masks(model, step, optimizer)
    model.eval()
    model.save_pretrained(out_dir)
    logits = model(INPUT).logits.detach()
    torch.save(logits, out_dir / "expected_logits.pt")
    return model, logits


@pytest.fixture(scope="module")
def saved(base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lift_adapter")
    model, logits = _trained_adapter(base_dir, out)
    return out, model, logits


def test_saved_files_and_config(saved):
    out, model, _ = saved
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "SPARSE_PEFT_LIFT"
    assert config["sparse_peft_version"] == __version__
    tensors = load_file(out / "adapter_model.safetensors")
    idx = [k for k in tensors if k.endswith("sparse_peft_lift_indices")]
    assert len(idx) == 14 and all(tensors[k].dtype == torch.int32 for k in idx)
    frozen = [k for k in tensors if k.endswith("sparse_peft_lift_frozen_values")]
    assert sum(tensors[k].numel() for k in frozen) > 0  # refreshes retired some entries


def test_adapter_bytes_follow_k(saved):
    out, model, _ = saved
    layers = [m for m in model.modules() if isinstance(m, LiftLinear)]
    k_total = sum(l.values["default"].numel() + l.frozen_values["default"].numel() for l in layers)
    size = (out / "adapter_model.safetensors").stat().st_size
    payload = k_total * (4 + 4)  # fp32 value + int32 index
    assert payload <= size <= payload * 1.05 + 8192  # header of a few KB


def test_reload_in_fresh_process_reproduces_outputs(saved, base_dir):
    out, _, _ = saved
    code = f"""
import torch, sparse_peft
from peft import PeftConfig, PeftModel
from transformers import AutoModelForCausalLM
from sparse_peft import AutoPeftModelForCausalLM, LiftConfig
x = (torch.arange(24).view(3, 8) * 7) % 128
expected = torch.load(r'{out}/expected_logits.pt')
cfg = PeftConfig.from_pretrained(r'{out}')
assert isinstance(cfg, LiftConfig), type(cfg)
m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(r'{base_dir}'), r'{out}')
assert torch.allclose(m(x).logits, expected, atol=1e-5), 'PeftModel'
base = AutoModelForCausalLM.from_pretrained(r'{base_dir}')
m = sparse_peft.PeftModel.from_pretrained(base, r'{out}', is_trainable=True)
assert torch.allclose(m(x).logits, expected, atol=1e-5), 'is_trainable'
assert sum(p.requires_grad for p in m.parameters()) == 14
m = AutoPeftModelForCausalLM.from_pretrained(r'{out}')
assert torch.allclose(m(x).logits, expected, atol=1e-5), 'AutoPeftModel'
b = AutoModelForCausalLM.from_pretrained(r'{base_dir}')
b.load_adapter(r'{out}', adapter_name='x')
assert torch.allclose(b(x).logits, expected, atol=1e-5), 'transformers load_adapter'
sparse_peft.delete_adapter(b, 'x')
plain = AutoModelForCausalLM.from_pretrained(r'{base_dir}')
assert torch.equal(b(x).logits, plain(x).logits), 'sparse_peft.delete_adapter'
assert not b._hf_peft_config_loaded and not hasattr(b, 'peft_config')
print('OK')
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout


@pytest.mark.xfail(
    TRANSFORMERS_ADAPTER_API.applies(), reason=TRANSFORMERS_ADAPTER_API.message(), strict=True, raises=ValueError
)
def test_transformers_own_delete_adapter(saved, base_dir):
    """transformers' ``delete_adapter`` after ``load_adapter`` leaves the plain base (upstream's method, not ours)."""
    out, _, _ = saved
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    plain = model(INPUT).logits
    model.load_adapter(str(out), adapter_name="x")
    assert not torch.allclose(model(INPUT).logits, plain)
    model.delete_adapter("x")
    assert torch.equal(model(INPUT).logits, plain)
    assert all(not m.values for m in model.modules() if isinstance(m, LiftLinear))


def test_sparse_peft_delete_adapter_on_a_transformers_model(saved, base_dir):
    """Our own path removes one adapter of two, then the last one, and names a missing adapter."""
    out, _, _ = saved
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    plain = model(INPUT).logits
    model.load_adapter(str(out), adapter_name="x")
    model.load_adapter(str(out), adapter_name="y")
    with pytest.raises(ValueError, match="adapter.s. nope not found; loaded: x, y"):
        delete_adapter(model, "nope")
    delete_adapter(model, "x")
    assert list(model.peft_config) == ["y"]
    layer = next(m for m in model.modules() if isinstance(m, LiftLinear))
    assert "x" not in layer.values and "y" in layer.values
    delete_adapter(model, ["y"])
    assert torch.equal(model(INPUT).logits, plain)
    assert not model._hf_peft_config_loaded
    with pytest.raises(ValueError, match="no adapter is loaded"):
        delete_adapter(model, "y")


def test_sparse_peft_delete_adapter_on_a_peft_model(saved, base_dir):
    out, _, _ = saved
    from peft import PeftModel

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out)
    model.load_adapter(out, adapter_name="other")
    delete_adapter(model, "other")
    assert list(model.peft_config) == ["default"]


def test_loading_without_import_names_the_type(saved, base_dir):
    out, _, _ = saved
    code = f"""
from peft import PeftModel
from transformers import AutoModelForCausalLM
try:
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(r'{base_dir}'), r'{out}')
except KeyError as e:
    print('KeyError', e)
"""
    result = run_python(code)
    assert "KeyError 'SPARSE_PEFT_LIFT'" in result.stdout, result.stderr[-2000:]


def test_variable_size_frozen_part_loads_in_process(saved, base_dir):
    out, _, logits = saved
    from peft import PeftModel

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out)
    assert torch.allclose(model(INPUT).logits, logits, atol=1e-5)


def test_save_is_atomic(saved, tmp_path, monkeypatch):
    """A save that dies half-way leaves the previous adapter file intact and no temporary file behind."""
    out, model, _ = saved
    target = tmp_path / "adapter"
    model.save_pretrained(target)
    original = (target / "adapter_model.safetensors").read_bytes()

    import safetensors.torch

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    # the guard wraps whatever save function PEFT holds; make the inner writer fail
    import peft.peft_model

    from sparse_peft.registry import _atomic_safe_save

    monkeypatch.setattr(peft.peft_model, "safe_save_file", _atomic_safe_save(broken_save))
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(target)
    assert (target / "adapter_model.safetensors").read_bytes() == original
    assert not [p for p in target.iterdir() if p.name.startswith(".tmp-")]
    del safetensors


def test_peft_save_goes_through_atomic_writer():
    import peft.peft_model

    assert getattr(peft.peft_model.safe_save_file, "_sparse_peft_atomic", False)


def test_config_is_written_atomically(tmp_path, monkeypatch):
    from peft.config import PeftConfig

    from sparse_peft import LiftConfig

    target = tmp_path / "adapter"
    LiftConfig(r=3).save_pretrained(str(target))
    original = (target / "adapter_config.json").read_text()

    def broken(self, save_directory, **kwargs):
        with open(f"{save_directory}/adapter_config.json", "w") as handle:
            handle.write("{ half")
        raise OSError("disk full")

    monkeypatch.setattr(PeftConfig, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        LiftConfig(r=4).save_pretrained(str(target))
    assert (target / "adapter_config.json").read_text() == original
    assert [p.name for p in target.iterdir()] == ["adapter_config.json"]


#: Fields renamed to the project's one vocabulary (r, density, window_steps): earlier name -> (method, new name,
#: a valid value).
RENAMED = {
    ("lift", "rank"): ("r", 3),
    ("spiel", "rank"): ("r", 3),
    ("spiel", "selection_accumulation_steps"): ("window_steps", 2),
    ("diff_pruning", "target_density"): ("density", 0.02),
    ("smt", "warmup_steps"): ("window_steps", 3),
    ("smt", "block_ratio"): ("density", 0.5),
    ("rosa", "grad_collection_steps"): ("window_steps", 3),
}


@pytest.mark.parametrize(("method", "old"), sorted(RENAMED))
def test_configs_saved_with_earlier_field_names_still_load(tmp_path, method, old):
    """An adapter_config.json written by the previous release (the earlier field name) loads into the renamed field,
    with a FutureWarning; the earlier name reads back too, and giving both names is an error."""
    import json

    from peft import PeftConfig

    new, value = RENAMED[(method, old)]
    config_cls = sparse_peft.METHODS[method][0]
    config_cls(**{new: value}).save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    saved[old] = saved.pop(new)  # the file as the previous release wrote it
    path.write_text(json.dumps(saved))
    with pytest.warns(FutureWarning, match=rf"{config_cls.__name__}.{old} is now {config_cls.__name__}.{new}"):
        loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert type(loaded) is config_cls and getattr(loaded, new) == value
    with pytest.warns(FutureWarning):
        assert getattr(loaded, old) == value
    with pytest.raises(ValueError, match=f"earlier name {old}="):
        config_cls(**{new: value, old: value})


def test_adapter_saved_with_earlier_field_names_reloads(tmp_path):
    import json

    from peft import PeftModel

    model = get_peft_model(tiny_llama(), LiftConfig(r=2, filter_rank=4, init_weights=False)).eval()
    model.save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    saved["rank"] = saved.pop("r")
    path.write_text(json.dumps(saved))
    with pytest.warns(FutureWarning, match="LiftConfig.rank is now LiftConfig.r"):
        loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(INPUT).logits, model(INPUT).logits)


def test_earlier_class_name_still_imports():
    with pytest.warns(FutureWarning, match="S2FTConfig is now sparse_peft.S2ftConfig"):
        from sparse_peft import S2FTConfig
    assert S2FTConfig is sparse_peft.S2ftConfig
