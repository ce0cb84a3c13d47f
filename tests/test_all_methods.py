"""Promises every method keeps, checked the same way for all of them (tiny models, a few steps each), one row per
method in ``method_configs``: identity at init (or its config's identity option), training changes the adapter and
nothing else, save/reload reproduces outputs, merged equals unmerged, disabling gives the base, several adapters
switch and delete, half precision with and without autocast, bitsandbytes 4-bit and 8-bit bases train, loading
never runs a selection, a load into other shapes names the layer, a default config in a bare loop trains or names
the fix, what train and inspect report as stored, and an SFTTrainer run resumed from a checkpoint (inside a
statistics window) equals the uninterrupted one. Fresh-process reloads are in ``test_persistence``."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import INPUT, quantized_base, run_python, run_sft, tiny_llama
from method_configs import PRUNED_BASE, QUANTIZED_4BIT, RESUME_CONFIGS, TINY_CONFIGS, prepare_base, tiny_config
from peft import PeftModel, get_peft_model

from sparse_peft import before_optimizer_step, begin_step, refresh_masks

METHODS = sorted(TINY_CONFIGS)


def test_every_registered_method_has_a_row():
    """The contract is a table: a method joins every test here by one row in ``method_configs.TINY_CONFIGS`` (and
    in ``RESUME_CONFIGS`` if it has a schedule)."""
    import sparse_peft

    assert set(TINY_CONFIGS) == set(sparse_peft.METHODS)


def train_steps(model, steps: int = 3, lr: float = 1e-2) -> list[float]:
    """A plain loop driving the schedule hooks the way SparsePeftCallback does."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for step in range(1, steps + 1):
        begin_step(model, step)
        loss = model(INPUT, labels=INPUT).loss
        loss.backward()
        before_optimizer_step(model)
        optimizer.step()
        optimizer.zero_grad()
        refresh_masks(model, step, optimizer)
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module", params=METHODS)
def trained(request, tmp_path_factory):
    method = request.param
    base = prepare_base(method, tiny_llama())
    model = get_peft_model(base, tiny_config(method))
    with torch.no_grad():
        fresh = model(INPUT).logits  # the untrained adapter (not the identity for every method, e.g. SNELL's init)
    base_params = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = train_steps(model, steps=4)
    out = tmp_path_factory.mktemp(f"adapter-{method}")
    model.save_pretrained(out)
    model.fresh_logits, model.base_params = fresh, base_params
    return method, model, losses, out


def test_training_changes_the_adapter(trained):
    method, model, losses, _ = trained
    assert all(loss == loss for loss in losses), losses
    with torch.no_grad():
        now = model(INPUT).logits
    assert not torch.allclose(now, model.fresh_logits, atol=1e-5), f"{method}: training did not change the outputs"
    with torch.no_grad(), model.disable_adapter():
        base = model(INPUT).logits
    assert not torch.allclose(now, base, atol=1e-5), f"{method}: the adapter still acts as identity"


def test_training_changes_nothing_but_the_adapter(trained):
    """Base weights never train (nor ``requires_grad``): every frozen parameter is bitwise unchanged."""
    method, model, _, _ = trained
    now = dict(model.named_parameters())
    assert model.base_params, method
    for name, before in model.base_params.items():
        assert not now[name].requires_grad and torch.equal(now[name], before), f"{method}: {name} changed"


@pytest.mark.parametrize("method", METHODS)
def test_identity_at_init(method):
    """A fresh adapter reproduces its base model, or its config says it does not and offers an identity option."""
    base = prepare_base(method, tiny_llama())
    with torch.no_grad():
        expected = base(INPUT).logits
    config = tiny_config(method)
    if not config.starts_as_identity:
        config = tiny_config(method, init_weights="identity")
        assert config.starts_as_identity, f"{method}: no identity option"
    model = get_peft_model(base, config)
    with torch.no_grad():
        assert torch.allclose(model(INPUT).logits, expected, atol=1e-6), method


@pytest.mark.parametrize("method", METHODS)
def test_several_adapters_switch_and_delete(method):
    """A second adapter of the same method changes the outputs when active; deleting it leaves the first one's
    outputs and no state of it behind."""
    model = get_peft_model(prepare_base(method, tiny_llama()), tiny_config(method))
    train_steps(model, steps=2)
    with torch.no_grad():
        first = model(INPUT).logits
    model.add_adapter("other", tiny_config(method, init_weights=False))  # random, so it acts at once
    model.set_adapter("other")
    with torch.no_grad():
        assert not torch.allclose(model(INPUT).logits, first, atol=1e-5), method
    model.set_adapter("default")
    model.delete_adapter("other")
    with torch.no_grad():
        assert torch.allclose(model(INPUT).logits, first, atol=1e-6), method
    assert not any("other" in name for name, _ in model.named_parameters()), method
    assert not any("other" in name for name, _ in model.named_buffers()), method


def test_reload_reproduces_outputs(trained):
    method, model, _, out = trained
    model.eval()
    reloaded = PeftModel.from_pretrained(prepare_base(method, tiny_llama()), out).eval()
    with torch.no_grad():
        assert torch.allclose(model(INPUT).logits, reloaded(INPUT).logits, atol=1e-5), method


def test_merge_equals_unmerged_and_unmerge_restores(trained):
    method, model, _, _ = trained
    model.eval()
    with torch.no_grad():
        expected = model(INPUT).logits
        with model.disable_adapter():
            base = model(INPUT).logits
        model.merge_adapter()
        merged = model(INPUT).logits
        model.unmerge_adapter()
        with model.disable_adapter():
            restored = model(INPUT).logits
    assert torch.allclose(merged, expected, atol=1e-4), method
    assert torch.allclose(restored, base, atol=1e-5), method


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("method", METHODS)
def test_quantized_base_trains(base_dir, tmp_path, method, bits):
    if method in PRUNED_BASE:  # prune first, then quantize (NF4 keeps exact zeros)
        pruned_dir = tmp_path / "pruned"
        prepare_base(method, tiny_llama()).save_pretrained(pruned_dir)
        base_dir = pruned_dir
    model = get_peft_model(quantized_base(base_dir, bits), tiny_config(method, **QUANTIZED_4BIT.get(method, {})))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses = train_steps(model, steps=4)
    assert all(loss == loss for loss in losses), losses
    now = dict(model.named_parameters())
    changed = [n for n in before if n in now and not torch.equal(before[n], now[n])]
    replaced = [n for n, p in now.items() if p.requires_grad and n not in before]  # diff pruning's projection
    assert changed or replaced, f"{method}: nothing trained on the {bits}-bit base"
    with torch.no_grad(), model.disable_adapter():
        base = model(INPUT).logits
    assert not torch.allclose(model(INPUT).logits, base), f"{method}: the trained adapter does not act"


@pytest.mark.parametrize("method", sorted(RESUME_CONFIGS))
def test_resume_equals_uninterrupted(base_dir, tmp_path, method):
    config = lambda: tiny_config(method, **RESUME_CONFIGS[method])  # noqa: E731
    _, losses_a, state_a = run_sft(base_dir, tmp_path / "a", max_steps=6, save_steps=3, peft_config=config())
    shutil.copytree(tmp_path / "a" / "checkpoint-3", tmp_path / "b" / "checkpoint-3")
    resume = str(tmp_path / "b" / "checkpoint-3")
    _, losses_b, state_b = run_sft(
        base_dir, tmp_path / "b", max_steps=6, save_steps=3, peft_config=config(), resume=resume
    )
    assert losses_b == pytest.approx(losses_a, abs=1e-5)
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        if state_a[key].dtype.is_floating_point:
            assert torch.allclose(state_a[key], state_b[key], atol=1e-5), key
        else:
            assert torch.equal(state_a[key], state_b[key]), key


#: every function that picks positions or units; loading a saved adapter must call none of them
SELECTORS = (
    "topk_positions",
    "principal_score",
    "principal_score_and_basis",
    "warm_principal_score",
    "magnitude_score",
    "gradient_score",
    "random_score",
    "read_mask",
)


def _forbid_selection(monkeypatch) -> None:
    import sys

    from sparse_peft.tuners.s2ft.layer import S2FTLinear

    def refuse(*args, **kwargs):
        raise AssertionError("a selection ran while loading an adapter whose file holds the positions")

    for name, module in list(sys.modules.items()):
        if name.startswith("sparse_peft"):
            for selector in SELECTORS:
                if hasattr(module, selector):
                    monkeypatch.setattr(module, selector, refuse)
    monkeypatch.setattr(S2FTLinear, "_choose", refuse)


def test_loading_never_runs_a_selection(trained, monkeypatch):
    """PeftModel (frozen and trainable), AutoPeftModel and transformers' load_adapter take positions from the file."""
    from sparse_peft import AutoPeftModelForCausalLM

    method, model, _, out = trained
    model.eval()
    with torch.no_grad():
        expected = model(INPUT).logits
    _forbid_selection(monkeypatch)
    base_dir = out / "base"
    if not base_dir.exists():
        prepare_base(method, tiny_llama()).save_pretrained(base_dir)
    loaded = {
        "frozen": PeftModel.from_pretrained(prepare_base(method, tiny_llama()), out),
        "trainable": PeftModel.from_pretrained(prepare_base(method, tiny_llama()), out, is_trainable=True),
    }
    loaded["second adapter"] = loaded["frozen"]
    loaded["second adapter"].load_adapter(out, adapter_name="again", is_trainable=True)
    plain = prepare_base(method, tiny_llama())
    plain.load_adapter(str(out), adapter_name="x")
    loaded["transformers"] = plain
    (out / "adapter_config.json").rename(out / "adapter_config.json.bak")
    try:  # AutoPeftModel reads the base path from the config; point it at the saved base
        import json

        config = json.loads((out / "adapter_config.json.bak").read_text())
        config["base_model_name_or_path"] = str(base_dir)
        (out / "adapter_config.json").write_text(json.dumps(config))
        loaded["AutoPeftModel"] = AutoPeftModelForCausalLM.from_pretrained(out)
    finally:
        (out / "adapter_config.json.bak").replace(out / "adapter_config.json")
    for how, reloaded in loaded.items():
        reloaded.eval()
        with torch.no_grad():
            assert torch.allclose(reloaded(INPUT).logits, expected, atol=1e-5), f"{method}: {how}"


def test_load_into_other_shapes_names_the_layer(trained):
    """A base of other shapes fails on the checkpoint's shape check, before any method-specific config check."""
    method, _, _, out = trained
    other = prepare_base(method, tiny_llama(hidden_size=4, intermediate_size=8))  # smaller than filter_rank etc.
    with pytest.raises(ValueError, match=r"model\.layers\.0\.|adapter entry for|point outside|shape") as info:
        PeftModel.from_pretrained(other, out)
    assert "filter_rank" not in str(info.value), info.value


@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("method", METHODS)
def test_half_precision_forward_and_backward(method, dtype, autocast):
    """A half-precision base (or a float32 base under autocast) trains: finite outputs and adapter gradients."""
    base = prepare_base(method, tiny_llama())
    if not autocast:
        base = base.to(dtype)
    model = get_peft_model(base, tiny_config(method))
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step in (1, 2):  # two steps: SMT picks its blocks after a one-step warm-up
        optimizer.zero_grad()
        begin_step(model, step)
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            logits = model(INPUT).logits
            loss = logits.float().square().mean()
        loss.backward()
        before_optimizer_step(model)
        assert torch.isfinite(logits).all(), method
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), method
        optimizer.step()
        refresh_masks(model, step, optimizer)
    assert any(g.abs().sum() > 0 for g in grads), method


PLAIN_LOOP_FIX = r"SparsePeftCallback|sparse_peft\.calibrate|begin_step"


@pytest.mark.parametrize("method", METHODS)
def test_default_config_in_a_bare_loop_trains_or_names_the_fix(method):
    """A user's own loop with no schedule hooks and no calibration: every method's *default* config either trains
    (the loss falls and the adapter moves) or fails at its first training forward with an error naming
    SparsePeftCallback, the calibration pass or begin_step, never with a raw torch error."""
    import sparse_peft

    config_cls = sparse_peft.METHODS[method][0]
    model = get_peft_model(prepare_base(method, tiny_llama()), config_cls())
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    model.train()
    losses = []
    try:
        for _ in range(4):
            loss = model(INPUT, labels=INPUT).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    except RuntimeError as error:
        assert not losses, f"{method} failed after {len(losses)} steps: {error}"
        assert __import__("re").search(PLAIN_LOOP_FIX, str(error)), str(error)
        return
    assert losses[-1] < losses[0], (method, losses)
    assert any(not torch.equal(p, b) for p, b in zip(params, before, strict=True))


def test_storage_report_counts_what_the_adapter_stores(trained):
    """``storage_report`` (used by ``sparse-peft train``) and ``sparse-peft inspect`` (which reads the saved file)
    agree, and every stored float of the trained adapter is a trainable parameter or a frozen learned part (LIFT's
    retired entries)."""
    from sparse_peft.inspector import read_adapter
    from sparse_peft.pipeline import storage_report

    method, model, _, out = trained
    report = storage_report(model)
    _, modules = read_adapter(out)
    assert report.entries == sum(m.stored for m in modules.values()) > 0, method
    assert report.bytes == sum(m.nbytes for m in modules.values()), method
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(n for name, (n, _, _) in report.tensors.items() if name.startswith("frozen_values"))
    assert report.entries == trainable + frozen, method


def test_fresh_process_reload_reproduces_outputs(trained, tmp_path):
    """A new interpreter (nothing registered but what ``import sparse_peft`` does) loads the saved adapter onto the
    saved base and reproduces the trained model's logits."""
    method, model, _, out = trained
    base_dir = tmp_path / "base"
    prepare_base(method, tiny_llama()).save_pretrained(base_dir)
    model.eval()
    with torch.no_grad():
        torch.save(model(INPUT).logits, tmp_path / "expected.pt")
    code = f"""
import torch, sparse_peft
from peft import PeftModel
from transformers import AutoModelForCausalLM
x = (torch.arange(24).view(3, 8) * 7) % 128
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(r'{base_dir}'), r'{out}').eval()
with torch.no_grad():
    got = model(x).logits
expected = torch.load(r'{tmp_path / "expected.pt"}')
assert torch.allclose(got, expected, atol=1e-5), float((got - expected).abs().max())
print("reloaded")
"""
    result = run_python(code)
    assert result.returncode == 0 and "reloaded" in result.stdout, (method, result.stderr[-2000:])
