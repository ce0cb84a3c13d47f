"""The shared sparse engine: sparse autograd, selection and optimizer-slot surgery."""

from __future__ import annotations

import pytest
import torch

from sparse_peft.sparse.delta import dense_delta, index_dtype, sampled_grad, sparse_delta_matmul
from sparse_peft.sparse.regrow import remap_parameter, slot_state, source_map
from sparse_peft.sparse.select import principal_score, random_score, topk_positions


def _random_delta(shape=(12, 10), k=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    indices = torch.randperm(shape[0] * shape[1], generator=g)[:k].to(torch.int32)
    values = torch.randn(k, generator=g, dtype=torch.float64, requires_grad=True)
    return values, indices


def test_forward_equals_dense_matmul():
    values, indices = _random_delta()
    x = torch.randn(2, 5, 10, dtype=torch.float64)
    expected = x @ dense_delta(values.detach(), indices, (12, 10)).t()
    assert torch.allclose(sparse_delta_matmul(x, values, indices, (12, 10)), expected)


def test_sparse_gradient_equals_dense_gradient_at_indices():
    values, indices = _random_delta()
    x = torch.randn(3, 4, 10, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 4, 12, dtype=torch.float64)
    (sparse_delta_matmul(x, values, indices, (12, 10)) * weight).sum().backward()

    dense = dense_delta(values.detach(), indices, (12, 10)).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    ((x_ref @ dense.t()) * weight).sum().backward()

    assert values.grad.shape == (30,)
    assert torch.allclose(values.grad, dense.grad.reshape(-1)[indices.long()])
    assert torch.allclose(x.grad, x_ref.grad)


def test_frozen_tail_gets_no_gradient():
    values, indices = _random_delta(k=20)
    x = torch.randn(6, 10, dtype=torch.float64)
    sparse_delta_matmul(x, values, indices, (12, 10), n_trainable=15).sum().backward()
    assert torch.all(values.grad[15:] == 0)
    assert torch.any(values.grad[:15] != 0)


def test_gradcheck():
    values, indices = _random_delta(shape=(5, 4), k=7)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: sparse_delta_matmul(a, b, indices, (5, 4)), (x, values))


def test_sampled_grad_matches_dense_product():
    g, x = torch.randn(7, 6), torch.randn(7, 9)
    rows, cols = torch.tensor([5, 0, 3, 3]), torch.tensor([8, 1, 0, 7])
    assert torch.allclose(sampled_grad(g, x, rows, cols, (6, 9)), (g.t() @ x)[rows, cols], atol=1e-5)


def test_no_dense_weight_sized_tensor_saved_for_backward():
    """Memory promise: nothing of size out x in is kept between forward and backward."""
    out_f, in_f = 64, 48
    values, indices = _random_delta(shape=(out_f, in_f), k=40)
    x = torch.randn(2, in_f, dtype=torch.float64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = sparse_delta_matmul(x, values, indices, (out_f, in_f))
    y.sum().backward()
    assert saved and max(saved) < out_f * in_f


def test_index_dtype():
    assert index_dtype(100) == torch.int32
    assert index_dtype(2**31 - 1) == torch.int32
    assert index_dtype(2**31 + 5) == torch.int64


def test_topk_is_brute_force_top_k_and_sorted():
    scores = torch.randn(20, 30)
    chosen = topk_positions(scores, 50, seed=3)
    assert chosen.dtype == torch.int32 and torch.equal(chosen, torch.sort(chosen).values)
    brute = torch.topk(scores.reshape(-1), 50).indices
    assert set(chosen.tolist()) == set(brute.tolist())


def test_topk_ties_are_seeded_and_deterministic():
    scores = torch.ones(100)
    a, b = topk_positions(scores, 10, seed=1), topk_positions(scores, 10, seed=1)
    c = topk_positions(scores, 10, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def _topk_by_full_sort(scores, k, seed, exclude=None):
    """The definition: visit the scores in a seeded random order, stable-sort descending, take the first k."""
    flat = scores.reshape(-1).float().clone()
    if exclude is not None:
        flat[exclude] = float("-inf")
    order = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(seed))
    ranked = torch.sort(flat[order], descending=True, stable=True).indices[:k]
    return torch.sort(order[ranked]).values


@pytest.mark.parametrize("levels", [3, 50, None])
def test_topk_selection_equals_the_full_sort_definition(levels):
    """The O(n) selection picks exactly what the seeded stable full sort picks, with heavy ties, few, or none."""
    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        shape = (17, 23)
        if levels is None:
            scores = torch.randn(shape, generator=generator)
        else:
            scores = torch.randint(0, levels, shape, generator=generator).float()
        k = int(torch.randint(1, scores.numel() + 1, (1,), generator=generator))
        exclude = torch.randperm(scores.numel(), generator=generator)[:5] if trial % 2 else None
        got = topk_positions(scores, k, seed=trial, exclude=exclude)
        assert torch.equal(got.long(), _topk_by_full_sort(scores, k, trial, exclude)), (levels, trial, k)


def test_topk_exclude_and_bounds():
    scores = torch.arange(10.0)
    assert set(topk_positions(scores, 2, exclude=torch.tensor([9])).tolist()) == {7, 8}
    with pytest.raises(ValueError, match="k=11"):
        topk_positions(scores, 11)


def test_principal_score_is_low_rank_magnitude():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 3, generator=g) @ torch.randn(3, 12, generator=g) + 0.01 * torch.randn(16, 12, generator=g)
    u, s, vh = torch.linalg.svd(w)
    expected = ((u[:, :3] * s[:3]) @ vh[:3]).abs()
    assert torch.allclose(principal_score(w, 3), expected, atol=1e-5)
    approx = principal_score(w, 3, randomized=True, niter=4)
    assert torch.allclose(approx, expected, atol=1e-3)
    with pytest.raises(ValueError, match="rank 13"):
        principal_score(w, 13)


def test_random_score_is_seeded():
    assert torch.equal(random_score((4, 4), 7), random_score((4, 4), 7))


def test_source_map():
    old = torch.tensor([10, 3, 7, 42], dtype=torch.int32)
    new = torch.tensor([3, 5, 42, 8], dtype=torch.int32)
    assert source_map(old, new).tolist() == [1, -1, 3, -1]


def test_remap_parameter_moves_values_and_adam_moments():
    param = torch.nn.Parameter(torch.randn(4))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.randn(4)
    optimizer.step()
    state = optimizer.state[param]
    before = {k: state[k].clone() for k in ("exp_avg", "exp_avg_sq")}
    value_before, step_before = param.detach().clone(), state["step"].clone()

    moved = remap_parameter(param, torch.tensor([2, -1, 0, -1]), optimizer)

    assert moved == 2
    assert param.detach().tolist() == pytest.approx([value_before[2].item(), 0.0, value_before[0].item(), 0.0])
    for key, old in before.items():
        assert state[key].tolist() == pytest.approx([old[2].item(), 0.0, old[0].item(), 0.0])
    assert torch.equal(state["step"], step_before)


def test_unknown_per_element_state_is_refused():
    param = torch.nn.Parameter(torch.randn(4))
    optimizer = torch.optim.AdamW([param])
    optimizer.state[param]["mystery"] = torch.zeros(4)
    with pytest.raises(TypeError, match="mystery"):
        slot_state(optimizer, param)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_values_run_in_float32_kernels(dtype):
    values, indices = _random_delta()
    values = values.detach().to(dtype).requires_grad_(True)
    x = torch.randn(4, 10, dtype=dtype, requires_grad=True)
    y = sparse_delta_matmul(x, values, indices, (12, 10))
    y.sum().backward()
    assert values.grad.dtype == dtype and x.grad.dtype == dtype
    expected = x.detach().float() @ dense_delta(values.detach().float(), indices, (12, 10)).t()
    assert torch.allclose(y.float(), expected, atol=1e-2)


def test_runs_under_cpu_bf16_autocast():
    """Trainer's bf16 mixed precision autocasts matmuls; the sparse kernels must opt out (no bf16 CSR on CPU)."""
    values, indices = _random_delta()
    values = values.detach().float().requires_grad_(True)
    x = torch.randn(4, 10, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sparse_delta_matmul(x, values, indices, (12, 10))
    y.sum().backward()
    assert y.dtype == torch.float32 and values.grad is not None and x.grad is not None


def test_magnitude_and_gradient_scores_rank_by_absolute_value():
    from sparse_peft.sparse.select import gradient_score, magnitude_score

    w = torch.tensor([[0.1, -3.0], [2.0, -0.5]])
    assert topk_positions(magnitude_score(w), 2).tolist() == [1, 2]
    assert topk_positions(gradient_score(-w), 1).tolist() == [1]
