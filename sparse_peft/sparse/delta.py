"""Sparse-delta storage and autograd: the engine under every entry-sparse method.

A sparse delta on a weight ``W`` of shape ``(m, n)`` is a pair

* ``values``  -- a float vector of length ``k`` (the trainable part),
* ``indices`` -- an integer vector of length ``k`` of *flat, row-major* positions in ``W``
  (``row = i // n``, ``col = i % n``), unique within a delta,

meaning ``ΔW = scatter(values at indices)``. The layer output is ``y = base(x) + x ΔWᵀ``.

:class:`SparseDeltaMatmul` computes ``x ΔWᵀ`` with sparse CSR kernels, so nothing of size ``m x n`` is ever built,
neither in forward nor in backward:

* forward:  ``y_Δ = (ΔW_csr · xᵀ)ᵀ``                       -- cost ``O(k · tokens)``
* backward: ``∂L/∂x = (ΔWᵀ_csr · gᵀ)ᵀ``                    -- cost ``O(k · tokens)``
  ``∂L/∂values[j] = Σ_t g[t, row_j] · x[t, col_j]``     -- a sampled dense-dense product (SDDMM),
  evaluated only at the ``k`` active positions (``torch.sparse.sampled_addmm``).

Saved for backward: the input ``x`` (which the frozen base layer saves anyway), ``values`` and ``indices``. The
gradient that reaches the optimizer is therefore of size ``k``, and so is the optimizer state.

The sparse kernels run in the dtype of ``values`` (float32 by default): CPU CSR kernels have no bfloat16 path, and a
float32 delta also keeps small updates from vanishing against a bf16 weight.
"""

from __future__ import annotations

import warnings

import torch

# CSR tensors are marked beta in torch; the kernels used here are stable and covered by our tests.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

INT32_LIMIT = 2**31 - 1


def index_dtype(numel: int) -> torch.dtype:
    """Smallest integer dtype that can address ``numel`` flat positions: int32 below 2^31, else int64."""
    return torch.int32 if numel <= INT32_LIMIT else torch.int64


def to_rows_cols(indices: torch.Tensor, n_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split flat row-major positions into ``(row, col)`` int64 tensors."""
    flat = indices.long()
    return torch.div(flat, n_cols, rounding_mode="floor"), flat % n_cols


def _csr(
    rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Build a CSR matrix from COO entries; also return the permutation that sorted the entries by (row, col)."""
    order = torch.argsort(rows * shape[1] + cols)
    counts = torch.bincount(rows, minlength=shape[0])
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.cumsum(counts, 0)
    matrix = torch.sparse_csr_tensor(crow, cols[order], values[order], shape, check_invariants=False)
    return matrix, order


def _as_2d(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).to(dtype)


class SparseDeltaMatmul(torch.autograd.Function):
    """``y = x · ΔWᵀ`` for ``ΔW = scatter(values, indices)`` of shape ``(out_features, in_features)``.

    Only the first ``n_trainable`` entries of ``values`` receive a gradient; the rest (a frozen part, such as LIFT's
    retired entries) take part in the forward only.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,
        values: torch.Tensor,
        indices: torch.Tensor,
        out_features: int,
        in_features: int,
        n_trainable: int,
    ) -> torch.Tensor:
        rows, cols = to_rows_cols(indices, in_features)
        matrix, _ = _csr(rows, cols, values, (out_features, in_features))
        x2 = _as_2d(x, values.dtype)
        y = torch.mm(matrix, x2.t()).t()
        ctx.save_for_backward(x, values, indices)
        ctx.shape = (out_features, in_features)
        ctx.n_trainable = n_trainable
        return y.reshape(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        x, values, indices = ctx.saved_tensors
        out_features, in_features = ctx.shape
        g2 = _as_2d(grad_out, values.dtype)
        grad_x = grad_values = None
        rows, cols = to_rows_cols(indices, in_features)
        if ctx.needs_input_grad[0]:
            transposed, _ = _csr(cols, rows, values, (in_features, out_features))
            grad_x = torch.mm(transposed, g2.t()).t().reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_values = torch.zeros_like(values)
            k = ctx.n_trainable
            if k > 0:
                grad_values[:k] = sampled_grad(g2, _as_2d(x, values.dtype), rows[:k], cols[:k], ctx.shape)
        return grad_x, grad_values, None, None, None, None


def sampled_grad(
    grad_out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """Gradient of a linear layer's weight at the given positions only (an SDDMM).

    ``result[j] = Σ_t grad_out[t, rows[j]] · x[t, cols[j]] = (grad_outᵀ · x)[rows[j], cols[j]]``, computed without the
    dense ``(out, in)`` product. ``grad_out``: ``(tokens, out)``, ``x``: ``(tokens, in)``, both 2-D and of one dtype.
    """
    pattern, order = _csr(rows, cols, torch.zeros(rows.numel(), dtype=x.dtype, device=x.device), shape)
    sampled = torch.sparse.sampled_addmm(pattern, grad_out.t().contiguous(), x.contiguous(), beta=0.0)
    result = torch.empty(rows.numel(), dtype=x.dtype, device=x.device)
    result[order] = sampled.values()
    return result


def sparse_delta_matmul(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    shape: tuple[int, int],
    n_trainable: int | None = None,
) -> torch.Tensor:
    """Functional form of :class:`SparseDeltaMatmul`; returns ``x · ΔWᵀ`` in the dtype of ``values``."""
    k = values.numel() if n_trainable is None else n_trainable
    return SparseDeltaMatmul.apply(x, values, indices, shape[0], shape[1], k)


def dense_delta(values: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Materialise ``ΔW`` as a dense ``(out, in)`` tensor (for merging and inspection only, never in training)."""
    flat = torch.zeros(shape[0] * shape[1], dtype=values.dtype, device=values.device)
    flat.index_add_(0, indices.long(), values)
    return flat.view(shape)


def add_into(weight: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
    """Return ``weight + sign·ΔW`` as a new tensor; only the ``k`` touched entries change."""
    out = weight.clone()
    out.view(-1).index_add_(0, indices.long(), (sign * values).to(weight.dtype))
    return out


def gather(weight: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Read the entries of ``weight`` at flat positions ``indices``."""
    return weight.reshape(-1)[indices.long()]
