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
direction), with ``gᵀx`` formed once and shared by every adapter's factor gradient. ``τ`` is found in forward only
(a selection, not a sort); backward reuses it. The kernel always runs in float32 (``cdist`` has no half-precision
path on CPU), whatever the factors' and inputs' dtypes; the GEMMs run in the layer's compute dtype.

Two implementations of the same formulas, chosen per call by :func:`compiled`: on float32 CPU tensors the compiled
kernels of :mod:`sparse_peft.sparse.cpu_kernel` (the kernel row by row, ``τ`` by an exact radix select, one sweep
that adds the survivors into ``W`` and, in backward, also accumulates the factors' gradients, from ``gᵀx`` at the
survivors only, an SDDMM, when few survive: :data:`SPARSE_GRAD_MAX_KEPT`); elsewhere ``cdist``,
``kthvalue`` and elementwise torch operations (about twenty passes over the ``(m, n)`` entries per term and step).
Every path takes ``ΔW`` and ``τ`` from :func:`delta_and_threshold`, so forward, backward, merge and inspection keep
the same survivors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import torch
import torch.nn.functional as F

from . import cpu_kernel
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


def compiled(a: torch.Tensor, b: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether this term runs on the compiled kernels (float32 factors and operands on the CPU, see
    :mod:`sparse_peft.sparse.cpu_kernel`); else on ``cdist`` and ``kthvalue``."""
    return cpu_kernel.snell_applies(a, b, *others)


def delta_and_threshold(
    a: torch.Tensor, b: torch.Tensor, scale: float, n_drop: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ΔW, τ)`` of one term in the kernel dtype (no gradient): every path (training, merging, inspection) finds
    its survivors here, so they agree bitwise on a given machine."""
    dtype = kernel_dtype(a.dtype)
    with torch.no_grad():
        a, b = a.detach().to(dtype), b.detach().to(dtype)
        if not compiled(a, b):
            delta, _, _ = kernel_delta(a, b, scale)
            return delta, competition_threshold(delta, n_drop)
        delta = cpu_kernel.snell_delta(a, b, scale)
        tau = cpu_kernel.kth_abs(delta, n_drop) if n_drop > 0 else -1.0
        return delta, torch.tensor(tau, dtype=torch.float32)


def sparse_kernel_weight(a: torch.Tensor, b: torch.Tensor, scale: float, n_drop: int) -> torch.Tensor:
    """The dense sparsified ``ΔW_s`` in the kernel dtype (merging and inspection; no autograd needed)."""
    delta, tau = delta_and_threshold(a, b, scale, n_drop)
    return sparsify(delta, tau)[0]


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
            delta, tau = delta_and_threshold(a, b, scale, n_drop)
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
    a32, b32 = a.detach().to(dtype), b.detach().to(dtype)
    if compiled(a32, b32):
        delta_s = torch.zeros(b.shape[1], a.shape[1], dtype=torch.float32)
        grad_a, grad_b = cpu_kernel.snell_backward(dense_grad, a32, b32, scale, float(tau), delta_s, delta_s)
        return delta_s, _cast(grad_a, a.dtype), _cast(grad_b, b.dtype)
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


def _cast(tensor: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor.to(dtype)


def _summed_deltas(
    factors: Sequence[torch.Tensor], scales: Sequence[float], n_drops: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ_a ΔW_s,a, τ)`` in float32, the thresholds found by ``kthvalue`` (forward only; backward reuses them)."""
    if not scales:
        raise ValueError("KernelSparseLinear needs at least one adapter's factors")
    total: Optional[torch.Tensor] = None
    found = []
    for i, (scale, n_drop) in enumerate(zip(scales, n_drops, strict=True)):
        delta, tau = delta_and_threshold(factors[2 * i].float(), factors[2 * i + 1].float(), scale, n_drop)
        found.append(tau)
        delta_s, _ = sparsify(delta, tau)
        del delta
        total = delta_s if total is None else total.add_(delta_s)
    return total, torch.stack(found)  # type: ignore[return-value]


class KernelSparseLinear(torch.autograd.Function):
    """``y = x (W + Σ_a ΔW_s,a)ᵀ + b`` on one GEMM each way (see the module docstring).

    Saved for backward: ``x``, the factors and the ``τ`` s; ``W`` is re-read from ``weight_fn`` (a quantized base is
    dequantized again) and every ``out x in`` tensor is a transient of one pass. The base never needs
    ``requires_grad``. On float32 CPU layers the kernel, the selection of ``τ``, the sum into ``W`` and the factors'
    gradients run in the compiled kernels (:func:`_compiled_weight`, :func:`_compiled_backward`): one sweep over the
    ``(m, n)`` entries per term and pass, besides the selection, instead of about twenty elementwise torch passes.
    """

    @staticmethod
    def forward(ctx, x, bias, weight_fn, scales, n_drops, *factors):  # type: ignore[override]
        dtype = compute_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False), torch.no_grad():
            base = weight_fn()
            ctx.compiled = dtype == torch.float32 and compiled(*factors, base)
            if ctx.compiled:
                weight, taus = _compiled_weight(base, factors, scales, n_drops)
            else:
                weight, taus = _summed_deltas(factors, scales, n_drops)
                weight = weight.to(dtype).add_(base.to(dtype))
            del base
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
        with torch.autocast(device_type=x.device.type, enabled=False):
            # ∂L/∂ΔW_s, shared by all adapters; each adapter's kernel is evaluated once for its grads and for ∂x
            grad_delta = OutputGrad(g2, x.reshape(-1, x.shape[-1]))
            step = _compiled_backward if ctx.compiled else _torch_backward
            weight, grads = step(ctx, grad_delta, taus, factors, needs, needs_x)
            del grad_delta
            grad_x = None
            if weight is not None:
                grad_x = (g2.to(ctx.dtype) @ weight).reshape(x.shape).to(x.dtype)
                del weight
            grad_bias = g2.sum(0).to(ctx.dtype) if needs_bias else None
        return (grad_x, grad_bias, None, None, None, *grads)


class OutputGrad:
    """``∂L/∂ΔW_s = gᵀx`` of one layer's backward, in float32: the dense ``(m, n)`` product (one GEMM, formed at
    most once and shared by every term) or its entries at given CSR positions only (the SDDMM of
    :func:`sparse_peft.sparse.cpu_kernel.sddmm`)."""

    def __init__(self, g: torch.Tensor, x: torch.Tensor) -> None:
        self.g, self.x = g.float(), x.float()
        self._dense: Optional[torch.Tensor] = None

    def dense(self) -> torch.Tensor:
        if self._dense is None:
            self._dense = self.g.t() @ self.x
        return self._dense

    def at(self, crow: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        slot = torch.arange(col.numel(), dtype=torch.int64)
        found = cpu_kernel.sddmm(self.g, self.x, crow, col, slot)
        if found is None:  # kernels switched off between forward and backward: gather from the dense product
            rows = torch.repeat_interleave(torch.arange(crow.numel() - 1), crow.diff())
            found = self.dense()[rows, col]
        return found


#: The sparse backward (the gradient at the survivors by SDDMM, :func:`_compiled_backward`) runs when at most this
#: fraction of ``ΔW`` survives; above it the dense ``gᵀx`` is cheaper. Measured on 2 CPU cores, torch 2.13, one
#: float32 layer, 800 tokens, r = 16, forward + backward against a rank-16 LoRA layer, medians of 12 (2026-12-03),
#: sparse / dense backward at 10 / 20 / 30 % kept: 576x576 1.24 / 1.34x, 1.52 / 1.47x, 1.79 / 1.51x; 1536x576
#: 1.25 / 1.49x, 1.52 / 1.43x, 1.69 / 1.53x; 576x1536 1.29 / 1.48x, 1.56 / 1.52x, 1.78 / 1.58x; 192x576 1.28 /
#: 1.36x, 1.50 / 1.39x, 1.69 / 1.43x. The crossover sits between 10 and 20 %.
SPARSE_GRAD_MAX_KEPT = 0.15


def _compiled_weight(
    base: torch.Tensor, factors: Sequence[torch.Tensor], scales: Sequence[float], n_drops: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W + Σ_a ΔW_s,a, τ)`` in float32 by the compiled kernels: each term's ``ΔW`` and ``τ``
    (:func:`delta_and_threshold`), then one sweep adding its survivors into the running sum (see
    :func:`_running_sum`)."""
    out, source, finish = _running_sum(base, len(scales))
    found = []
    for i, (scale, n_drop) in enumerate(zip(scales, n_drops, strict=True)):
        delta, tau = delta_and_threshold(factors[2 * i], factors[2 * i + 1], scale, n_drop)
        cpu_kernel.snell_apply(delta, float(tau), source, out)
        source = out
        found.append(tau)
    return finish(out), torch.stack(found)


def _running_sum(
    base: torch.Tensor, terms: int
) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """``(out, first source, finish)`` for summing ``terms`` deltas into ``W``: one term goes straight onto ``W``;
    several are summed from zero and ``W`` is added last, as the torch path does, so an identity init's two opposite
    terms cancel exactly before they meet ``W``."""
    base = base.contiguous()
    if terms == 1:
        return torch.empty(base.shape, dtype=torch.float32), base, lambda out: out
    out = torch.zeros(base.shape, dtype=torch.float32)
    return out, out, lambda total: total.add_(base)


def _compiled_backward(ctx, grad_delta: OutputGrad, taus, factors, needs, needs_x):
    """``(W + Σ_a ΔW_s,a or None, factor grads)`` by the compiled kernels: per term one sweep that rebuilds its
    survivors (with the forward's ``τ``) into the running sum for ``∂x`` and gives its factors' gradients, from
    ``gᵀx`` at the survivors only (SDDMM) when at most :data:`SPARSE_GRAD_MAX_KEPT` of ``ΔW`` survives, else from
    the dense ``gᵀx``."""
    grads: list[Optional[torch.Tensor]] = [None] * len(factors)
    out = source = finish = None
    if needs_x:
        out, source, finish = _running_sum(ctx.weight_fn(), len(ctx.scales))
    for i, scale in enumerate(ctx.scales):
        wanted = needs[2 * i] or needs[2 * i + 1]
        if not wanted and not needs_x:
            continue
        a, b, tau = factors[2 * i], factors[2 * i + 1], float(taus[i])
        numel = b.shape[1] * a.shape[1]
        if wanted and numel - ctx.n_drops[i] <= SPARSE_GRAD_MAX_KEPT * numel:
            survivors = cpu_kernel.snell_survivors(a, b, scale, tau, source, out)
            grad_a, grad_b = cpu_kernel.snell_sparse_grads(grad_delta.at(*survivors[:2]), survivors, a, b)
        else:
            dense = grad_delta.dense() if wanted else None
            grad_a, grad_b = cpu_kernel.snell_backward(dense, a, b, scale, tau, source, out)
        source = out
        grads[2 * i] = grad_a if needs[2 * i] else None
        grads[2 * i + 1] = grad_b if needs[2 * i + 1] else None
    return (None if out is None else finish(out)), grads


def _torch_backward(ctx, grad_delta: OutputGrad, taus, factors, needs, needs_x):
    """The same as :func:`_compiled_backward` on torch operations (``cdist`` kernel, elementwise passes, the dense
    ``gᵀx``)."""
    grads: list[Optional[torch.Tensor]] = [None] * len(factors)
    total: Optional[torch.Tensor] = None
    for i, scale in enumerate(ctx.scales):
        wanted = grad_delta.dense() if needs[2 * i] or needs[2 * i + 1] else None
        if wanted is None and not needs_x:
            continue
        a, b = factors[2 * i], factors[2 * i + 1]
        delta_s, grads[2 * i], grads[2 * i + 1] = _adapter_backward(wanted, a, b, scale, taus[i], torch.float32)
        if needs_x:
            total = delta_s if total is None else total.add_(delta_s)
        del delta_s
    weight = None
    if total is not None:
        weight = total.to(ctx.dtype).add_(ctx.weight_fn().to(ctx.dtype))
    return weight, grads


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
