"""SNELL's kernelised low-rank delta with competition-based sparsification, as a memory-lean autograd Function.

With factor pairs ``A_h ∈ ℝ^{n×r/2}`` (input side) and ``B_h ∈ ℝ^{m×r/2}`` (output side), ``h ∈ {0, 1}``:

* kernel (piecewise-linear distance):  ``ΔW[o, i] = c·(‖B_0[o] − A_0[i]‖₂ − ‖B_1[o] − A_1[i]‖₂)``, shape ``(m, n)``
* competition:  ``τ`` = the ``n_drop``-th smallest ``|ΔW|`` (``n_drop = round(s·m·n)``),
  ``ΔW_s = ΔW ⊙ stopgrad(|ΔW|) ⊙ 1[|ΔW| > τ]``
* output:  ``y = x ΔW_sᵀ``.

:class:`KernelSparseDelta` saves only ``x``, the factors and the scalar ``τ``; the dense ``ΔW`` is a per-layer
transient in forward and is recomputed in backward (the reference gets the same effect from activation
checkpointing). Its gradient (``∂L/∂ΔW_s = gᵀx``, ``(m, n)``) is a transient of backward as well; what persists is
the factors and their optimizer state only. No PEFT imports here.

:class:`KernelSparseLinear` is the training path of a whole SNELL layer: ``y = x (W + Σ_a ΔW_s,a)ᵀ + b`` as **one**
GEMM forward and one GEMM for ``∂x`` (instead of the base layer's GEMM plus a second one for the delta in each
direction), with ``gᵀx`` formed once and shared by every adapter's factor gradient. ``τ`` comes from
``torch.kthvalue`` (a selection, not a sort) in forward only; backward reuses it. The kernel always runs in float32
(``cdist`` has no half-precision path on CPU), whatever the factors' and inputs' dtypes; the GEMMs run in the
layer's compute dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import torch
import torch.nn.functional as F

from .delta import compute_dtype


def kernel_delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ΔW, D_0, D_1)`` with ``D_h[o, i] = ‖B_h[o] − A_h[i]‖`` and ``ΔW = c·(D_0 − D_1)``; ``a``: ``(2, n, r/2)``,
    ``b``: ``(2, m, r/2)``."""
    d0 = torch.cdist(b[0], a[0])
    d1 = torch.cdist(b[1], a[1])
    return scale * (d0 - d1), d0, d1


def competition_threshold(delta: torch.Tensor, n_drop: int) -> torch.Tensor:
    """``τ``: the ``n_drop``-th smallest ``|ΔW|`` (a 0-d tensor; ``-1`` when nothing is dropped)."""
    if n_drop <= 0:
        return torch.full((), -1.0, dtype=delta.dtype, device=delta.device)
    return torch.kthvalue(delta.abs().reshape(-1), n_drop).values


def sparsify(delta: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ΔW_s, weight)`` with ``weight = |ΔW| ⊙ 1[|ΔW| > τ]`` (no gradient) and ``ΔW_s = ΔW ⊙ weight``."""
    magnitude = delta.detach().abs()
    weight = magnitude * (magnitude > tau)
    return delta * weight, weight


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernel's dtype: float32 for half precisions (``cdist`` has no CPU bfloat16 path), else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def sparse_kernel_weight(a: torch.Tensor, b: torch.Tensor, scale: float, n_drop: int) -> torch.Tensor:
    """The dense sparsified ``ΔW_s`` in the kernel dtype (merging and inspection; no autograd needed)."""
    dtype = kernel_dtype(a.dtype)
    delta, _, _ = kernel_delta(a.to(dtype), b.to(dtype), scale)
    return sparsify(delta, competition_threshold(delta, n_drop))[0]


def _pair_grads(m: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``Σ M[o,i]·‖B[o] − A[i]‖`` given ``M = G/D``: ``∂/∂B = rowsum(M)·B − M A``,
    ``∂/∂A = colsum(M)·A − Mᵀ B``."""
    grad_b = m.sum(1, keepdim=True) * b - m @ a
    grad_a = m.sum(0).unsqueeze(1) * a - m.t() @ b
    return grad_a, grad_b


def _safe_ratio(g: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``g / d`` where ``d > 0``, else 0 (the distance is not differentiable at 0; cdist also uses 0 there)."""
    return torch.where(d > 0, g / d.clamp_min(torch.finfo(d.dtype).tiny), torch.zeros_like(g))


class KernelSparseDelta(torch.autograd.Function):
    """``y = x ΔW_sᵀ`` alone (see the module docstring), for layers that cannot take :class:`KernelSparseLinear`
    (dropout on the branch, a trainable base); the kernel and the product run in :func:`kernel_dtype`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, n_drop: int):  # type: ignore[override]
        dtype = kernel_dtype(a.dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            delta, _, _ = kernel_delta(a.to(dtype), b.to(dtype), scale)
            tau = competition_threshold(delta, n_drop)
            delta_s, _ = sparsify(delta, tau)
            del delta
            y = x.reshape(-1, x.shape[-1]).to(dtype) @ delta_s.t()
        ctx.save_for_backward(x, a, b, tau)
        ctx.scale = scale
        return y.reshape(*x.shape[:-1], b.shape[1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        x, a, b, tau = ctx.saved_tensors
        dtype = tau.dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            g2 = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
            wants_factors = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
            dense_grad = g2.t() @ x2 if wants_factors else None
            delta_s, grad_a, grad_b = _adapter_backward(dense_grad, a, b, ctx.scale, tau, dtype)
            del dense_grad
            grad_x = (g2 @ delta_s).reshape(x.shape).to(x.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, grad_a, grad_b, None, None


def _adapter_backward(
    dense_grad: Optional[torch.Tensor],
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    tau: torch.Tensor,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """One adapter's ``ΔW_s`` (for ``∂x``) and, given ``∂L/∂ΔW_s = gᵀx``, its ``(∂L/∂A, ∂L/∂B)``, from one
    evaluation of its kernel in ``dtype`` (backward recomputes the kernel once, not once per use)."""
    delta, d0, d1 = kernel_delta(a.to(dtype), b.to(dtype), scale)
    delta_s, weight = sparsify(delta, tau.to(dtype))
    del delta
    if dense_grad is None:
        return delta_s, None, None
    g_delta = dense_grad * weight  # ∂L/∂ΔW through the detached magnitude weighting
    del weight
    grad_a0, grad_b0 = _pair_grads(scale * _safe_ratio(g_delta, d0), a[0].to(dtype), b[0].to(dtype))
    grad_a1, grad_b1 = _pair_grads(-scale * _safe_ratio(g_delta, d1), a[1].to(dtype), b[1].to(dtype))
    grad_a, grad_b = torch.stack([grad_a0, grad_a1]).to(a.dtype), torch.stack([grad_b0, grad_b1]).to(b.dtype)
    return delta_s, grad_a, grad_b


def _summed_deltas(
    factors: Sequence[torch.Tensor], scales: Sequence[float], n_drops: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ_a ΔW_s,a, τ)`` in float32, the thresholds found by ``kthvalue`` (forward only; backward reuses them)."""
    if not scales:
        raise ValueError("KernelSparseLinear needs at least one adapter's factors")
    total: Optional[torch.Tensor] = None
    found = []
    for i, (scale, n_drop) in enumerate(zip(scales, n_drops, strict=True)):
        a, b = factors[2 * i].float(), factors[2 * i + 1].float()
        delta, _, _ = kernel_delta(a, b, scale)
        tau = competition_threshold(delta, n_drop)
        found.append(tau)
        delta_s, _ = sparsify(delta, tau)
        del delta
        total = delta_s if total is None else total.add_(delta_s)
    return total, torch.stack(found)  # type: ignore[return-value]


class KernelSparseLinear(torch.autograd.Function):
    """``y = x (W + Σ_a ΔW_s,a)ᵀ + b`` on one GEMM each way (see the module docstring).

    Saved for backward: ``x``, the factors and the ``τ`` s; ``W`` is re-read from ``weight_fn`` (a quantized base is
    dequantized again) and every ``out x in`` tensor is a transient of one pass. The base never needs
    ``requires_grad``.
    """

    @staticmethod
    def forward(ctx, x, bias, weight_fn, scales, n_drops, *factors):  # type: ignore[override]
        dtype = compute_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False), torch.no_grad():
            weight, taus = _summed_deltas(factors, scales, n_drops)
            weight = weight.to(dtype).add_(weight_fn().to(dtype))
            out = F.linear(x.to(dtype), weight, None if bias is None else bias.to(dtype))
        del weight
        ctx.weight_fn, ctx.scales, ctx.n_drops, ctx.dtype = weight_fn, scales, n_drops, dtype
        ctx.save_for_backward(x, taus, *factors)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, taus, *factors = ctx.saved_tensors
        needs_x, needs_bias, needs = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[5:]
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grads: list[Optional[torch.Tensor]] = [None] * len(factors)
        with torch.autocast(device_type=x.device.type, enabled=False):
            # ∂L/∂ΔW_s, shared by all adapters; each adapter's kernel is evaluated once for its grads and for ∂x
            dense_grad = g2.float().t() @ x.reshape(-1, x.shape[-1]).float() if any(needs) else None
            total: Optional[torch.Tensor] = None
            for i, scale in enumerate(ctx.scales):
                wanted = dense_grad if needs[2 * i] or needs[2 * i + 1] else None
                if wanted is None and not needs_x:
                    continue
                a, b = factors[2 * i], factors[2 * i + 1]
                delta_s, grads[2 * i], grads[2 * i + 1] = _adapter_backward(wanted, a, b, scale, taus[i], torch.float32)
                if needs_x:
                    total = delta_s if total is None else total.add_(delta_s)
                del delta_s
            del dense_grad
            grad_x = None
            if total is not None:
                weight = total.to(ctx.dtype).add_(ctx.weight_fn().to(ctx.dtype))
                del total
                grad_x = (g2.to(ctx.dtype) @ weight).reshape(x.shape).to(x.dtype)
                del weight
            grad_bias = g2.sum(0).to(ctx.dtype) if needs_bias else None
        return (grad_x, grad_bias, None, None, None, *grads)


def kernel_sparse_linear(
    x: torch.Tensor,
    weight_fn: Callable[[], torch.Tensor],
    bias: Optional[torch.Tensor],
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
    scales: Sequence[float],
    n_drops: Sequence[int],
) -> torch.Tensor:
    """``x (W + Σ_a ΔW_s,a)ᵀ + bias`` for the adapters' ``(A, B)`` pairs (see :class:`KernelSparseLinear`);
    ``weight_fn()`` returns the (dequantized) base weight and must give the same tensor in forward and backward."""
    flat = [t for pair in factors for t in pair]
    return KernelSparseLinear.apply(x, bias, weight_fn, tuple(scales), tuple(n_drops), *flat)


def kernel_sparse_matmul(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, n_drop: int) -> torch.Tensor:
    """``x ΔW_sᵀ`` in the factors' dtype (see :class:`KernelSparseDelta`)."""
    return KernelSparseDelta.apply(x, a, b, scale, n_drop)
