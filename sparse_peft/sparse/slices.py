"""Structured-slice storage and autograd: dense blocks, rows and columns of a weight (SMT, S²FT).

A structured delta on a weight ``W`` of shape ``(m, n)`` is a set of dense sub-matrices at known coordinates:

* **blocks** (SMT): ``B[i]`` of shape ``(b, b)`` at block-grid cell ``(r_i, c_i)``, i.e. ``ΔW[r_i·b : r_i·b+h_i,
  c_i·b : c_i·b+w_i] = B[i][:h_i, :w_i]``. Edge cells of a grid that ``b`` does not divide are smaller
  (``h_i, w_i ≤ b``); their storage keeps the fixed ``(b, b)`` shape and the part outside ``W`` never receives a
  gradient (it multiplies zero padding), so it stays zero.
* **rows** (S²FT: V heads, up channels): ``ΔW[R, :] = D`` with ``D`` of shape ``(|R|, n)``;
* **columns** (S²FT: O heads, down channels): ``ΔW[:, C] = D`` with ``D`` of shape ``(m, |C|)``.

The autograd functions compute only the delta's contribution ``x · ΔWᵀ`` and never form a dense ``(m, n)`` tensor:

* :class:`BlockMatmul` saves the input column slices ``x[..., cols(c)]`` of the distinct block columns ``c`` that
  the blocks use (at most the input itself) and returns ``∂L/∂B[i] = g[..., rows(r_i)]ᵀ · x[..., cols(c_i)]``;
* :class:`SliceMatmul` computes ``x[..., C] · Dᵀ`` (``C`` = all columns for row slices), saves only ``x[..., C]``,
  and returns ``∂L/∂D = gᵀ · x[..., C]``.

:class:`GradientTap` is a pass-through on a layer output that hands ``(∂L/∂y, x)`` to a callback in backward, for
methods that score weights by gradient statistics (SMT's warm-up, S²FT's gradient-based selection) while the base
weight stays frozen. No PEFT imports here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _as_2d(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).to(dtype)


def _no_autocast(x: torch.Tensor) -> torch.autocast:
    return torch.autocast(device_type=x.device.type, enabled=False)


def grid_shape(shape: tuple[int, int], block: int) -> tuple[int, int]:
    """Number of block rows and block columns covering ``shape`` (edge blocks included)."""
    return -(-shape[0] // block), -(-shape[1] // block)


def block_extents(coords: torch.Tensor, shape: tuple[int, int], block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Heights and widths of the blocks at grid ``coords`` (``(n, 2)``), smaller than ``block`` at the edges."""
    rows = (shape[0] - coords[:, 0].long() * block).clamp(max=block)
    cols = (shape[1] - coords[:, 1].long() * block).clamp(max=block)
    return rows, cols


def block_scores(grad: torch.Tensor, block: int, norm: str = "mean_abs") -> torch.Tensor:
    """Score of every block-grid cell of ``grad`` (an accumulated ``(m, n)`` gradient), shape ``grid_shape``.

    ``"mean_abs"``: ``mean |G_blk|`` (SMT's default); ``"abs_mean"``: ``|mean G_blk|``; ``"l1"``: ``Σ |G_blk|``;
    ``"l2"``: ``‖G_blk‖₂``. Means divide by the real (edge-aware) number of entries of each cell.
    """
    m, n = grad.shape
    gr, gc = grid_shape((m, n), block)
    g = grad.detach().float()
    values = {"mean_abs": g.abs(), "l1": g.abs(), "abs_mean": g, "l2": g.square()}[norm]
    padded = F.pad(values, (0, gc * block - n, 0, gr * block - m))
    sums = padded.view(gr, block, gc, block).sum(dim=(1, 3))
    if norm == "l2":
        return sums.sqrt()
    if norm == "l1":
        return sums
    heights = torch.full((gr,), block, dtype=torch.float32, device=g.device)
    widths = torch.full((gc,), block, dtype=torch.float32, device=g.device)
    heights[-1], widths[-1] = m - (gr - 1) * block, n - (gc - 1) * block
    means = sums / torch.outer(heights, widths)
    return means.abs() if norm == "abs_mean" else means


@dataclass(frozen=True)
class BlockLayout:
    """Where ``n`` blocks of size ``b`` sit in a weight of shape ``(m, n)``: grid rows and columns (int64), the
    distinct block columns and each block's position among them (so shared input slices are saved once)."""

    shape: tuple[int, int]
    block: int
    rows: torch.Tensor
    cols: torch.Tensor
    unique_cols: torch.Tensor
    col_slot: torch.Tensor

    @classmethod
    def build(cls, coords: torch.Tensor, shape: tuple[int, int], block: int) -> BlockLayout:
        rows, cols = coords[:, 0].long(), coords[:, 1].long()
        unique_cols, col_slot = torch.unique(cols, return_inverse=True)
        return cls(shape, block, rows, cols, unique_cols, col_slot)

    @property
    def grid(self) -> tuple[int, int]:
        return grid_shape(self.shape, self.block)


class BlockMatmul(torch.autograd.Function):
    """``y = x · ΔWᵀ`` for ``ΔW`` made of dense blocks (see module docstring); cost ``O(n·b²·tokens)``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, blocks: torch.Tensor, layout: BlockLayout) -> torch.Tensor:  # type: ignore[override]
        (m, n), b = layout.shape, layout.block
        gr, gc = layout.grid
        with _no_autocast(x):
            x2 = _as_2d(x, blocks.dtype)
            tokens = x2.shape[0]
            x_cols = F.pad(x2, (0, gc * b - n)).view(tokens, gc, b)[:, layout.unique_cols]  # saved: (T, u, b)
            y_blocks = torch.einsum("tnj,nij->tni", x_cols[:, layout.col_slot], blocks)
            y = torch.zeros(tokens, gr, b, dtype=blocks.dtype, device=x.device).index_add_(1, layout.rows, y_blocks)
        ctx.save_for_backward(x_cols, blocks)
        ctx.layout = layout
        ctx.x_meta = (x.shape, x.dtype)
        return y.view(tokens, gr * b)[:, :m].reshape(*x.shape[:-1], m)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        x_cols, blocks = ctx.saved_tensors
        layout: BlockLayout = ctx.layout
        (m, n), b = layout.shape, layout.block
        gr, gc = layout.grid
        x_shape, x_dtype = ctx.x_meta
        with _no_autocast(x_cols):
            g2 = _as_2d(grad_out, blocks.dtype)
            tokens = g2.shape[0]
            g_blocks = F.pad(g2, (0, gr * b - m)).view(tokens, gr, b)[:, layout.rows]  # (T, n, b)
            grad_x = grad_blocks = None
            if ctx.needs_input_grad[1]:
                grad_blocks = torch.einsum("tni,tnj->nij", g_blocks, x_cols[:, layout.col_slot])
            if ctx.needs_input_grad[0]:
                gx = torch.einsum("tni,nij->tnj", g_blocks, blocks)
                gx = torch.zeros(tokens, gc, b, dtype=gx.dtype, device=gx.device).index_add_(1, layout.cols, gx)
                grad_x = gx.view(tokens, gc * b)[:, :n].reshape(x_shape).to(x_dtype)
        return grad_x, grad_blocks, None


def block_matmul(x: torch.Tensor, blocks: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """``x · ΔWᵀ`` in the dtype of ``blocks``; ``blocks`` has shape ``(n, b, b)`` matching ``layout``."""
    return BlockMatmul.apply(x, blocks, layout)


def blocks_to_dense(blocks: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Materialise ``ΔW`` (for merging and inspection only)."""
    (m, n), b = layout.shape, layout.block
    gr, gc = layout.grid
    dense = torch.zeros(gr, b, gc, b, dtype=blocks.dtype, device=blocks.device)
    dense[layout.rows, :, layout.cols, :] += blocks
    return dense.view(gr * b, gc * b)[:m, :n]


class SliceMatmul(torch.autograd.Function):
    """``y = x[..., C] · Dᵀ`` (``C = None``: all columns), computed in the dtype of ``D``.

    Saved for backward: ``x[..., C]`` and ``D`` only. ``∂L/∂D = gᵀ · x[..., C]``, ``∂L/∂x[..., C] = g · D``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, delta: torch.Tensor, cols: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        with _no_autocast(x):
            x2 = x.reshape(-1, x.shape[-1])
            x_sel = (x2 if cols is None else x2.index_select(1, cols)).to(delta.dtype)
            y = x_sel @ delta.t()
        ctx.save_for_backward(x_sel, delta)
        ctx.cols = cols
        ctx.x_meta = (x.shape, x.dtype)
        return y.reshape(*x.shape[:-1], delta.shape[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        x_sel, delta = ctx.saved_tensors
        x_shape, x_dtype = ctx.x_meta
        with _no_autocast(x_sel):
            g2 = _as_2d(grad_out, delta.dtype)
            grad_x = grad_delta = None
            if ctx.needs_input_grad[1]:
                grad_delta = g2.t() @ x_sel
            if ctx.needs_input_grad[0]:
                gx = g2 @ delta
                if ctx.cols is not None:
                    full = torch.zeros(gx.shape[0], x_shape[-1], dtype=gx.dtype, device=gx.device)
                    gx = full.index_copy_(1, ctx.cols, gx)
                grad_x = gx.reshape(x_shape).to(x_dtype)
        return grad_x, grad_delta, None


def row_slice_matmul(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Output rows ``R`` of ``x · ΔWᵀ`` for ``ΔW[R, :] = delta``: shape ``(..., |R|)``; scatter it at ``R``."""
    return SliceMatmul.apply(x, delta, None)


def col_slice_matmul(x: torch.Tensor, delta: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``x · ΔWᵀ`` for ``ΔW[:, C] = delta`` (``cols`` = ``C``, int64): shape ``(..., m)``."""
    return SliceMatmul.apply(x, delta, cols)


class GradientTap(torch.autograd.Function):
    """Identity on ``y``; in backward calls ``observer(∂L/∂y as (T, m), x as (T, n))`` and passes the gradient on.

    ``anchor`` (a trainable tensor of the layer) makes the output require grad even when neither ``y`` nor ``x``
    does (a frozen first layer); it receives a zero gradient, so every parameter has a gradient under DDP.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, x: torch.Tensor, anchor: torch.Tensor, observer: Callable) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.observer = observer
        ctx.anchor_meta = (anchor.shape, anchor.dtype, anchor.device)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        with torch.no_grad():
            ctx.observer(grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1]))
        shape, dtype, device = ctx.anchor_meta
        anchor_grad = torch.zeros(shape, dtype=dtype, device=device) if ctx.needs_input_grad[2] else None
        return grad_out, None, anchor_grad, None


def tap_gradient(y: torch.Tensor, x: torch.Tensor, anchor: torch.Tensor, observer: Callable) -> torch.Tensor:
    """Attach :class:`GradientTap` to a layer output ``y`` computed from ``x``."""
    return GradientTap.apply(y, x, anchor, observer)


def _padded_grid(weight: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    (m, n), b = layout.shape, layout.block
    gr, gc = layout.grid
    return F.pad(weight, (0, gc * b - n, 0, gr * b - m)).view(gr, b, gc, b)


def gather_blocks(weight: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """The ``(n, b, b)`` blocks of ``weight`` at ``layout`` (zero outside the weight at edge blocks)."""
    return _padded_grid(weight, layout)[layout.rows, :, layout.cols, :].clone()


def scatter_blocks(weight: torch.Tensor, blocks: torch.Tensor, layout: BlockLayout, add: bool) -> torch.Tensor:
    """A new weight with ``blocks`` added at (``add=True``) or written into (``add=False``) their positions."""
    (m, n) = layout.shape
    grid = _padded_grid(weight, layout)
    if grid.data_ptr() == weight.data_ptr():  # no padding was needed: never write into the caller's tensor
        grid = grid.clone()
    values = blocks.to(weight.dtype)
    if add:
        values = grid[layout.rows, :, layout.cols, :] + values
    grid[layout.rows, :, layout.cols, :] = values
    return grid.reshape(grid.shape[0] * grid.shape[1], -1)[:m, :n].contiguous()
