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
from collections.abc import Callable
from dataclasses import dataclass

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


@dataclass(frozen=True)
class SparsePattern:
    """The index structure of a sparse delta, computed once per mask and reused by every forward and backward.

    Holds the CSR layout of ``ΔW`` (entries sorted by row, then column) and of ``ΔWᵀ`` (sorted by column, then row),
    plus the permutations from slot order to each layout, so building either matrix is a single gather of ``values``.
    """

    shape: tuple[int, int]
    row_order: torch.Tensor  # slot ids sorted by (row, col)
    crow: torch.Tensor
    col_sorted: torch.Tensor
    col_order: torch.Tensor  # slot ids sorted by (col, row)
    ccol: torch.Tensor
    row_sorted: torch.Tensor

    @classmethod
    def build(cls, indices: torch.Tensor, shape: tuple[int, int]) -> SparsePattern:
        rows, cols = to_rows_cols(indices, shape[1])
        row_order = torch.argsort(rows * shape[1] + cols)
        col_order = torch.argsort(cols * shape[0] + rows)
        return cls(
            shape=shape,
            row_order=row_order,
            crow=_compressed(rows, shape[0]),
            col_sorted=cols[row_order],
            col_order=col_order,
            ccol=_compressed(cols, shape[1]),
            row_sorted=rows[col_order],
        )

    def matrix(self, values: torch.Tensor) -> torch.Tensor:
        """``ΔW`` as a CSR tensor of shape ``(out, in)``."""
        return torch.sparse_csr_tensor(
            self.crow, self.col_sorted, values[self.row_order], self.shape, check_invariants=False
        )

    def transposed(self, values: torch.Tensor) -> torch.Tensor:
        """``ΔWᵀ`` as a CSR tensor of shape ``(in, out)``."""
        return torch.sparse_csr_tensor(
            self.ccol, self.row_sorted, values[self.col_order], self.shape[::-1], check_invariants=False
        )

    def sampled_grad(self, grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``result[j] = (grad_outᵀ · x)[row_j, col_j]`` for every slot ``j``, without the dense product (SDDMM)."""
        pattern = self.matrix(torch.zeros(self.row_order.numel(), dtype=x.dtype, device=x.device))
        sampled = torch.sparse.sampled_addmm(pattern, grad_out.t().contiguous(), x.contiguous(), beta=0.0)
        result = torch.empty(self.row_order.numel(), dtype=x.dtype, device=x.device)
        result[self.row_order] = sampled.values()
        return result


def _compressed(keys: torch.Tensor, size: int) -> torch.Tensor:
    pointers = torch.zeros(size + 1, dtype=torch.int64, device=keys.device)
    pointers[1:] = torch.cumsum(torch.bincount(keys, minlength=size), 0)
    return pointers


def _no_autocast(x: torch.Tensor) -> torch.autocast:
    return torch.autocast(device_type=x.device.type, enabled=False)


def _kernel_values(values: torch.Tensor) -> torch.Tensor:
    """Values in a dtype the sparse kernels support: half precisions run in float32 (a k-sized copy)."""
    return values.float() if values.dtype in (torch.bfloat16, torch.float16) else values


def _as_2d(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).to(dtype)


class SparseDeltaMatmul(torch.autograd.Function):
    """``y = x · ΔWᵀ`` for ``ΔW = scatter(values)`` laid out by a :class:`SparsePattern`.

    Only the first ``n_trainable`` entries of ``values`` receive a gradient; the rest (a frozen part, such as LIFT's
    retired entries) take part in the forward only.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,
        values: torch.Tensor,
        pattern: SparsePattern,
        n_trainable: int,
        observer: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], None] | None = None,
    ) -> torch.Tensor:
        work = _kernel_values(values)
        with _no_autocast(x):  # autocast would turn the CSR matmul into bf16, which CPU kernels lack
            y = torch.mm(pattern.matrix(work), _as_2d(x, work.dtype).t()).t()
        ctx.save_for_backward(x, values)
        ctx.pattern = pattern
        ctx.n_trainable = n_trainable
        ctx.observer = observer
        return y.reshape(*x.shape[:-1], pattern.shape[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        x, values = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        with _no_autocast(x):
            return SparseDeltaMatmul._backward(ctx, x, values, pattern, grad_out)

    @staticmethod
    def _backward(ctx, x: torch.Tensor, values: torch.Tensor, pattern: SparsePattern, grad_out: torch.Tensor):
        work = _kernel_values(values)
        g2 = _as_2d(grad_out, work.dtype)
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(pattern.transposed(work), g2.t()).t().reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_values = pattern.sampled_grad(g2, _as_2d(x, work.dtype)).to(values.dtype)
            grad_values[ctx.n_trainable :] = 0
        if ctx.observer is not None:  # e.g. SpIEL's candidate statistics, only while a selection window is open
            ctx.observer(g2, _as_2d(x, work.dtype), grad_values)
        return grad_x, grad_values, None, None, None


def sampled_grad(
    grad_out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """Gradient of a linear layer's weight at the given positions only (an SDDMM).

    ``result[j] = Σ_t grad_out[t, rows[j]] · x[t, cols[j]] = (grad_outᵀ · x)[rows[j], cols[j]]``, computed without the
    dense ``(out, in)`` product. ``grad_out``: ``(tokens, out)``, ``x``: ``(tokens, in)``, both 2-D and of one dtype.
    """
    return SparsePattern.build(rows.long() * shape[1] + cols.long(), shape).sampled_grad(grad_out, x)


def sparse_delta_matmul(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor | SparsePattern,
    shape: tuple[int, int],
    n_trainable: int | None = None,
    observer: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], None] | None = None,
) -> torch.Tensor:
    """``x · ΔWᵀ`` (float32 for half-precision ``values``); pass a cached :class:`SparsePattern` instead of
    ``indices`` to skip rebuilding the index structure. ``observer(grad_out_2d, x_2d, grad_values)``, if given, is
    called once in backward."""
    pattern = indices if isinstance(indices, SparsePattern) else SparsePattern.build(indices, shape)
    k = values.numel() if n_trainable is None else n_trainable
    return SparseDeltaMatmul.apply(x, values, pattern, k, observer)


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
