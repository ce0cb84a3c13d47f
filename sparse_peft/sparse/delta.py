"""Sparse-delta storage and autograd: the engine under every entry-sparse method.

A sparse delta on a weight ``W`` of shape ``(m, n)`` is a pair

* ``values``  -- a float vector of length ``k`` (the trainable part),
* ``indices`` -- an integer vector of length ``k`` of *flat, row-major* positions in ``W``
  (``row = i // n``, ``col = i % n``), unique within a delta,

meaning ``ΔW = scatter(values at indices)``. The layer output is ``y = x (W + ΔW)ᵀ + b``.

**Training path** (:func:`fused_sparse_linear`, :class:`FusedSparseLinear`): one dense GEMM on the transient
``W_eff = W + scatter(values)``, which autograd does not keep:

* forward:  ``W_eff`` built (``k`` adds into ``W``'s own storage, undone after the GEMM by writing back the ``k``
  original entries; a transient copy only when ``W`` is in another dtype or quantized), ``y = x W_effᵀ + b``;
* backward: ``W_eff`` rebuilt the same way, ``∂L/∂x = g W_eff``;
  ``∂L/∂values[j] = Σ_t g[t, row_j] · x[t, col_j]``, a sampled dense-dense product (SDDMM) evaluated only at the
  ``k`` active positions, in float32: on the CPU by the compiled kernel of :mod:`sparse_peft.sparse.cpu_kernel`, on
  CUDA (and on a CPU without a C compiler) by ``torch.sparse.sampled_addmm``.

So the step costs the frozen layer's two GEMMs, ``O(k)`` gathers and scatters and an SDDMM of ``k · tokens``: no CSR
SpMM and no copy of ``W`` on the hot path. Saved for backward: ``x`` (which the frozen layer saves anyway) and
``values``; at most one ``out x in`` transient per layer is alive at a time (none for a base in the compute
dtype), the base weight is bitwise unchanged after every pass, and it never requires grad. Measured on one
1536x576 layer, 1024 tokens, 2 CPU cores (``benchmarks/results/2026-12-01/engine.md``), this path runs at or
below a LoRA layer of the same budget, where the CSR path below took 1.2-2.1x.

**Inference with few tokens** (decoding): ``base(x) + (ΔW_csr · xᵀ)ᵀ`` (:class:`SparseDeltaMatmul`, CSR SpMM,
``O(k · tokens)``) is cheaper than copying ``W``; :func:`prefer_fused` holds the measured rule. The CSR path also
serves layers whose base weight was made trainable by hand, since the fused path gives ``W`` no gradient.

Half precision: the fused path computes in the layer's dtype (autocast's, when on); the deltas are added into the
half-precision ``W_eff`` as a merged half-precision model would hold them, while values, their gradients (SDDMM in
float32) and optimizer state stay float32. The CSR kernels have no bfloat16 path on CPU and run in float32.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch

from . import cpu_kernel

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

    Holds the flat positions in slot order (the one-GEMM path's scatter) and the CSR layout of ``ΔW`` (entries sorted
    by row, then column, the SDDMM's), plus the permutation from slot order to that layout, so building the matrix is
    a single gather of ``values``. The layout of ``ΔWᵀ`` (sorted by column, then row), which only the CSR product of
    the no-grad path needs, is built on first use: 16 bytes an entry that a training step never pays for (on
    SmolLM2 at LoRA's budget, 78 MB per set of masks).
    """

    shape: tuple[int, int]
    flat: torch.Tensor  # int64 flat positions in slot order (the scatter of the one-GEMM path)
    row_order: torch.Tensor  # slot ids sorted by (row, col)
    crow: torch.Tensor
    col_sorted: torch.Tensor

    @classmethod
    def build(cls, indices: torch.Tensor, shape: tuple[int, int]) -> SparsePattern:
        rows, cols = to_rows_cols(indices, shape[1])
        row_order = torch.argsort(rows * shape[1] + cols)
        return cls(
            shape=shape,
            flat=indices.long(),
            row_order=row_order,
            crow=_compressed(rows, shape[0]),
            col_sorted=cols[row_order],
        )

    @functools.cached_property
    def _transposed_layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(col_order, ccol, row_sorted)``: slot ids sorted by (col, row), column pointers, and their rows."""
        rows, cols = to_rows_cols(self.flat, self.shape[1])
        col_order = torch.argsort(cols * self.shape[0] + rows)
        return col_order, _compressed(cols, self.shape[1]), rows[col_order]

    def matrix(self, values: torch.Tensor) -> torch.Tensor:
        """``ΔW`` as a CSR tensor of shape ``(out, in)``."""
        return torch.sparse_csr_tensor(
            self.crow, self.col_sorted, values[self.row_order], self.shape, check_invariants=False
        )

    def transposed(self, values: torch.Tensor) -> torch.Tensor:
        """``ΔWᵀ`` as a CSR tensor of shape ``(in, out)``."""
        col_order, ccol, row_sorted = self._transposed_layout
        return torch.sparse_csr_tensor(ccol, row_sorted, values[col_order], self.shape[::-1], check_invariants=False)

    def sampled_grad(self, grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``result[j] = (grad_outᵀ · x)[row_j, col_j]`` for every slot ``j``, without the dense product (SDDMM).

        float32 CPU operands run the compiled kernel of :mod:`sparse_peft.sparse.cpu_kernel` (2.0-2.2x faster than
        ``sampled_addmm`` on SmolLM2's shapes here); everything else (CUDA, other dtypes, no C compiler)
        ``torch.sparse.sampled_addmm``."""
        if grad_out.shape[-1] != self.shape[0] or x.shape[-1] != self.shape[1] or grad_out.shape[0] != x.shape[0]:
            raise ValueError(
                f"sampled gradient of a {self.shape} delta needs grad_out (tokens, {self.shape[0]}) and x (tokens, "
                f"{self.shape[1]}); got {tuple(grad_out.shape)} and {tuple(x.shape)}"
            )
        compiled = cpu_kernel.sddmm(grad_out, x, self.crow, self.col_sorted, self.row_order)
        if compiled is not None:
            return compiled
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


Observer = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], None]


@dataclass(frozen=True)
class DeltaTerm:
    """One adapter's delta inside a fused layer: its layout, how many leading slots train, and an optional
    ``observer(grad_out_2d, x_2d, grad_values)`` called once in backward (float32 operands)."""

    pattern: SparsePattern
    n_trainable: int
    observer: Optional[Observer] = None


@dataclass(frozen=True)
class LowRank:
    """A low-rank term ``s·B·A`` folded into the fused layer's ``W_eff`` (RoSA's LoRA): ``a`` is ``(r, in)``,
    ``b`` ``(out, r)``, both trainable or not, ``scale`` is ``s``."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer computes in: autocast's when it is on for ``x``'s device, else ``x``'s own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


@contextmanager
def effective_weight(
    weight: torch.Tensor,
    terms: Sequence[DeltaTerm],
    values: Sequence[torch.Tensor],
    dtype: torch.dtype,
    in_place: bool = True,
    low_rank: Sequence[LowRank] = (),
) -> Iterator[torch.Tensor]:
    """``W_eff = W + Σ_a s_a·B_a·A_a + Σ_a scatter(values_a)`` in ``dtype``, for the duration of a ``with`` block.

    With ``low_rank`` terms ``W_eff`` is always a new ``dtype`` transient, ``W + Σ s·B·A`` by one ``addmm`` per
    term, into which the sparse entries are added.

    When ``in_place`` and ``weight`` is already contiguous and in ``dtype`` (a float32 base trained in float32, a
    bfloat16 base in bfloat16) the ``k`` entries are added **in place** into its storage and the ``k`` original
    entries are written back on exit (bitwise: a gather before, a scatter after, in reverse term order so
    overlapping terms restore too), so no ``out x in`` tensor is allocated or copied. The write goes through
    ``weight.data``: autograd never sees a modified tensor, since only this layer's GEMM runs between the add and
    the restore. On float32 CPU weights the add and the restore run in the compiled kernels of
    :mod:`sparse_peft.sparse.cpu_kernel` (the same float adds, bitwise). Otherwise (another dtype, a dequantized
    copy, a strided view, an inference tensor,
    ``in_place=False``) ``W_eff`` is one new ``dtype`` transient.
    :func:`fused_sparse_linear` passes ``in_place=False`` without gradients: inference may run the same model from
    several threads, and a shared weight must then never be written.

    The deltas are added in ``dtype``: on a half-precision base each forward sees ``ΔW`` rounded against ``W``, as a
    merged half-precision model would; the values themselves and their gradients stay in their own dtype.
    """
    base = weight.detach()
    in_place = in_place and not low_rank and base.dtype == dtype and base.is_contiguous() and not base.is_inference()
    target = weight.data if in_place else _dense_start(base, dtype, low_rank)
    flat = target.view(-1)
    originals: list[torch.Tensor] = []
    for term in terms:
        if term.pattern.shape != tuple(target.shape):
            raise ValueError(
                f"a sparse delta of shape {term.pattern.shape} cannot apply to a weight of shape {tuple(target.shape)}"
            )
    try:
        for term, vals in zip(terms, values, strict=True):
            add = vals.detach().to(dtype)
            if not in_place:
                flat.index_add_(0, term.pattern.flat, add)
                continue
            saved = torch.empty_like(add)
            originals.append(saved)  # before W changes: the finally block restores whatever was added
            if not cpu_kernel.add_entries(flat, term.pattern.flat, add, saved):
                saved.copy_(flat[term.pattern.flat])
                flat.index_add_(0, term.pattern.flat, add)
        yield target
    finally:
        for term, saved in zip(reversed(terms[: len(originals)]), reversed(originals), strict=True):
            if not cpu_kernel.put_entries(flat, term.pattern.flat, saved):
                flat[term.pattern.flat] = saved


def _dense_start(base: torch.Tensor, dtype: torch.dtype, low_rank: Sequence[LowRank]) -> torch.Tensor:
    """A new contiguous ``dtype`` tensor ``W + Σ s·B·A`` (``W`` itself is never written)."""
    if not low_rank:
        return base.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
    first, *rest = low_rank
    target = torch.addmm(base.to(dtype), first.b.detach().to(dtype), first.a.detach().to(dtype), alpha=first.scale)
    for term in rest:
        target.addmm_(term.b.detach().to(dtype), term.a.detach().to(dtype), alpha=term.scale)
    return target


class FusedSparseLinear(torch.autograd.Function):
    """``y = x · (W + Σ_a s_a·B_a·A_a + Σ_a ΔW_a)ᵀ + b`` as one dense GEMM, with gradients for the ``values`` only at
    their slots.

    * forward:  ``W_eff = W + Σ scatter(values_a)`` (:func:`effective_weight`: in ``W``'s storage, restored after
      the GEMM), ``y = x W_effᵀ + b``;
    * backward: ``∂L/∂x = g · W_eff`` with ``W_eff`` rebuilt the same way;
      ``∂L/∂values_a[j] = Σ_t g[t, row_j] · x[t, col_j]`` by an SDDMM at the ``k`` positions only, in float32.

    Folded low-rank terms (:class:`LowRank`, RoSA's LoRA without dropout) join ``W_eff`` (then a transient:
    ``addmm(W, B, A)``), so the layer runs no separate rank-``r`` products in forward nor for ``∂x``; their
    gradients are ``∂L/∂B = s·gᵀ(x Aᵀ)`` and ``∂L/∂A = s·(g B)ᵀ x`` in the compute dtype. Measured on one layer, 800
    tokens, r = 8 beside a 0.3 % sparse delta, 2 CPU cores (forward + backward against a rank-16 LoRA layer): 0.92-1.06x
    folded against 1.01-1.36x with the LoRA as its own branch (2026-12-03, four SmolLM2 shapes).

    Saved for backward: ``x`` (which the frozen layer would save anyway), the values and the low-rank factors;
    ``W`` is re-read from ``weight_fn`` (for a quantized base: dequantized again), so nothing of size ``out x in``
    outlives a pass and at most one ``W_eff`` per layer is alive at a time. The base weight never needs
    ``requires_grad``.
    """

    @staticmethod
    def forward(ctx, x, bias, weight_fn, terms, in_place, scales, *tensors):  # type: ignore[override]
        dtype = compute_dtype(x)
        values, low_rank = _split(terms, scales, tensors)
        build = effective_weight(weight_fn(), terms, values, dtype, in_place, low_rank)
        with _no_autocast(x), torch.no_grad(), build as weight:
            out = torch.nn.functional.linear(x.to(dtype), weight, None if bias is None else bias.to(dtype))
        ctx.weight_fn, ctx.terms, ctx.scales, ctx.dtype, ctx.in_place = weight_fn, terms, scales, dtype, in_place
        ctx.save_for_backward(x, *tensors)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, *tensors = ctx.saved_tensors
        terms: Sequence[DeltaTerm] = ctx.terms
        values, low_rank = _split(terms, ctx.scales, tensors)
        needs_x, needs_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with _no_autocast(x):
            g2 = _as_2d(grad_out, ctx.dtype)
            grad_x = None
            if needs_x:
                build = effective_weight(ctx.weight_fn(), terms, values, ctx.dtype, ctx.in_place, low_rank)
                with torch.no_grad(), build as weight:
                    grad_x = (g2 @ weight).reshape(x.shape).to(x.dtype)
            grad_bias = g2.sum(0) if needs_bias else None
            needs_low_rank = ctx.needs_input_grad[6 + len(values) :]
            grad_low_rank = _low_rank_grads(g2, _as_2d(x, ctx.dtype), low_rank, needs_low_rank)
            grad_values = _sampled_term_grads(ctx, g2, x, terms, values)
        return (grad_x, grad_bias, None, None, None, None, *grad_values, *grad_low_rank)


def _split(
    terms: Sequence[DeltaTerm], scales: Sequence[float], tensors: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], list[LowRank]]:
    """The values of ``terms`` and the :class:`LowRank` terms from :class:`FusedSparseLinear`'s flat inputs."""
    values, factors = list(tensors[: len(terms)]), tensors[len(terms) :]
    return values, [LowRank(factors[2 * i], factors[2 * i + 1], s) for i, s in enumerate(scales)]


def _low_rank_grads(
    g2: torch.Tensor, x2: torch.Tensor, low_rank: Sequence[LowRank], needs: Sequence[bool]
) -> list[Optional[torch.Tensor]]:
    """``∂L/∂A = s·(g B)ᵀ x`` and ``∂L/∂B = s·gᵀ (x Aᵀ)`` of each folded term (None where not needed)."""
    grads: list[Optional[torch.Tensor]] = []
    for i, term in enumerate(low_rank):
        need_a, need_b = needs[2 * i], needs[2 * i + 1]
        a, b = term.a.to(g2.dtype), term.b.to(g2.dtype)
        grad_a = ((g2 @ b).t() @ x2).mul_(term.scale).to(term.a.dtype) if need_a else None
        grad_b = (g2.t() @ (x2 @ a.t())).mul_(term.scale).to(term.b.dtype) if need_b else None
        grads += [grad_a, grad_b]
    return grads


def _sampled_term_grads(
    ctx, g2: torch.Tensor, x: torch.Tensor, terms: Sequence[DeltaTerm], values: Sequence[torch.Tensor]
) -> list[Optional[torch.Tensor]]:
    """Each term's ``∂L/∂values`` (zero past ``n_trainable``) by SDDMM in float32, and its observer's call."""
    needs = ctx.needs_input_grad[6 : 6 + len(values)]
    if not any(needs) and all(term.observer is None for term in terms):
        return [None] * len(values)
    g32, x32 = g2.float(), _as_2d(x, torch.float32)
    grads: list[Optional[torch.Tensor]] = []
    for term, vals, need in zip(terms, values, needs, strict=True):
        grad = None
        if need:
            grad = term.pattern.sampled_grad(g32, x32)
            grad[term.n_trainable :] = 0
        if term.observer is not None:
            term.observer(g32, x32, grad)
        grads.append(None if grad is None else grad.to(vals.dtype))
    return grads


def fused_sparse_linear(
    x: torch.Tensor,
    weight_fn: Callable[[], torch.Tensor],
    bias: Optional[torch.Tensor],
    terms: Sequence[DeltaTerm],
    values: Sequence[torch.Tensor],
    low_rank: Sequence[LowRank] = (),
) -> torch.Tensor:
    """``x · (W + Σ s·B·A + Σ ΔW_a)ᵀ + bias`` on one GEMM (see :class:`FusedSparseLinear`); ``weight_fn()``
    returns the (dequantized) base weight ``(out, in)`` and must return the same tensor in forward and backward.
    With gradients enabled and no ``low_rank`` terms ``W_eff`` is built in ``W``'s own storage and restored (see
    :func:`effective_weight`)."""
    factors = [t for term in low_rank for t in (term.a, term.b)]
    scales = tuple(term.scale for term in low_rank)
    return FusedSparseLinear.apply(x, bias, weight_fn, tuple(terms), torch.is_grad_enabled(), scales, *values, *factors)


#: Inference rule (``no_grad``): the one-GEMM path pays one copy of ``W`` per forward, the CSR path a sparse product
#: whose cost grows with tokens · k. Measured on 2 CPU cores, torch 2.13, one 1536x576 layer, ``x @ Wᵀ + CSR`` vs
#: the fused path, medians of 30 (fused / CSR): 1 token 1.30 / 1.31 / 1.63 at density 0.5 / 1 / 5%; 4 tokens
#: 1.23 / 1.42 / 1.39; 64 tokens 0.93 / 1.01 / 1.00; 256 tokens 0.89 / 0.62 / 0.78; 1024 tokens 0.81 / 0.80 / 0.58.
#: The crossover sits near 64 tokens at every density, so below it (decoding, short prompts) inference takes
#: base + CSR. With gradients the fused path always wins (``benchmarks/engine.py``).
FUSED_MIN_TOKENS = 64


def prefer_fused(tokens: int, training: bool) -> bool:
    """Whether :func:`fused_sparse_linear` is the cheaper path: always with gradients, else from
    :data:`FUSED_MIN_TOKENS` tokens on."""
    return training or tokens >= FUSED_MIN_TOKENS


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
