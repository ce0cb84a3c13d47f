"""SPP and LoRS on pruned tiny Llamas: sparsity survives merging, merged equals unmerged, nothing out x in is kept."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import INPUT, tiny_llama, train_steps
from peft import PeftModel, get_peft_model

from sparse_peft import LorsConfig, LorsLinear, SppConfig, SppLinear, lors_gradient_init, magnitude_prune
from sparse_peft.prune import nm_holds, zero_sets, zeros_kept
from sparse_peft.sparse.recompute import recomputed_linear

PATTERNS = {"unstructured": dict(sparsity=0.6), "2:4": dict(n_m=(2, 4)), "4:8": dict(n_m=(4, 8))}
METHODS = {
    "spp": (SppConfig, SppLinear, dict(groups=4)),
    "lors": (LorsConfig, LorsLinear, dict(r=2)),
    "lors_st": (LorsConfig, LorsLinear, dict(r=2, gradient="straight_through")),
}


def pruned_llama(pattern: str = "2:4"):
    model = tiny_llama()
    magnitude_prune(model, **PATTERNS[pattern])
    return model


def adapted(method: str, pattern: str = "2:4", **overrides):
    config_cls, _, kwargs = METHODS[method]
    return get_peft_model(pruned_llama(pattern), config_cls(**{**kwargs, **overrides}))


def layers(model, cls=(SppLinear, LorsLinear)):
    return [m for m in model.modules() if isinstance(m, cls)]


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_merge_keeps_every_zero_and_nm_and_equals_unmerged(method, pattern):
    model = adapted(method, pattern)
    losses = train_steps(model, lr=2e-2)
    assert losses[-1] < losses[0]
    zeros = zero_sets(model)
    trained = model(INPUT).logits.detach()
    merged = copy.deepcopy(model).merge_and_unload()
    assert torch.allclose(merged(INPUT).logits, trained, atol=1e-5)
    assert zeros_kept(zeros, merged)
    changed = False
    for name, module in merged.named_modules():
        if name in zeros:
            weight = module.weight.detach()
            n_m = PATTERNS[pattern].get("n_m")
            assert n_m is None or nm_holds(weight, *n_m)
            changed |= not torch.equal(weight == 0, zeros[name])  # zero sets are equal unless W+ΔW cancels
    assert not changed


@pytest.mark.parametrize("method", ["spp", "lors"])
def test_merge_unmerge_restores_base_bit_for_bit(method):
    model = adapted(method, init_weights=False)
    bases = [layer.get_base_layer().weight.detach().clone() for layer in layers(model)]
    expected = model(INPUT).logits.detach()
    model.merge_adapter(safe_merge=True)
    assert torch.allclose(model(INPUT).logits, expected, atol=1e-5)
    model.unmerge_adapter()
    for layer, base in zip(layers(model), bases, strict=True):
        assert torch.equal(layer.get_base_layer().weight, base) and layer._unmerged_weight is None
    assert torch.allclose(model(INPUT).logits, expected, atol=1e-6)


@pytest.mark.parametrize("method", ["spp", "lors"])
def test_identity_at_init_and_disable_adapter(method):
    base = pruned_llama()
    expected = base(INPUT).logits.detach().clone()
    config_cls, _, kwargs = METHODS[method]
    model = get_peft_model(copy.deepcopy(base), config_cls(**kwargs))
    assert torch.allclose(model(INPUT).logits, expected, atol=1e-6)
    model = get_peft_model(base, config_cls(**kwargs, init_weights=False))
    assert not torch.allclose(model(INPUT).logits, expected, atol=1e-4)
    with model.disable_adapter():
        assert torch.allclose(model(INPUT).logits, expected, atol=1e-6)


def test_only_the_promised_parameters_train():
    spp = adapted("spp")
    trainable = {n: p for n, p in spp.named_parameters() if p.requires_grad}
    assert trainable and all(".sparse_peft_spp_alpha." in n or ".sparse_peft_spp_beta." in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == sum(4 * l.in_features + l.out_features for l in layers(spp))
    lors = adapted("lors")
    trainable = {n: p for n, p in lors.named_parameters() if p.requires_grad}
    assert trainable and all(".sparse_peft_lors_A." in n or ".sparse_peft_lors_B." in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == sum(2 * (l.in_features + l.out_features) for l in layers(lors))
    for model in (spp, lors):
        assert all(not layer.get_base_layer().weight.requires_grad for layer in layers(model))
        assert len(model.base_model.targeted_module_names) == 14  # all linear but lm_head


@pytest.mark.parametrize("method", sorted(METHODS))
def test_nothing_out_x_in_is_saved_for_backward(method):
    layer = next(l for l in layers(adapted(method, init_weights=False)) if l.out_features == 128)
    x = torch.randn(2, 3, layer.in_features, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = layer(x)
    y.square().sum().backward()
    assert saved and max(saved) < layer.out_features * layer.in_features
    assert x.grad is not None and all(p.grad is not None for n, p in layer.named_parameters() if p.requires_grad)


def _naive(layer, x, names=("default",)):
    """Autograd through the dense masked weight (what SQFT does), as the reference for gradients."""
    base = layer.get_base_layer()
    weight = base.weight
    for name in names:
        weight = layer.apply_adapter(weight, base.weight, layer.adapter_configs[name], *layer.factors(name))
    return torch.nn.functional.linear(x, weight, base.bias)


@pytest.mark.parametrize("method", ["spp", "lors"])
def test_exact_gradients_equal_autograd_of_the_dense_formula(method):
    layer = layers(adapted(method, init_weights=False))[0].double()
    x = torch.randn(2, 5, layer.in_features, dtype=torch.float64, requires_grad=True)
    grads = []
    for forward in (layer, lambda t: _naive(layer, t)):
        y = forward(x)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in layer.factors("default")])
        x.grad = None
        layer.zero_grad()
    for fast, reference in zip(*grads, strict=True):
        assert torch.allclose(fast, reference, atol=1e-10)


def test_lors_exact_gradient_of_two_active_adapters_is_the_masked_dense_one():
    """Two active LoRS adapters share one masked ``gᵀx``: each pair's gradient is ``s·Bᵀ G_M`` / ``s·G_M Aᵀ``,
    written out here from the dense product and the base's zero pattern."""
    model = adapted("lors", init_weights=False)
    model.add_adapter("other", LorsConfig(r=3, init_weights=False, seed=2))
    model.base_model.set_adapter(["default", "other"])
    layer = layers(model)[0].double()
    x = torch.randn(6, layer.in_features, dtype=torch.float64)
    g = torch.randn(6, layer.out_features, dtype=torch.float64)
    layer(x).backward(g)
    masked = (g.t() @ x) * (layer.get_base_layer().weight != 0)
    for name in ("default", "other"):
        a, b = layer.factors(name)
        s = layer.adapter_configs[name].scaling
        assert torch.allclose(a.grad, s * b.detach().t() @ masked) and torch.allclose(
            b.grad, s * masked @ a.detach().t()
        )


def test_lors_straight_through_gradient_is_the_unmasked_lora_gradient():
    layer = layers(adapted("lors_st", init_weights=False))[0].double()
    a, b = layer.factors("default")
    x = torch.randn(7, layer.in_features, dtype=torch.float64)
    g = torch.randn(7, layer.out_features, dtype=torch.float64)
    layer(x).backward(g)
    s = layer.adapter_configs["default"].scaling
    assert torch.allclose(a.grad, s * b.detach().t() @ g.t() @ x)
    assert torch.allclose(b.grad, s * g.t() @ x @ a.detach().t())


def test_recomputed_linear_bias_and_input_gradients():
    weight, bias = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64, requires_grad=True)
    factor = torch.randn(6, 1, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, f, b: recomputed_linear(x, lambda f: weight * f, [f], bias=b), (x, factor, bias))


def test_spp_groups_share_alpha_rows():
    layer = layers(adapted("spp", init_weights=False))[0]
    alpha, beta = layer.factors("default")
    w = layer.get_base_layer().weight.detach()
    rows = layer.out_features // 4
    expected = w * (1 + 2.0 * beta.detach()[:, None] * alpha.detach().repeat_interleave(rows, 0))
    assert torch.allclose(layer.get_delta_weight("default") + w, expected)


def test_spp_two_adapters_multiply_and_merge_to_the_same():
    model = adapted("spp", init_weights=False)
    model.add_adapter("other", SppConfig(groups=2, init_weights=False, seed=4))
    model.base_model.set_adapter(["default", "other"])
    both = model(INPUT).logits.detach()
    model.set_adapter("default")
    assert not torch.allclose(model(INPUT).logits, both, atol=1e-4)
    model.base_model.set_adapter(["default", "other"])
    zeros = zero_sets(model)
    merged = model.merge_and_unload()
    assert torch.allclose(merged(INPUT).logits, both, atol=1e-5) and zeros_kept(zeros, merged)


def test_lors_two_adapters_set_and_delete():
    model = adapted("lors", init_weights=False)
    out_default = model(INPUT).logits.detach()
    model.add_adapter("other", LorsConfig(r=3, init_weights=False, seed=2))
    layer = layers(model)[0]
    assert layer.factors("default")[0].requires_grad and not layer.factors("other")[0].requires_grad
    model.set_adapter("other")
    assert not torch.allclose(model(INPUT).logits, out_default, atol=1e-4)
    model.set_adapter("default")
    model.delete_adapter("other")
    assert "other" not in layer.sparse_peft_lors_A and "other" not in layer.adapter_configs
    assert torch.allclose(model(INPUT).logits, out_default)


@pytest.mark.parametrize("method", ["spp", "lors"])
def test_save_and_reload_reproduce_outputs(method, tmp_path):
    model = adapted(method)
    train_steps(model, steps=2, lr=2e-2)
    expected = model(INPUT).logits.detach()
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(pruned_llama(), tmp_path)
    assert torch.equal(reloaded(INPUT).logits, expected)
    assert type(reloaded.peft_config["default"]) is type(model.peft_config["default"])


def test_lors_gradient_init_spans_the_top_singular_directions_of_the_masked_gradient():
    model = adapted("lors", r=2)
    batches = [{"input_ids": INPUT}, {"input_ids": INPUT.flip(0)}]
    with model.disable_adapter():  # with B = 0, ∂L/∂W_m is the base model's weight gradient
        weights = {name: l.get_base_layer().weight for name, l in model.named_modules() if isinstance(l, LorsLinear)}
        for w in weights.values():
            w.requires_grad_(True)
        for batch in batches:
            model(**batch, labels=batch["input_ids"]).loss.backward()
    gradients = {name: w.grad * (w != 0) / len(batches) for name, w in weights.items()}
    for w in weights.values():
        w.requires_grad_(False)
        w.grad = None
    expected = model(INPUT).logits.detach()
    assert lors_gradient_init(model, batches, gamma=2.0) == 14
    assert torch.allclose(model(INPUT).logits, expected)
    for name, layer in model.named_modules():
        if isinstance(layer, LorsLinear):
            a, b = layer.factors("default")
            assert torch.count_nonzero(b) == 0 and a.grad is None
            assert torch.allclose(a @ a.t(), torch.eye(2) / 4, atol=1e-5)
            top = torch.linalg.svd(gradients[name].double(), full_matrices=False).Vh[:2]
            overlap = torch.linalg.svdvals(2 * a.detach().double() @ top.t())
            # a randomized SVD (q = 4r, 4 power iterations, seeded per module): cosines within 1e-2 of 1
            assert torch.allclose(overlap, torch.ones(2, dtype=torch.float64), atol=1e-2)
    losses = train_steps(model, steps=3, lr=1e-2)
    assert losses[-1] < losses[0]


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="groups=5 does not divide out_features"):
        adapted("spp", groups=5)
    for bad in (dict(groups=0), dict(scaling=0.0), dict(scaling="2")):
        with pytest.raises(ValueError, match="SppConfig"):
            SppConfig(**bad)
    for bad in (dict(r=0), dict(lora_alpha=-1), dict(gradient="masked")):
        with pytest.raises(ValueError, match="LorsConfig"):
            LorsConfig(**bad)
    model = adapted("lors")
    model.add_adapter("st", LorsConfig(r=2, gradient="straight_through"))
    model.base_model.set_adapter(["default", "st"])
    with pytest.raises(ValueError, match="mix gradient"):
        model(INPUT)


def test_nf4_dequantized_zero_pattern_keeps_every_pruned_zero(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    assert 0.0 in bnb.functional.get_4bit_type("nf4", device="cpu").tolist()  # NF4 has an exact zero code
    pruned = pruned_llama("2:4")
    pruned.save_pretrained(tmp_path)
    zeros = zero_sets(pruned)
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=qc, device_map="cpu")
    model = get_peft_model(quantized, LorsConfig(r=2, init_weights=False))
    assert zeros_kept(zeros, model)
    train_steps(model, steps=1, lr=2e-2)
    for name, layer in model.base_model.model.named_modules():
        if isinstance(layer, LorsLinear):
            adapted_weight = layer._build(("default",), *layer.factors("default")).detach()  # a dequantized merge
            assert not adapted_weight[zeros[name]].any() and nm_holds(adapted_weight, 2, 4)


@pytest.mark.parametrize(("method", "prune"), [("lors", "2:4"), ("spp", "magnitude:0.5")])
def test_cli_train_prunes_then_reports_sparsity_before_and_after_merge(method, prune, tmp_path, capsys):
    import json

    from conftest import char_tokenizer

    from sparse_peft.cli import main

    model_dir = tmp_path / "tiny"
    tiny_llama().save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    rows = [
        {"prompt": [{"role": "user", "content": f"{i % 7}+{i % 5}="}], "completion": [{"role": "assistant",
         "content": str(i % 7 + i % 5)}], "answer": str(i % 7 + i % 5)}
        for i in range(8)
    ]  # fmt: skip
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "run"
    argv = ["train", "--method", method, "--prune", prune, "--model", str(model_dir), "--data", str(data)]
    argv += ["--eval-data", str(data), "--steps", "2", "--batch-size", "4", "--max-length", "32", "--output", str(out)]
    assert main(argv) == 0, capsys.readouterr().out
    sparsity = json.loads((out / "summary.json").read_text())["sparsity"]
    assert sparsity["prune"] == ("wanda:2:4" if prune == "2:4" else prune)
    assert sparsity["before"]["sparsity"] == pytest.approx(0.5)
    assert sparsity["after_merge"]["sparsity"] == pytest.approx(0.5) and sparsity["zeros_kept_after_merge"] is True
    assert sparsity["after_merge"]["nm_holds"] is (True if prune == "2:4" else None)


def test_lors_gradient_init_differs_from_kaiming_and_lowers_the_first_losses():
    from sparse_peft import calibrate

    kaiming = adapted("lors", r=2, init_lora_weights="kaiming")
    gradient = adapted("lors", r=2)
    assert gradient.peft_config["default"].init_lora_weights == "gradient"  # the paper's init is the default
    a_kaiming = layers(kaiming)[0].factors("default")[0].detach().clone()
    assert torch.equal(layers(gradient)[0].factors("default")[0], a_kaiming)  # same draw until calibrated
    assert calibrate(gradient, [INPUT]) == {"LorsLinear": 14}
    assert calibrate(gradient, [INPUT]) == {}  # done once
    a_gradient = layers(gradient)[0].factors("default")[0].detach()
    assert not torch.allclose(a_gradient, a_kaiming)
    lr = 2e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # calibrated: no "not initialised from the gradient" warning
        grad_losses = train_steps(gradient, steps=4, lr=lr)
    kaiming_losses = train_steps(kaiming, steps=4, lr=lr)
    assert grad_losses[0] == pytest.approx(kaiming_losses[0])  # both start as the identity (B = 0)
    assert sum(grad_losses[1:]) < sum(kaiming_losses[1:])


def test_lors_without_calibration_warns_and_trains_from_kaiming():
    model = adapted("lors", r=2)
    with pytest.warns(UserWarning, match=r"sparse_peft.calibrate\(model, batches\)"):
        losses = train_steps(model, steps=3)
    assert losses[-1] < losses[0]


def test_sft_trainer_callback_calibrates_lors_on_the_first_batches(tmp_path):
    from conftest import sft_trainer

    from sparse_peft import SparsePeftCallback

    model = adapted("lors", r=2)
    before = layers(model)[0].factors("default")[0].detach().clone()
    trainer = sft_trainer(model, tmp_path / "out", [SparsePeftCallback(calibration_samples=4)], learning_rate=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        trainer.train()
    layer = layers(trainer.model)[0]
    assert not layer.uncalibrated
    a = layer.factors("default")[0].detach()
    assert not torch.allclose(a, before)
    assert torch.allclose(a @ a.t(), torch.eye(2), atol=1e-3)  # orthonormal singular vectors (γ = 1), lr ≈ 0
