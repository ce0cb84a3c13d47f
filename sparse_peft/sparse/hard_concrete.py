"""Hard-concrete gates and their expected L0 norm (Louizos et al., 2018), used by diff pruning.

A gate ``z ∈ [0, 1]`` with logit ``log α``, temperature ``β`` and stretch limits ``l < 0 < 1 < r``:

* training (sampled):  ``u ~ U(ε, 1−ε)``, ``s = σ((log u − log(1−u) + log α) / β)``, ``z = clamp(s·(r−l) + l, 0, 1)``
* deterministic:       ``z = clamp(σ(log α)·(r−l) + l, 0, 1)``
* expected L0 norm:    ``P(z ≠ 0) = σ(log α − β·log(−l/r))`` per gate.

The stretch makes exact zeros and ones reachable with non-zero probability, and the expected L0 is differentiable in
``log α``. No PEFT imports here.
"""

from __future__ import annotations

import math

import torch

EPS = 1e-4  # the reference samples u ~ U(0.0001, 0.9999)


def sample_gate(log_alpha: torch.Tensor, left: float, right: float, temperature: float = 1.0) -> torch.Tensor:
    """A sampled gate ``z`` of ``log_alpha``'s shape (differentiable in ``log_alpha``); uses the global RNG."""
    u = torch.empty_like(log_alpha).uniform_(EPS, 1.0 - EPS)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / temperature)
    return (s * (right - left) + left).clamp(0.0, 1.0)


def deterministic_gate(log_alpha: torch.Tensor, left: float, right: float) -> torch.Tensor:
    """The gate's test-time value ``clamp(σ(log α)·(r−l) + l, 0, 1)``."""
    return (torch.sigmoid(log_alpha) * (right - left) + left).clamp(0.0, 1.0)


def expected_l0(log_alpha: torch.Tensor, left: float, right: float, temperature: float = 1.0) -> torch.Tensor:
    """Per-gate probability of being non-zero, ``σ(log α − β·log(−l/r))`` (same shape as ``log_alpha``)."""
    return torch.sigmoid(log_alpha - temperature * math.log(-left / right))
