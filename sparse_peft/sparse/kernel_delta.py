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
"""

from __future__ import annotations

import torch


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


def sparse_kernel_weight(a: torch.Tensor, b: torch.Tensor, scale: float, n_drop: int) -> torch.Tensor:
    """The dense sparsified ``ΔW_s`` (merging and inspection; no autograd needed)."""
    delta, _, _ = kernel_delta(a, b, scale)
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
    """``y = x ΔW_sᵀ`` (see the module docstring); the factors' dtype is the compute dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, n_drop: int):  # type: ignore[override]
        with torch.autocast(device_type=x.device.type, enabled=False):
            delta, _, _ = kernel_delta(a, b, scale)
            tau = competition_threshold(delta, n_drop)
            delta_s, _ = sparsify(delta, tau)
            del delta
            x2 = x.reshape(-1, x.shape[-1]).to(a.dtype)
            y = x2 @ delta_s.t()
        ctx.save_for_backward(x, a, b, tau)
        ctx.scale = scale
        return y.reshape(*x.shape[:-1], b.shape[1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        x, a, b, tau = ctx.saved_tensors
        scale = ctx.scale
        with torch.autocast(device_type=x.device.type, enabled=False):
            delta, d0, d1 = kernel_delta(a, b, scale)  # recomputed: transient of this layer's backward
            delta_s, weight = sparsify(delta, tau)
            del delta
            x2 = x.reshape(-1, x.shape[-1]).to(a.dtype)
            g2 = grad_out.reshape(-1, grad_out.shape[-1]).to(a.dtype)
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = (g2 @ delta_s).reshape(x.shape).to(x.dtype)
            del delta_s
            grad_a = grad_b = None
            if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
                g_delta = (g2.t() @ x2) * weight  # ∂L/∂ΔW through the detached magnitude weighting
                del weight
                grad_a0, grad_b0 = _pair_grads(scale * _safe_ratio(g_delta, d0), a[0], b[0])
                grad_a1, grad_b1 = _pair_grads(-scale * _safe_ratio(g_delta, d1), a[1], b[1])
                grad_a = torch.stack([grad_a0, grad_a1])
                grad_b = torch.stack([grad_b0, grad_b1])
        return grad_x, grad_a, grad_b, None, None


def kernel_sparse_matmul(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, n_drop: int) -> torch.Tensor:
    """``x ΔW_sᵀ`` in the factors' dtype (see :class:`KernelSparseDelta`)."""
    return KernelSparseDelta.apply(x, a, b, scale, n_drop)
