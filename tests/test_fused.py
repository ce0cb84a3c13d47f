"""The one-GEMM entry-sparse path: ``x · (W + Σ scatter(values))ᵀ``, gradients only at the k entries."""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import pytest
import torch
from conftest import INPUT
from peft import get_peft_model
from torch import nn

import sparse_peft.sparse.delta as delta_mod
from sparse_peft import LiftConfig, LiftLinear
from sparse_peft.sparse.delta import (
    FUSED_MIN_TOKENS,
    DeltaTerm,
    LowRank,
    SparsePattern,
    dense_delta,
    fused_sparse_linear,
    prefer_fused,
)

SHAPE = (12, 10)


def _term(k: int, seed: int, n_trainable: int | None = None, shape=SHAPE) -> tuple[DeltaTerm, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    indices = torch.randperm(shape[0] * shape[1], generator=g)[:k].to(torch.int32)
    values = torch.randn(k, generator=g, dtype=torch.float64, requires_grad=True)
    pattern = SparsePattern.build(indices, shape)
    return DeltaTerm(pattern, k if n_trainable is None else n_trainable), values


def _weight(shape=SHAPE) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)


def test_forward_and_gradients_equal_the_dense_computation():
    """y, ∂x and ∂values of two deltas with a bias equal autograd through the dense W + ΔW₁ + ΔW₂, gathered."""
    weight, bias = _weight(), torch.randn(SHAPE[0], dtype=torch.float64)
    original = weight.clone()
    (t1, v1), (t2, v2) = _term(30, 0), _term(20, 1, n_trainable=15)
    assert set(t1.pattern.flat.tolist()) & set(t2.pattern.flat.tolist())  # overlapping terms restore too
    x = torch.randn(3, 4, SHAPE[1], dtype=torch.float64, requires_grad=True)
    probe = torch.randn(3, 4, SHAPE[0], dtype=torch.float64)
    (fused_sparse_linear(x, lambda: weight, bias, [t1, t2], [v1, v2]) * probe).sum().backward()

    d1 = dense_delta(v1.detach(), t1.pattern.flat, SHAPE).requires_grad_(True)
    d2 = dense_delta(v2.detach(), t2.pattern.flat, SHAPE).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    ((x_ref @ (weight + d1 + d2).t() + bias) * probe).sum().backward()

    assert torch.allclose(x.grad, x_ref.grad)
    assert torch.allclose(v1.grad, d1.grad.reshape(-1)[t1.pattern.flat])
    assert torch.allclose(v2.grad[:15], d2.grad.reshape(-1)[t2.pattern.flat[:15]])
    assert torch.all(v2.grad[15:] == 0)  # the frozen tail takes part in the forward only
    assert torch.equal(weight, original)  # W_eff was built in W's storage and undone bitwise


def test_folded_low_rank_terms_equal_the_dense_computation(monkeypatch):
    """Two sparse terms and two low-rank terms (one frozen) folded into W_eff: y and every gradient equal autograd
    through the dense W + s₁B₁A₁ + s₂B₂A₂ + ΔW₁ + ΔW₂; W is never written, nothing weight-sized is saved."""
    weight, bias = _weight(), torch.randn(SHAPE[0], dtype=torch.float64)
    original = weight.clone()
    (t1, v1), (t2, v2) = _term(30, 0), _term(20, 1)
    g = torch.Generator().manual_seed(5)
    a1 = torch.randn(3, SHAPE[1], generator=g, dtype=torch.float64, requires_grad=True)
    b1 = torch.randn(SHAPE[0], 3, generator=g, dtype=torch.float64, requires_grad=True)
    a2 = torch.randn(2, SHAPE[1], generator=g, dtype=torch.float64)
    b2 = torch.randn(SHAPE[0], 2, generator=g, dtype=torch.float64)
    low_rank = [LowRank(a1, b1, 0.5), LowRank(a2, b2, -2.0)]
    records = _track_builds(monkeypatch)
    x = torch.randn(2, 5, SHAPE[1], dtype=torch.float64, requires_grad=True)  # 100 < 120 entries of W
    probe = torch.randn(2, 5, SHAPE[0], dtype=torch.float64)
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = fused_sparse_linear(x, lambda: weight, bias, [t1, t2], [v1, v2], low_rank)
    (y * probe).sum().backward()
    assert max(saved) < SHAPE[0] * SHAPE[1] and not any(own for _, own, _ in records)
    assert torch.equal(weight, original)

    leaves = [t.detach().clone().requires_grad_(True) for t in (x, v1, v2, a1, b1)]
    x_r, v1_r, v2_r, a1_r, b1_r = leaves
    dense = weight + 0.5 * b1_r @ a1_r - 2.0 * b2 @ a2
    dense = dense + dense_delta(v1_r, t1.pattern.flat, SHAPE) + dense_delta(v2_r, t2.pattern.flat, SHAPE)
    y_ref = x_r @ dense.t() + bias
    (y_ref * probe).sum().backward()
    assert torch.allclose(y, y_ref)
    for got, want in zip((x, v1, v2, a1, b1), leaves, strict=True):
        assert torch.allclose(got.grad, want.grad)


def test_low_rank_terms_alone_and_gradcheck():
    """A layer whose sparse part is empty (RoSA at density 0) still folds its LoRA; gradcheck on x, A and B."""
    weight = _weight((5, 4))
    a = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)

    def run(x_, a_, b_):
        return fused_sparse_linear(x_, lambda: weight, None, [], [], [LowRank(a_, b_, 1.5)])

    assert torch.allclose(run(x, a, b), x @ (weight + 1.5 * b @ a).t())
    assert torch.autograd.gradcheck(run, (x, a, b))


def test_gradcheck():
    weight = _weight((5, 4))
    term, values = _term(7, 2, shape=(5, 4))
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: fused_sparse_linear(a, lambda: weight, None, [term], [b]), (x, values))


def _track_builds(monkeypatch) -> list[tuple[weakref.ref, bool, int]]:
    """Record every W_eff built: (a weak reference, whether it is the base's own storage, how many were alive)."""
    records: list[tuple[weakref.ref, bool, int]] = []
    build = delta_mod.effective_weight

    @contextmanager
    def tracked(weight, *args, **kwargs):
        with build(weight, *args, **kwargs) as out:
            alive = sum(ref() is not None for ref, own, _ in records if not own) + 1
            records.append((weakref.ref(out), out.data_ptr() == weight.data_ptr(), alive))
            yield out

    monkeypatch.setattr(delta_mod, "effective_weight", tracked)
    return records


def _three_layers(monkeypatch, x_dtype: torch.dtype, grad: bool = True):
    out_f, in_f = 64, 48
    layers = [nn.Linear(in_f, out_f, bias=False).requires_grad_(False) for _ in range(3)]
    originals = [layer.weight.detach().clone() for layer in layers]
    terms = [_term(40, seed, shape=(out_f, in_f)) for seed in range(3)]
    records = _track_builds(monkeypatch)
    x = torch.randn(5, in_f, dtype=x_dtype, requires_grad=grad)
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        with torch.set_grad_enabled(grad):
            h = x
            for layer, (term, values) in zip(layers, terms, strict=True):
                h = fused_sparse_linear(h[..., :in_f], lambda w=layer.weight: w, None, [term], [values])
                h = torch.cat([h, h], dim=-1)[..., :in_f]
    if grad:
        h.sum().backward()
    for layer, original in zip(layers, originals, strict=True):
        assert torch.equal(layer.weight, original)  # bitwise the base after every pass
        assert not layer.weight.requires_grad and layer.weight.grad is None
    assert not saved or max(saved) < out_f * in_f  # nothing weight-sized kept for backward
    return records


def test_training_builds_w_eff_in_place_and_restores_the_base(monkeypatch):
    """Memory promise: a float32 base trained in float32 gets no out x in copy at all (3 forwards, 3 backwards)."""
    records = _three_layers(monkeypatch, torch.float32)
    assert len(records) == 6 and all(own for _, own, _ in records)


def test_another_dtype_gets_one_transient_at_a_time(monkeypatch):
    """A float32 base under float64 inputs: W_eff is a cast copy, and each dies before the next is built."""
    records = _three_layers(monkeypatch, torch.float64)
    assert len(records) == 6 and not any(own for _, own, _ in records)
    assert max(alive for _, _, alive in records) == 1


def test_inference_never_writes_the_shared_weight(monkeypatch):
    """Without gradients (inference, possibly from several threads) W_eff is a copy, never the base's storage."""
    records = _three_layers(monkeypatch, torch.float32, grad=False)
    assert len(records) == 3 and not any(own for _, own, _ in records)


def test_an_inference_mode_weight_is_never_written():
    """A weight made under ``torch.inference_mode`` cannot be written outside it: W_eff is then a copy."""
    with torch.inference_mode():
        weight = _weight()
    term, values = _term(30, 0)
    x = torch.randn(3, SHAPE[1], dtype=torch.float64, requires_grad=True)
    fused_sparse_linear(x, lambda: weight, None, [term], [values]).sum().backward()
    assert values.grad is not None and x.grad is not None


def test_base_is_restored_when_the_gemm_fails():
    weight = _weight()
    original = weight.clone()
    term, values = _term(30, 0)
    with pytest.raises(RuntimeError):
        fused_sparse_linear(torch.randn(3, SHAPE[1] + 1, dtype=torch.float64), lambda: weight, None, [term], [values])
    assert torch.equal(weight, original)


def test_inference_rule():
    """Training always takes the one-GEMM path; without gradients, few tokens take base + CSR."""
    assert prefer_fused(tokens=1, training=True)
    assert not prefer_fused(tokens=FUSED_MIN_TOKENS - 1, training=False)
    assert prefer_fused(tokens=FUSED_MIN_TOKENS, training=False)


def _lift_model(tiny):
    return get_peft_model(tiny, LiftConfig(r=2, filter_rank=4, init_weights=False))


def test_layer_uses_the_fused_path_in_training_and_both_paths_agree(base_model, monkeypatch):
    model = _lift_model(base_model)
    calls = []
    original = delta_mod.FusedSparseLinear.apply
    monkeypatch.setattr(delta_mod.FusedSparseLinear, "apply", lambda *a: calls.append(1) or original(*a))
    model.train()
    trained = model(INPUT).logits
    trained.sum().backward()
    n_layers = sum(isinstance(m, LiftLinear) for m in model.modules())
    assert len(calls) == n_layers
    patterns = [m.pattern("default") for m in model.modules() if isinstance(m, LiftLinear)]
    assert not any("_transposed_layout" in vars(p) for p in patterns)  # training never builds the ΔWᵀ layout
    calls.clear()
    model.eval()
    with torch.no_grad():
        csr = model(INPUT[:, :1]).logits  # one token: base + CSR (the inference rule)
        assert not calls
        full = model(INPUT).logits
    assert torch.allclose(trained, full, atol=1e-5)
    assert torch.allclose(csr[:, 0], full[:, 0], atol=1e-5)


def test_trainable_base_weight_falls_back_to_the_base_layer(base_model):
    """A base weight made trainable by hand still gets its gradient (the fused path would not give one)."""
    model = _lift_model(base_model)
    layer = next(m for m in model.modules() if isinstance(m, LiftLinear))
    layer.get_base_layer().weight.requires_grad_(True)
    model(INPUT, labels=INPUT).loss.backward()
    assert layer.get_base_layer().weight.grad is not None
    assert layer.values["default"].grad is not None


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_fused_equals_base_kernel_plus_csr(base_dir, bits):
    """On a bitsandbytes base the fused path (dequantize once, add Δ, one GEMM) equals the float computation on the
    dequantized weight, and the quantized kernel plus the sparse term within that kernel's own tolerance.

    bitsandbytes' CPU kernels differ from the float product by their own rounding: 8-bit by its int8
    activations, and 4-bit by bfloat16 arithmetic on CPUs with AVX512-BF16 (exact float32 elsewhere), so that
    comparison takes 2% (8-bit) and 1% (4-bit) of the output's scale."""
    pytest.importorskip("bitsandbytes")
    from conftest import quantized_base

    model = _lift_model(quantized_base(base_dir, bits))
    model.eval()
    layer = next(m for m in model.modules() if isinstance(m, LiftLinear))
    assert layer.quantization_backend is not None
    x = torch.randn(2, FUSED_MIN_TOKENS, layer.in_features)
    with torch.no_grad():
        fused = layer(x)  # enough tokens for the one-GEMM path: dequantize once, add ΔW
        values, _ = layer._all_values("default")
        reference = x @ (layer.base_weight_float() + layer.get_delta_weight("default")).t()
        csr = layer.base_layer(x) + delta_mod.sparse_delta_matmul(x, values, layer.pattern("default"), layer.shape)
    scale = csr.abs().max()
    assert torch.allclose(fused, reference, atol=1e-5 * scale, rtol=0)
    assert (fused - csr).abs().max() <= (0.02 if bits == 8 else 0.01) * scale
