"""Scores and deterministic top-k selection shared by every method.

All selections return flat row-major positions (see :mod:`sparse_peft.sparse.delta`). Ties are broken by a seeded
random order, so the same scores and seed give the same mask on every machine and every DDP rank.
"""

from __future__ import annotations

import torch

from .delta import index_dtype


def topk_positions(scores: torch.Tensor, k: int, seed: int = 0, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Flat positions of the ``k`` largest ``scores``, ties broken by a seeded random order, returned sorted.

    ``exclude`` (flat positions) are never chosen. Deterministic for a given ``(scores, k, seed)``: the scores are
    visited in a seeded random order and a *stable* descending sort keeps that order among equal scores.
    """
    flat = scores.detach().reshape(-1).float()
    n = flat.numel()
    if not 0 < k <= n:
        raise ValueError(f"cannot select k={k} entries out of {n}; k must be in [1, {n}]")
    if exclude is not None and exclude.numel():
        flat = flat.clone()
        flat[exclude.long()] = float("-inf")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator).to(flat.device)
    ranked = torch.sort(flat[order], descending=True, stable=True).indices[:k]
    chosen = order[ranked]
    return torch.sort(chosen).values.to(index_dtype(n))


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    """``|W|``."""
    return weight.detach().float().abs()


def principal_score(
    weight: torch.Tensor, rank: int, randomized: bool = False, niter: int = 2, seed: int = 0
) -> torch.Tensor:
    """``|W'|`` with ``W' = U_r Σ_r V_rᵀ`` the best rank-``rank`` approximation of ``W`` (LIFT's principal weights).

    ``randomized=True`` uses a randomized SVD with ``q = 2·rank`` and ``niter`` power iterations (Halko et al.),
    which is much cheaper for large matrices; the default is an exact float32 SVD.
    """
    w = weight.detach().float()
    max_rank = min(w.shape)
    if not 0 < rank <= max_rank:
        raise ValueError(f"rank {rank} must be in [1, {max_rank}] for a weight of shape {tuple(w.shape)}")
    if randomized:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(w, q=min(2 * rank, max_rank), niter=niter)
        approx = (u[:, :rank] * s[:rank]) @ v[:, :rank].t()
    else:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        approx = (u[:, :rank] * s[:rank]) @ vh[:rank]
    return approx.abs()


def gradient_score(grad_stat: torch.Tensor) -> torch.Tensor:
    """Score from an accumulated gradient statistic: ``|Σg|`` or ``Σg²`` as given (absolute value taken)."""
    return grad_stat.detach().float().abs()


def random_score(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Uniform random scores from a seeded generator (a seeded random mask under :func:`topk_positions`)."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))
