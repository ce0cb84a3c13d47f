"""SNELL on a tiny Llama: kernel, competition, memory-lean gradient and the PEFT layer contract."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import INPUT, tiny_llama, train_steps
from peft import PeftModel, get_peft_model

from sparse_peft import SnellConfig, SnellLinear
from sparse_peft.sparse import cpu_kernel
from sparse_peft.sparse.kernel_delta import kernel_sparse_linear, kernel_sparse_matmul


def snell_layers(model):
    return [m for m in model.modules() if isinstance(m, SnellLinear)]


@pytest.fixture
def snell_model():
    return get_peft_model(tiny_llama(), SnellConfig(r=4, sparsity=0.7))


def dense_reference(x, a, b, scale, n_drop):
    """The formula written out with autograd: explicit pairwise norms, detached magnitude, quantile mask."""
    d0 = (b[0][:, None, :] - a[0][None, :, :]).norm(dim=-1)
    d1 = (b[1][:, None, :] - a[1][None, :, :]).norm(dim=-1)
    delta = scale * (d0 - d1)
    tau = delta.detach().abs().reshape(-1).sort().values[n_drop - 1]
    mask = delta.detach().abs() > tau
    return x @ (delta * delta.detach().abs() * mask).t()


def test_gradient_matches_autograd_on_dense_formulation():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    a = torch.randn(2, 12, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 5, 9, dtype=torch.float64)
    n_drop = round(0.6 * 9 * 12)
    y = kernel_sparse_matmul(x, a, b, 0.1, n_drop)
    grads = torch.autograd.grad(y, (x, a, b), g)
    y_ref = dense_reference(x, a, b, 0.1, n_drop)
    ref = torch.autograd.grad(y_ref, (x, a, b), g)
    assert torch.allclose(y, y_ref, atol=1e-12)
    for got, want in zip(grads, ref, strict=True):
        assert torch.allclose(got, want, atol=1e-10)


def test_backward_saves_no_dense_delta():
    """Saved for backward: x, the factors and τ; no (out x in) tensor."""
    a = torch.randn(2, 40, 2, requires_grad=True)
    b = torch.randn(2, 30, 2, requires_grad=True)
    x = torch.randn(3, 40)
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        kernel_sparse_matmul(x, a, b, 0.1, 600)
    assert (30, 40) not in shapes and sorted(shapes) == sorted([(3, 40), (2, 40, 2), (2, 30, 2), ()])


def test_fused_layer_path_matches_autograd_on_dense_formulation():
    """One GEMM on W + ΔW_s,1 + ΔW_s,2 with a bias: y, ∂x, ∂bias and every factor's gradient equal autograd
    through the base layer plus each adapter's dense formula; W gets no gradient and nothing out x in is saved."""
    torch.manual_seed(0)
    weight, bias = torch.randn(9, 12, dtype=torch.float64), torch.randn(9, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    pairs = [
        (torch.randn(2, 12, r, dtype=torch.float64, requires_grad=True),
         torch.randn(2, 9, r, dtype=torch.float64, requires_grad=True))
        for r in (3, 2)
    ]  # fmt: skip
    scales, n_drops = [0.1, 0.3], [round(0.6 * 108), round(0.8 * 108)]
    g = torch.randn(2, 5, 9, dtype=torch.float64)
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        y = kernel_sparse_linear(x, lambda: weight, bias, pairs, scales, n_drops)
    assert (9, 12) not in shapes
    leaves = (x, bias, *[t for pair in pairs for t in pair])
    grads = torch.autograd.grad(y, leaves, g)
    y_ref = x @ weight.t() + bias
    for (a, b), scale, n_drop in zip(pairs, scales, n_drops, strict=True):
        y_ref = y_ref + dense_reference(x, a, b, scale, n_drop)
    ref = torch.autograd.grad(y_ref, leaves, g)
    assert torch.allclose(y, y_ref, atol=1e-12)
    for got, want in zip(grads, ref, strict=True):
        assert torch.allclose(got, want, atol=1e-10)


def test_layer_takes_the_fused_path_unless_dropout_and_both_agree(monkeypatch):
    import sparse_peft.sparse.kernel_delta as kd

    calls = []
    original = kd.KernelSparseLinear.apply
    monkeypatch.setattr(kd.KernelSparseLinear, "apply", lambda *a: calls.append(1) or original(*a))
    fused = get_peft_model(tiny_llama(), SnellConfig(r=4, sparsity=0.7, init_weights=False))
    split = get_peft_model(tiny_llama(), SnellConfig(r=4, sparsity=0.7, init_weights=False, dropout=0.1))
    split.load_state_dict(fused.state_dict())
    fused.train()
    fused(INPUT, labels=INPUT).loss.backward()
    assert len(calls) == len(snell_layers(fused))
    calls.clear()
    fused.eval()
    split.eval()  # dropout is the identity in eval: the split path must give the same outputs
    with torch.no_grad():
        expected = fused(INPUT).logits
        assert len(calls) == len(snell_layers(fused))
        calls.clear()
        got = split(INPUT).logits
    assert not calls
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_factors_run_the_kernel_in_float32(dtype):
    """cdist has no CPU half-precision path: half factors (autocast_adapter_dtype=False) still train."""
    base = tiny_llama().to(dtype)
    model = get_peft_model(base, SnellConfig(r=4, sparsity=0.7, init_weights=False), autocast_adapter_dtype=False)
    layer = snell_layers(model)[0]
    assert layer.sparse_peft_snell_A["default"].dtype == dtype
    model.train()
    model(INPUT, labels=INPUT).loss.backward()
    assert layer.sparse_peft_snell_A["default"].grad.dtype == dtype
    assert layer.sparse_peft_snell_A["default"].grad.abs().sum() > 0
    assert layer.get_delta_weight("default").dtype == torch.float32


def test_kept_fraction_matches_sparsity():
    for sparsity in (0.0, 0.5, 0.9):
        model = get_peft_model(tiny_llama(), SnellConfig(r=4, sparsity=sparsity))
        for layer in snell_layers(model):
            kept = int((layer.get_delta_weight("default") != 0).sum())
            assert kept == layer.numel - round(sparsity * layer.numel)


def test_forward_is_base_plus_sparsified_kernel_delta(snell_model):
    layer = snell_layers(snell_model)[0]
    x = torch.randn(2, layer.in_features)
    expected = layer.get_base_layer()(x) + x @ layer.get_delta_weight("default").t()
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_only_factors_train_and_budget_is_lora_rank(snell_model):
    trainable = {n: p for n, p in snell_model.named_parameters() if p.requires_grad}
    assert trainable and all(".sparse_peft_snell_A." in n or ".sparse_peft_snell_B." in n for n in trainable)
    for layer in snell_layers(snell_model):
        count = layer.sparse_peft_snell_A["default"].numel() + layer.sparse_peft_snell_B["default"].numel()
        assert count == (layer.in_features + layer.out_features) * 4
    frozen = {n: p.detach().clone() for n, p in snell_model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    losses = train_steps(snell_model, steps=3)
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in snell_model.named_parameters() if n in frozen)
    assert all(not torch.equal(p, before[n]) for n, p in trainable.items())


def test_survivor_set_moves_during_training(snell_model):
    layer = snell_layers(snell_model)[0]
    mask_before = layer.get_delta_weight("default") != 0
    train_steps(snell_model, steps=3, lr=5e-2)
    mask_after = layer.get_delta_weight("default") != 0
    assert mask_before.sum() == mask_after.sum() and not torch.equal(mask_before, mask_after)


def test_merge_unmerge_exact_and_merge_and_unload(snell_model):
    train_steps(snell_model, steps=1)
    bases = [layer.get_base_layer().weight.detach().clone() for layer in snell_layers(snell_model)]
    out = snell_model(INPUT).logits.detach()
    snell_model.merge_adapter(safe_merge=True)
    assert torch.allclose(snell_model(INPUT).logits, out, atol=1e-5)
    for layer, base in zip(snell_layers(snell_model), bases, strict=True):
        changed = (layer.get_base_layer().weight != base).sum()
        assert 0 < changed <= layer.numel - round(0.7 * layer.numel)  # only the survivors are written
    snell_model.unmerge_adapter()
    for layer, base in zip(snell_layers(snell_model), bases, strict=True):
        assert torch.equal(layer.get_base_layer().weight, base)
    merged = copy.deepcopy(snell_model).merge_and_unload()
    assert not snell_layers(merged) and torch.allclose(merged(INPUT).logits, out, atol=1e-5)


def test_disable_adapter_gives_base(snell_model):
    base = tiny_llama()(INPUT).logits
    assert not torch.allclose(snell_model(INPUT).logits, base)
    with snell_model.disable_adapter():
        assert torch.allclose(snell_model(INPUT).logits, base, atol=1e-6)


def test_save_reload_reproduces_outputs(snell_model, base_dir, tmp_path):
    base = tiny_llama()
    snell_model = get_peft_model(base, SnellConfig(r=4, sparsity=0.7, seed=3))
    train_steps(snell_model, steps=2)
    out = snell_model(INPUT).logits.detach()
    snell_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.allclose(reloaded(INPUT).logits, out, atol=1e-6)
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert keys and all("sparse_peft_snell_A" in k or "sparse_peft_snell_B" in k for k in keys)


def test_multiple_adapters(snell_model):
    out = snell_model(INPUT).logits.detach()
    snell_model.add_adapter("other", SnellConfig(r=2, sparsity=0.5, seed=7))
    layer = snell_layers(snell_model)[0]
    assert not layer.sparse_peft_snell_A["other"].requires_grad
    snell_model.set_adapter("other")
    assert not torch.allclose(snell_model(INPUT).logits, out)
    snell_model.set_adapter("default")
    snell_model.delete_adapter("other")
    assert "other" not in layer.sparse_peft_snell_A and torch.allclose(snell_model(INPUT).logits, out)


def test_quantized_4bit_base_trains(base_dir):
    pytest.importorskip("bitsandbytes")
    from conftest import quantized_base

    model = get_peft_model(quantized_base(base_dir, 4), SnellConfig(r=4, sparsity=0.5))
    assert type(snell_layers(model)[0].quantization_backend).__name__ == "Bnb4bitBackend"
    losses = train_steps(model, steps=3)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"r": 3}, "r must be even"),
        ({"sparsity": 1.0}, r"sparsity must be in \[0, 1\)"),
        ({"kernel_scale": 0}, "kernel_scale must be a positive number"),
        ({"dropout": 1.0}, "dropout"),
        ({"r": 0}, "r must be"),
        ({"init_weights": "zeros"}, "init_weights must be one of True, False, .identity."),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SnellConfig(**kwargs)


def test_init_scale_is_kaiming_on_the_whole_factor_tensors():
    """The reference's ``kaiming_uniform_(a=√5)`` on ``(2, in, r/2)`` / ``(2, out, r/2)``: bound ``1/√(in·r/2)``
    resp. ``1/√(out·r/2)``, and the uniform's standard deviation ``bound/√3``."""
    model = get_peft_model(tiny_llama(), SnellConfig(r=8, sparsity=0.7))
    for layer in snell_layers(model):
        for factor, fan in ((layer.sparse_peft_snell_A["default"], layer.in_features),
                            (layer.sparse_peft_snell_B["default"], layer.out_features)):  # fmt: skip
            bound = 1.0 / (fan * 4) ** 0.5
            assert factor.abs().max() <= bound
            assert factor.std().item() == pytest.approx(bound / 3**0.5, rel=0.1)


def test_per_layer_seeds_differ_and_are_reproducible():
    first = snell_layers(get_peft_model(tiny_llama(), SnellConfig(r=4, sparsity=0.7)))
    again = snell_layers(get_peft_model(tiny_llama(), SnellConfig(r=4, sparsity=0.7)))
    same_shape = [layer for layer in first if layer.shape == first[0].shape]
    assert len(same_shape) >= 2
    a = [layer.sparse_peft_snell_A["default"] for layer in same_shape]
    assert not torch.equal(a[0], a[1])
    for x, y in zip(first, again, strict=True):
        assert torch.equal(x.sparse_peft_snell_A["default"], y.sparse_peft_snell_A["default"])


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_identity_init_is_exact_and_trains(dropout, tmp_path):
    base = tiny_llama()
    reference = base(INPUT).logits.detach()
    model = get_peft_model(base, SnellConfig(r=4, sparsity=0.7, init_weights="identity", dropout=dropout))
    assert model.peft_config["default"].starts_as_identity
    model.eval()
    assert torch.equal(model(INPUT).logits, reference)
    model.train()
    layer = snell_layers(model)[0]
    before = layer.sparse_peft_snell_A["default"].detach().clone()
    losses = train_steps(model, steps=3)
    assert losses[-1] < losses[0]
    assert not torch.equal(layer.sparse_peft_snell_A["default"], before)
    assert not layer.sparse_peft_snell_A0["default"].requires_grad
    assert torch.equal(layer.sparse_peft_snell_A0["default"], before)  # the frozen copy never moves
    model.eval()
    out = model(INPUT).logits.detach()
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.allclose(reloaded(INPUT).logits, out, atol=1e-6)
    merged = model.merge_and_unload()
    assert torch.allclose(merged(INPUT).logits, out, atol=1e-4)


def test_default_init_is_not_identity_but_small():
    """The paper's init: ΔW_s ≠ 0 at step 0, ‖ΔW_s‖_F of order 1e-3 on a 576² matrix (the reference's scale)."""
    from sparse_peft.sparse.kernel_delta import sparse_kernel_weight
    from sparse_peft.tuners.snell.layer import init_factors

    a, b = init_factors(576, 576, 8, True, seed=0)
    norm = sparse_kernel_weight(a, b, 0.1, round(0.9 * 576 * 576)).norm().item()
    assert 1e-4 < norm < 1e-2
    big_a, big_b = init_factors(576, 576, 8, False, seed=0)
    assert sparse_kernel_weight(big_a, big_b, 0.1, round(0.9 * 576 * 576)).norm().item() > 100 * norm
    assert not SnellConfig().starts_as_identity


# ---- the compiled kernels (section 3 of sparse_peft/sparse/kernels.c) ---------------------------------------------
needs_compiler = pytest.mark.skipif(cpu_kernel._compiler() is None, reason="no C compiler: the kernel cannot build")


@needs_compiler
@pytest.mark.parametrize("threads", [1, 2])
def test_kth_abs_is_kthvalue_of_the_magnitudes(threads, monkeypatch):
    """The radix select returns torch.kthvalue(|v|)'s value exactly: ties, zeros of both signs, tiny and huge values."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    generator = torch.Generator().manual_seed(3)
    cases = [
        torch.tensor([-2.5]),
        torch.tensor([0.0, -0.0, 3.0, -3.0, 1e-30, -1e30, 2.0]),
        torch.randint(-4, 5, (1001,), generator=generator).float(),  # many ties
        torch.randn(70_003, generator=generator) * torch.rand(70_003, generator=generator).pow(8),
    ]
    for values in cases:
        n = values.numel()
        for k in sorted({1, min(2, n), max(1, n // 3), n // 2 + 1, max(1, n - 1), n}):
            assert cpu_kernel.kth_abs(values, k) == torch.kthvalue(values.abs(), k).values.item(), (n, k)
    with pytest.raises(ValueError, match="k must be in"):
        cpu_kernel.kth_abs(torch.ones(3), 4)


@needs_compiler
@pytest.mark.parametrize("kernels", ["compiled-dense", "compiled-sparse", "torch"])
def test_float32_layer_matches_the_dense_formulation(kernels, monkeypatch):
    """A float32 CPU layer with a trainable and a frozen term (an identity init's shape) runs on the compiled kernels
    (the factors' gradients from the dense ``gᵀx`` or from its SDDMM at the survivors) or, switched off, on torch's:
    y, ∂x and the trainable factors' gradients match autograd through the dense formula in float64."""
    import sparse_peft.sparse.kernel_delta as kd

    if kernels == "torch":
        monkeypatch.setenv(cpu_kernel.SWITCH_ENV_VAR, "0")
    monkeypatch.setattr(kd, "SPARSE_GRAD_MAX_KEPT", 1.0 if kernels == "compiled-sparse" else 0.0)
    calls = []
    for name in ("snell_backward", "snell_sparse_grads"):
        original = getattr(cpu_kernel, name)
        monkeypatch.setattr(cpu_kernel, name, lambda *a, f=original, n=name, **k: calls.append(n) or f(*a, **k))
    torch.manual_seed(1)
    weight = torch.randn(37, 45)
    x = torch.randn(3, 11, 45, requires_grad=True)
    a, b = torch.randn(2, 45, 4, requires_grad=True), torch.randn(2, 37, 4, requires_grad=True)
    a0, b0 = torch.randn(2, 45, 4), torch.randn(2, 37, 4)
    g = torch.randn(3, 11, 37)
    n_drop = round(0.8 * 37 * 45)
    y = kernel_sparse_linear(x, lambda: weight, None, [(a, b), (a0, b0)], [0.3, -0.3], [n_drop, n_drop])
    grads = torch.autograd.grad(y, (x, a, b), g)
    expected = {
        "compiled-dense": ["snell_backward", "snell_backward"],
        "compiled-sparse": ["snell_sparse_grads", "snell_backward"],  # the frozen term only rebuilds W_eff
        "torch": [],
    }
    assert calls == expected[kernels]
    leaves = [t.detach().double().requires_grad_() for t in (x, a, b)]
    y_ref = leaves[0] @ weight.double().t() + dense_reference(leaves[0], leaves[1], leaves[2], 0.3, n_drop)
    y_ref = y_ref + dense_reference(leaves[0], a0.double(), b0.double(), -0.3, n_drop)
    ref = torch.autograd.grad(y_ref, leaves, g.double())
    assert torch.allclose(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, ref, strict=True):
        assert torch.allclose(got.double(), want, rtol=1e-3, atol=1e-3 * want.abs().max().item())


@needs_compiler
def test_compiled_and_torch_kernels_train_a_model_alike(monkeypatch):
    """The same model's loss and factor gradients with the compiled kernels and with torch's."""
    model = get_peft_model(tiny_llama(), SnellConfig(r=4, sparsity=0.7, init_weights=False))
    model.train()

    def loss_and_grads():
        model.zero_grad()
        loss = model(INPUT, labels=INPUT).loss
        loss.backward()
        return loss.detach(), [layer.sparse_peft_snell_B["default"].grad.clone() for layer in snell_layers(model)]

    loss, grads = loss_and_grads()
    monkeypatch.setenv(cpu_kernel.SWITCH_ENV_VAR, "0")
    loss_torch, grads_torch = loss_and_grads()
    assert torch.allclose(loss, loss_torch, rtol=1e-5)
    for got, want in zip(grads, grads_torch, strict=True):
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("kernels", [pytest.param(True, marks=needs_compiler), False])
def test_output_grad_at_positions_is_the_dense_product_gathered(kernels, monkeypatch):
    """``OutputGrad.at`` gives ``(gᵀx)[i, j]`` at CSR positions, by the SDDMM kernel or, with the kernels switched off
    between forward and backward, gathered from the dense product."""
    from sparse_peft.sparse.kernel_delta import OutputGrad

    calls = []
    if not kernels:
        monkeypatch.setattr(cpu_kernel, "sddmm", lambda *args: calls.append(args) and None)
    torch.manual_seed(0)
    g, x = torch.randn(40, 7), torch.randn(40, 11)
    mask = torch.rand(7, 11) < 0.3
    mask[3] = False  # an empty row
    csr = mask.float().to_sparse_csr()
    crow, col = csr.crow_indices().long(), csr.col_indices().long()
    grad = OutputGrad(g, x)
    found = grad.at(crow, col)
    torch.testing.assert_close(found, (g.t() @ x)[mask], rtol=1e-5, atol=1e-5)
    assert (grad._dense is None) == kernels  # the kernel's path never forms the dense product
    assert len(calls) == (0 if kernels else 1)
