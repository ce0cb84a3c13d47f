"""Scores and deterministic top-k selection shared by every method.

All selections return flat row-major positions (see :mod:`sparse_peft.sparse.delta`). Ties are broken by a seeded
random order, so the same scores and seed give the same mask on every machine and every DDP rank.
"""

from __future__ import annotations

import torch

from .delta import index_dtype


def topk_positions(scores: torch.Tensor, k: int, seed: int = 0, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Flat positions of the ``k`` largest ``scores``, ties broken by a seeded random order, returned sorted.

    ``exclude`` (flat positions) are never chosen. Deterministic for a given ``(scores, k, seed)``: the result is the
    ``k`` positions with the largest ``(score, -rank)``, ``rank`` being a position's place in ``randperm(n)`` from a
    CPU generator seeded with ``seed`` (so every machine and DDP rank agrees). NaN counts as ``+inf``.

    Cost: one ``kthvalue`` selection (``O(n)``) for the threshold ``t`` (the ``k``-th largest score), every score
    ``> t`` taken, and the seeded permutation drawn only when more than the missing number of scores tie at ``t``.
    A full sort of the ``n`` scores, which this replaces, was 71% of a LIFT mask refresh on SmolLM2.
    """
    flat = torch.nan_to_num(scores.detach().reshape(-1).float(), nan=float("inf"))
    n = flat.numel()
    if not 0 < k <= n:
        raise ValueError(f"cannot select k={k} entries out of {n}; k must be in [1, {n}]")
    if exclude is not None and exclude.numel():
        flat = flat.clone()
        flat[exclude.long()] = float("-inf")
    threshold = torch.kthvalue(flat, n - k + 1).values
    above = (flat > threshold).nonzero().flatten()
    ties = (flat == threshold).nonzero().flatten()
    missing = k - above.numel()
    if missing < ties.numel():
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(flat.device)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(n, device=flat.device)
        ties = ties[torch.topk(rank[ties], missing, largest=False).indices]
    chosen = torch.cat([above, ties])
    return torch.sort(chosen).values.to(index_dtype(n))


def topk_per_row(scores: torch.Tensor, per_row: int, seed: int = 0) -> torch.Tensor:
    """Flat positions of the ``per_row`` largest ``scores`` in every row of a 2-D score matrix, returned sorted.

    Ties within a row go by a seeded random order of the columns (one ``randperm`` of the row length from a CPU
    generator seeded with ``seed``), so every machine and DDP rank agrees. NaN counts as ``+inf``.
    """
    if scores.dim() != 2:
        raise ValueError(f"topk_per_row needs a 2-D score matrix; got shape {tuple(scores.shape)}")
    rows, cols = scores.shape
    if not 0 < per_row <= cols:
        raise ValueError(f"cannot select {per_row} entries per row out of {cols}; per_row must be in [1, {cols}]")
    order = torch.randperm(cols, generator=torch.Generator().manual_seed(seed)).to(scores.device)
    flat = torch.nan_to_num(scores.detach().float()[:, order], nan=float("inf"))
    columns = order[torch.sort(flat, dim=1, descending=True, stable=True).indices[:, :per_row]]
    positions = torch.arange(rows, device=scores.device).unsqueeze(1) * cols + columns
    return torch.sort(positions.reshape(-1)).values.to(index_dtype(rows * cols))


def topk_row_balanced(scores: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Exactly ``k`` flat positions of a 2-D score matrix, as even over its rows as ``k`` allows: every row takes its
    best ``⌊k/rows⌋`` entries, and the ``k mod rows`` rows whose next-best entry scores highest take one more, so row
    counts differ by at most one. Sorted; ties as in :func:`topk_per_row`.

    Unlike the plain top-``k``, no row can take a large share of the budget: gradient scores crowd into a few rows
    (``benchmarks/mask_structure.py``), and those rows' outputs then move coherently under Adam's per-entry steps.
    """
    rows, cols = scores.shape
    if not 0 < k <= rows * cols:
        raise ValueError(f"cannot select k={k} entries out of {rows * cols}; k must be in [1, {rows * cols}]")
    per_row, extra = divmod(k, rows)
    if not extra:
        return topk_per_row(scores, per_row, seed)
    wide = topk_per_row(scores, per_row + 1, seed).long().reshape(rows, per_row + 1)  # sorted: row by row
    flat = torch.nan_to_num(scores.detach().float().reshape(-1), nan=float("inf"))
    weakest = flat[wide].argmin(dim=1)  # each row's (per_row+1)-th best entry (the first of equal ones)
    runner_up = wide.gather(1, weakest.unsqueeze(1)).squeeze(1)
    lucky = torch.zeros(rows, dtype=torch.bool, device=scores.device)
    lucky[topk_positions(flat[runner_up], extra, seed=seed).long()] = True
    keep = torch.ones_like(wide, dtype=torch.bool)
    keep[~lucky, weakest[~lucky]] = False
    return torch.sort(wide[keep]).values.to(index_dtype(rows * cols))


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    """``|W|``."""
    return weight.detach().float().abs()


def principal_score(
    weight: torch.Tensor, rank: int, randomized: bool = False, niter: int = 2, seed: int = 0
) -> torch.Tensor:
    """``|W'|`` with ``W' = U_r Σ_r V_rᵀ`` the best rank-``rank`` approximation of ``W`` (LIFT's principal weights).

    ``randomized=True`` uses a randomized SVD with ``q = 2·rank`` and ``niter`` power iterations (Halko et al.),
    which is cheaper for large matrices; the default is an exact float32 SVD. See :func:`principal_score_and_basis`.
    """
    return principal_score_and_basis(weight, rank, randomized=randomized, niter=niter, seed=seed)[0]


def basis_width(rank: int, shape: tuple[int, ...]) -> int:
    """Width ``q = min(2·rank, min(m, n))`` of the right basis kept for warm-started refreshes."""
    return min(2 * rank, min(shape))


def principal_score_and_basis(
    weight: torch.Tensor, rank: int, randomized: bool = False, niter: int = 2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(|W'|, V_q)``: :func:`principal_score` and the ``n x q`` orthonormal basis of ``W``'s top right singular
    vectors (``q`` from :func:`basis_width`), the warm start of :func:`warm_principal_score`."""
    w = weight.detach().float()
    max_rank = min(w.shape)
    if not 0 < rank <= max_rank:
        raise ValueError(f"rank {rank} must be in [1, {max_rank}] for a weight of shape {tuple(w.shape)}")
    q = basis_width(rank, tuple(w.shape))
    if randomized:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(w, q=q, niter=niter)
        approx, basis = (u[:, :rank] * s[:rank]) @ v[:, :rank].t(), v[:, :q]
    else:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        approx, basis = (u[:, :rank] * s[:rank]) @ vh[:rank], vh[:q].t()
    return approx.abs(), basis.contiguous()


def warm_principal_score(weight: torch.Tensor, rank: int, basis: torch.Tensor, niter: int = 2) -> torch.Tensor:
    """``|W'|`` by subspace iteration from a warm right basis ``V`` (``n x q``, ``q ≥ rank``).

    ``niter`` times: ``Q = orth(W V)``, ``V = orth(Wᵀ Q)``; then ``Q = orth(W V)``, ``B = Qᵀ W = U_B Σ V_Bᵀ`` (a
    ``q x n`` SVD) and ``W' = (Q U_B)_r Σ_r (V_Bᵀ)_r``. Cost ``(2·niter + 2)·m·n·q`` plus the small SVD, against
    ``O(m·n·min(m, n))`` for the exact SVD. When ``W`` moved little since ``V`` was computed (LIFT's refresh of
    ``W + ΔW`` from the base's basis) this agrees with the exact :func:`principal_score`: on SmolLM2-135M's
    q/k/v/o/gate/up/down of layers 0, 15, 29 with ``rank=32``, ``q=64`` and a delta of standard deviation 0.02 on the
    ``(m+n)·16`` LIFT entries, the top-k masks matched the exact ones on 99.7% of entries on average (at least 99.1%)
    with ``niter=2``, in 0.010 s a matrix against 0.056 s for the exact SVD. A *cold* randomized SVD
    (``torch.svd_lowrank``, ``q=64``, ``niter=2``) matched on only 71% (at least 32%): the spectrum of these weights
    is flat around rank 32, so the top-32 subspace needs a good start.
    """
    w = weight.detach().float()
    if basis.dim() != 2 or basis.shape[0] != w.shape[1] or not rank <= basis.shape[1]:
        raise ValueError(
            f"warm basis of shape {tuple(basis.shape)} does not fit a weight of shape {tuple(w.shape)} at rank {rank}"
        )
    v = basis.to(device=w.device, dtype=torch.float32)
    for _ in range(niter):
        q = torch.linalg.qr(w @ v).Q
        v = torch.linalg.qr(w.t() @ q).Q
    q = torch.linalg.qr(w @ v).Q
    u_b, s, vh = torch.linalg.svd(q.t() @ w, full_matrices=False)
    return (((q @ u_b[:, :rank]) * s[:rank]) @ vh[:rank]).abs()


def gradient_score(grad_stat: torch.Tensor) -> torch.Tensor:
    """Score from an accumulated gradient statistic: ``|Σg|`` or ``Σg²`` as given (absolute value taken)."""
    return grad_stat.detach().float().abs()


def input_normalized_score(score: torch.Tensor, x_sq: torch.Tensor, squared: bool = False) -> torch.Tensor:
    """``score_ij / ‖x_j‖`` (or ``score_ij / ‖x_j‖²`` when ``score`` is a squared statistic such as the Fisher
    ``Σ_i G_i²``: the same ranking as ``√score_ij / ‖x_j‖``), with ``x_sq = Σ_t x_tj²`` over the same tokens.

    ``score`` is dense ``(out, in)`` (``x_sq`` has ``in`` entries) or flat at some positions (``x_sq`` then already
    gathered at their columns). Dividing by ``‖x_j‖`` divides an entry's first-order gain by the square root of its
    Gauss-Newton curvature (``Σ_t x_tj²`` up to the output's factor): Adam moves every entry by about the learning
    rate, so an entry on a large-activation input feature changes the outputs, and overshoots, by as much more as its
    feature is larger. Measured on the built-in task: the top-k of ``|G|`` puts 35% of its entries in the 5% fullest
    columns, on features 2.75x the median norm (``benchmarks/mask_structure.py``).
    """
    norm = x_sq.clamp_min(torch.finfo(torch.float32).tiny)
    return score / (norm if squared else norm.sqrt())


def random_score(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Uniform random scores from a seeded generator (a seeded random mask under :func:`topk_positions`)."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))
