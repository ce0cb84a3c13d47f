"""Linear layers whose weight is rebuilt from a frozen base and small factors instead of being kept for backward.

Methods such as LoRS and SPP adapt a (usually pruned) weight ``W`` through a cheap function of a few small
factors ``θ`` (low-rank ``A``/``B``, or SPP's ``α``/``β``)::

    y = x · W_eff(θ)ᵀ + b        with  W_eff = build(θ)  (reads the frozen base W itself)

Autograd through ``F.linear(x, build(θ))`` would keep ``W_eff`` (and every intermediate of ``build``, e.g. the mask
and ``BA``) alive from forward to backward: several ``out x in`` tensors per layer. :func:`recomputed_linear`
instead saves only ``x`` and ``θ`` and calls ``build`` again in backward (LoRS's *weight recompute*):

* forward:  ``W_eff = build(θ)`` (a transient, freed before returning), ``y = x W_effᵀ + b``
* backward: ``W_eff = build(θ)`` again, ``∂L/∂x = g W_eff``;
  ``∂L/∂θ`` either *exactly*, by back-propagating the dense ``∂L/∂W_eff = gᵀx`` through ``build`` (a transient of
  this one layer), or through a caller-supplied ``factor_grads(g, x, *θ)`` that never forms ``gᵀx`` (LoRS's
  straight-through gradient).

``build`` reads the base weight itself (a closure over the layer), so a quantized base is dequantized again in
backward instead of being kept dequantized. Nothing of size ``out x in`` is saved for backward, which
``tests/test_spp_lors.py`` checks with ``torch.autograd.graph.saved_tensors_hooks``.

The cost is one extra ``build`` per backward (an ``out·in·r`` addmm for LoRS, an elementwise product for SPP).
Under autocast the product runs in the autocast dtype; the factors' gradients come back in the factors' dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import torch
import torch.nn.functional as F

from .delta import compute_dtype

WeightBuilder = Callable[..., torch.Tensor]
FactorGrads = Callable[..., Sequence[Optional[torch.Tensor]]]


class _RecomputedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, build, factor_grads, *factors):
        dtype = compute_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False), torch.no_grad():
            weight = build(*factors).to(dtype)
            out = F.linear(x.to(dtype), weight, None if bias is None else bias.to(dtype))
        del weight  # the transient dies here; backward rebuilds it
        ctx.build, ctx.factor_grads, ctx.dtype = build, factor_grads, dtype
        ctx.save_for_backward(x, *factors)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, *factors = ctx.saved_tensors
        needs_x, needs_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        needs = ctx.needs_input_grad[4:]
        g2 = grad_out.reshape(-1, grad_out.shape[-1]).to(ctx.dtype)
        x2 = x.reshape(-1, x.shape[-1]).to(ctx.dtype)
        factor_grads: list[Optional[torch.Tensor]] = [None] * len(factors)
        weight = None
        with torch.autocast(device_type=x.device.type, enabled=False):
            if any(needs) and ctx.factor_grads is not None:
                factor_grads = list(ctx.factor_grads(g2, x2, *factors))
            elif any(needs):
                factor_grads, weight = _exact_factor_grads(ctx.build, g2, x2, factors, needs)
            grad_x = None
            if needs_x:
                if weight is None:
                    with torch.no_grad():
                        weight = ctx.build(*factors)
                grad_x = (g2 @ weight.to(ctx.dtype)).reshape(*x.shape[:-1], -1).to(x.dtype)
        del weight
        grad_bias = g2.sum(0) if needs_bias else None
        factor_grads = [
            None if (grad is None or not need) else grad.to(factor.dtype)
            for grad, factor, need in zip(factor_grads, factors, needs, strict=True)
        ]
        return (grad_x, grad_bias, None, None, *factor_grads)


def _exact_factor_grads(
    build: WeightBuilder,
    g2: torch.Tensor,
    x2: torch.Tensor,
    factors: Sequence[torch.Tensor],
    needs: Sequence[bool],
) -> tuple[list[Optional[torch.Tensor]], torch.Tensor]:
    """Back-propagate the dense ``∂L/∂W_eff = gᵀx`` (a transient of this layer) through ``build``.

    Returns the factor gradients and the rebuilt (detached) weight, which the caller reuses for ``∂L/∂x``.
    """
    with torch.enable_grad():
        leaves = [f.detach().requires_grad_(bool(need)) for f, need in zip(factors, needs, strict=True)]
        weight = build(*leaves)
        dense_grad = g2.t().to(weight.dtype) @ x2.to(weight.dtype)
        wanted = [leaf for leaf, need in zip(leaves, needs, strict=True) if need]
        grads = iter(torch.autograd.grad(weight, wanted, dense_grad, allow_unused=True))
    del dense_grad
    return [next(grads) if need else None for need in needs], weight.detach()


def recomputed_linear(
    x: torch.Tensor,
    build: WeightBuilder,
    factors: Sequence[torch.Tensor],
    bias: Optional[torch.Tensor] = None,
    factor_grads: Optional[FactorGrads] = None,
) -> torch.Tensor:
    """``x · build(*factors)ᵀ + bias`` keeping only ``x`` and ``factors`` for backward (see the module docstring).

    Args:
        x: input, ``(..., in)``.
        build: ``build(*factors) -> (out, in)`` effective weight; differentiable in the factors, reads the frozen
            base itself and must give the same result in forward and backward.
        factors: the small tensors the weight depends on (trainable or not).
        bias: optional frozen (or trainable) bias, ``(out,)``.
        factor_grads: optional ``factor_grads(g, x, *factors) -> grads`` with ``g`` ``(tokens, out)`` and ``x``
            ``(tokens, in)``, replacing the exact gradient (e.g. LoRS's straight-through one).
    """
    return _RecomputedLinear.apply(x, bias, build, factor_grads, *factors)
