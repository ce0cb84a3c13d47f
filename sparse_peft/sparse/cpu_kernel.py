"""Compiled CPU kernels: the SDDMM behind every entry-sparse delta's ``∂values``, and SNELL's kernelised delta.

Both live in one small C file (``kernels.c``) compiled on first use.

``∂L/∂values[j] = Σ_t g[t, row_j] · x[t, col_j]`` (``g``: the layer's output gradient ``(tokens, out)``, ``x``: its
input ``(tokens, in)``) is the one product the one-GEMM training path adds to a frozen layer's step
(:class:`sparse_peft.sparse.delta.FusedSparseLinear`). ``torch.sparse.sampled_addmm`` computes it on the CPU as one
dot product per entry over all tokens, reading ``x``'s columns from a transposed copy that does not fit a core's L2
cache (and transposing ``g`` and ``x`` first with generic copies), about 4-7 GMAC/s on 2 cores here. ``kernels.c`` (next
to this file) walks the tokens in chunks whose transposed slices of ``x`` and ``g`` (8 x 8 register transposes) stay in
L2, eight entries of a row per inner loop; the tokens are split in equal shares between ``torch.get_num_threads()``
OpenMP threads of torch's own pool, each summing into its own vector. Measured numbers and the chunk rule:
:data:`CHUNK_TOKENS`.

The kernel is compiled once per machine with the C compiler found as ``$CC``, ``cc``, ``gcc`` or ``clang``
(``-O3 -march=native -fopenmp``, falling back to fewer flags: :data:`FLAG_SETS`) into ``<cache>/kernels/``
(``$SPARSE_PEFT_CACHE`` or ``~/.cache/sparse_peft``; the file name holds a hash of the source, the compiler, the flags
and the CPU, so a shared home directory never hands one CPU's build to another), through a temporary file and one
rename, so concurrent processes (DDP ranks) never load a half-written library. Without a compiler, with
``SPARSE_PEFT_CPU_KERNEL=0``, or when the build fails, :func:`sddmm` returns ``None`` and callers use
``torch.sparse.sampled_addmm`` (one warning says why).
CUDA tensors never come here: cuSPARSE's SDDMM serves them.

SNELL (:func:`snell_delta`, :func:`kth_abs`, :func:`snell_apply`, :func:`snell_backward`; used by
:mod:`sparse_peft.sparse.kernel_delta` for float32 CPU layers): the kernel ``ΔW = c·(‖B_0[o] − A_0[i]‖ −
‖B_1[o] − A_1[i]‖)`` row by row without a distance matrix, the competition threshold ``τ`` by an exact radix select
(three counting passes instead of ``kthvalue``'s copy and partition), and one sweep per pass that adds the survivors
into ``W`` and, in backward, accumulates both factor pairs' gradients from ``gᵀx``. Torch's ``cdist`` /
``kthvalue`` / elementwise path remains for other dtypes and devices and when the kernels are off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Optional

import torch

from .io import atomic_write, cache_root

SOURCE = Path(__file__).with_name("kernels.c")
SWITCH_ENV_VAR = "SPARSE_PEFT_CPU_KERNEL"
#: Tried in order until one builds: OpenMP threads (sharing torch's libgomp) and this CPU's vector instructions first,
#: one thread and plain ``-O3`` last.
FLAG_SETS: tuple[tuple[str, ...], ...] = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-fopenmp"),
    ("-O3", "-march=native", "-fopenmp-simd"),
    ("-O3",),
)

#: Tokens per chunk (at most; each thread's equal share of the tokens is cut into equal chunks). Measured on 2 CPU
#: cores (AMD EPYC, 1 MiB L2 per core), torch 2.13, 800 tokens, masks of LoRA's budget ``(m + n)·16`` at random
#: positions, medians of 15 round-robin rounds (``benchmarks/sddmm.py``, ``benchmarks/results/2026-12-03/sddmm.md``),
#: speed-up over ``sampled_addmm`` at chunk 128 / 256 / 512: 576x576 1.75 / 2.18 / 2.57x; 192x576 1.53 / 2.00 /
#: 2.21x; 1536x576 1.80 / 2.15 / 2.22x; 576x1536 1.93 / 2.05 / 2.02x. 512 (no cut of a thread's 400 tokens) and 256
#: are within a few percent at the larger matrices; 256 keeps a chunk of ``x`` and ``g`` near the L2 size for longer
#: batches. (Before the equal shares, a 512 / 288 split: 2.03-3.23x at 256 against a slower ``sampled_addmm`` run.)
CHUNK_TOKENS = 256

#: Below this many multiply-adds (entries x tokens) one thread does the whole product: handing work to a second
#: thread costs more than it saves.
MIN_MACS_PER_THREAD = 1 << 20


def enabled() -> bool:
    """Whether the compiled kernel may be used (``SPARSE_PEFT_CPU_KERNEL`` is not ``0``)."""
    return os.environ.get(SWITCH_ENV_VAR, "1").strip() not in ("0", "false", "off", "no")


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_fingerprint() -> str:
    """The CPU's model and feature flags (Linux), else what ``platform`` knows: part of the build's cache key."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        wanted = [line for line in lines if line.split(":")[0].strip() in ("model name", "flags", "Features")]
        return "\n".join(sorted(set(wanted)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _target(compiler: str, flags: tuple[str, ...]) -> Path:
    """Where the build for these flags lives: a hash of source, compiler, flags and CPU in the name."""
    parts = [SOURCE.read_bytes(), compiler.encode(), " ".join(flags).encode(), _cpu_fingerprint().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:20]
    return cache_root() / "kernels" / f"kernels-{key}.so"


def _load(compiler: str) -> ctypes.CDLL:
    """The first flag set whose build compiles (or is cached) and loads; ``RuntimeError`` naming every failure."""
    errors = []
    for flags in FLAG_SETS:
        target = _target(compiler, flags)
        try:
            if not target.exists():
                command = [compiler, *flags, "-shared", "-fPIC", str(SOURCE), "-o"]
                atomic_write(str(target), lambda tmp, command=command: _compile([*command, tmp]))
            return ctypes.CDLL(str(target))
        except (OSError, subprocess.SubprocessError) as error:
            detail = getattr(error, "stderr", b"") or b""
            errors.append(f"{' '.join(flags)}: {error} {detail.decode(errors='replace').strip()[:300]}".strip())
    raise RuntimeError("; ".join(errors))


def _compile(command: list[str]) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=120)


@functools.cache
def _library() -> Optional[ctypes.CDLL]:
    """The compiled kernels, or ``None`` (with one warning naming the reason) when they cannot be built or loaded."""
    compiler = _compiler()
    if compiler is None:
        warnings.warn(
            "sparse_peft: no C compiler found ($CC, cc, gcc, clang); the CPU kernels of sparse deltas (SDDMM, "
            "SNELL) fall back to torch's operations (slower). Install gcc to build them.",
            stacklevel=3,
        )
        return None
    try:
        library = _load(compiler)
    except RuntimeError as error:
        warnings.warn(
            f"sparse_peft: the CPU kernels did not build ({error}); falling back to torch's operations "
            "(torch.sparse.sampled_addmm, cdist; slower).",
            stacklevel=3,
        )
        return None
    function = library.sparse_peft_sddmm_f32
    function.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 5
    function.restype = ctypes.c_int
    library.sparse_peft_add_entries_f32.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64]
    library.sparse_peft_add_entries_f32.restype = None
    library.sparse_peft_put_entries_f32.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64]
    library.sparse_peft_put_entries_f32.restype = None
    _declare_snell(library)
    return library


def _declare_snell(library: ctypes.CDLL) -> None:
    """The argument types of SNELL's four functions (section 3 of ``kernels.c``)."""
    pointer, size, real = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    library.sparse_peft_snell_delta_f32.argtypes = [pointer, pointer, size, size, size, real, pointer, size]
    library.sparse_peft_snell_delta_f32.restype = ctypes.c_int
    library.sparse_peft_kth_abs_f32.argtypes = [pointer, size, size, size]
    library.sparse_peft_kth_abs_f32.restype = real
    library.sparse_peft_snell_apply_f32.argtypes = [pointer, real, pointer, pointer, size, size]
    library.sparse_peft_snell_apply_f32.restype = None
    library.sparse_peft_snell_backward_f32.argtypes = [pointer] * 3 + [size] * 3 + [real, real] + [pointer] * 4 + [size]
    library.sparse_peft_snell_backward_f32.restype = ctypes.c_int
    library.sparse_peft_snell_count_f32.argtypes = [pointer, pointer, size, size, size, real, real, pointer, size]
    library.sparse_peft_snell_count_f32.restype = size
    library.sparse_peft_snell_fill_f32.argtypes = (
        [pointer, pointer] + [size] * 3 + [real, real] + [pointer] * 6 + [size]
    )
    library.sparse_peft_snell_fill_f32.restype = ctypes.c_int
    library.sparse_peft_snell_sparse_grads_f32.argtypes = [pointer] * 7 + [size] * 3 + [pointer, pointer, size]
    library.sparse_peft_snell_sparse_grads_f32.restype = None


def available() -> bool:
    """Whether :func:`sddmm` runs the compiled kernel here (building it on first call)."""
    return enabled() and _library() is not None


def sddmm(
    g: torch.Tensor,
    x: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    slot: torch.Tensor,
    chunk: int = CHUNK_TOKENS,
) -> Optional[torch.Tensor]:
    """``out[slot[e]] = Σ_t g[t, row_e] · x[t, col[e]]`` for the CSR entries ``e`` (``crow``, ``col``), or ``None``
    when the kernel does not apply (not float32 CPU tensors, switched off, no compiler): then use
    ``torch.sparse.sampled_addmm``.

    ``g``: ``(tokens, m)``, ``x``: ``(tokens, n)``; ``crow``: ``m + 1`` int64 row pointers; ``col`` and ``slot``: int64,
    one per entry (``slot`` a permutation: CSR entry to output position).
    """
    if not _applies(g, x, crow, col, slot):
        return None
    library = _library()
    if library is None:
        return None
    g, x = g.contiguous(), x.contiguous()
    (tokens, m), n, nnz = g.shape, x.shape[1], col.numel()
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of tokens, got {chunk}")
    if nnz == 0 or tokens == 0:
        return torch.zeros(nnz, dtype=torch.float32, device="cpu")
    threads = max(1, min(torch.get_num_threads(), nnz * tokens // MIN_MACS_PER_THREAD))
    out = torch.empty(
        threads * nnz, dtype=torch.float32, device="cpu"
    )  # one vector per thread; the kernel sums into the first
    pointers = [t.data_ptr() for t in (g, x, crow, col, slot, out)]
    if library.sparse_peft_sddmm_f32(*pointers, m, n, tokens, chunk, threads):
        raise MemoryError(f"sparse_peft SDDMM: could not allocate {(n + m) * chunk * 4} bytes of buffers per thread")
    return out[:nnz].clone()


def add_entries(flat: torch.Tensor, index: torch.Tensor, values: torch.Tensor, saved: torch.Tensor) -> bool:
    """``saved[e] = flat[index[e]]; flat[index[e]] += values[e]`` in place, in index order, or ``False`` (nothing
    changed) when the kernel does not apply. :func:`put_entries` undoes it bitwise, repeated positions included.

    The same float32 adds as ``flat.index_add_(0, index, values)``, so the result is bitwise equal; 5-20x faster than
    ``flat[index]`` + ``index_add_`` + ``flat[index] = saved`` on 12-34 thousand entries here (the torch ops pay for
    generic indexing), which a training step runs twice per layer.
    """
    if not (_entries_apply(flat, index, values) and saved.shape == values.shape and _entries_apply(flat, index, saved)):
        return False
    library = _library()
    if library is None:
        return False
    library.sparse_peft_add_entries_f32(
        flat.data_ptr(), index.data_ptr(), values.data_ptr(), saved.data_ptr(), index.numel()
    )
    return True


def put_entries(flat: torch.Tensor, index: torch.Tensor, saved: torch.Tensor) -> bool:
    """``flat[index] = saved`` in place, last entry first; ``False`` (nothing done) when the kernel does not apply."""
    if not _entries_apply(flat, index, saved):
        return False
    library = _library()
    if library is None:
        return False
    library.sparse_peft_put_entries_f32(flat.data_ptr(), index.data_ptr(), saved.data_ptr(), index.numel())
    return True


def _entries_apply(flat: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> bool:
    return (
        enabled()
        and flat.device.type == index.device.type == values.device.type == "cpu"
        and flat.dtype == values.dtype == torch.float32
        and index.dtype == torch.int64
        and flat.dim() == index.dim() == values.dim() == 1
        and index.numel() == values.numel()
        and flat.is_contiguous()
        and index.is_contiguous()
        and values.is_contiguous()
    )


def _applies(g: torch.Tensor, x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, slot: torch.Tensor) -> bool:
    tensors = (g, x, crow, col, slot)
    return (
        enabled()
        and all(t.device.type == "cpu" and not t.is_sparse and t.layout == torch.strided for t in tensors)
        and g.dtype == x.dtype == torch.float32
        and crow.dtype == col.dtype == slot.dtype == torch.int64
        and g.dim() == x.dim() == 2
        and g.shape[0] == x.shape[0]
        and crow.numel() == g.shape[1] + 1
        and col.numel() == slot.numel()
        and crow.is_contiguous()
        and col.is_contiguous()
        and slot.is_contiguous()
    )


# ---- SNELL (section 3 of kernels.c) ----------------------------------------------------------------------------------
def snell_applies(*tensors: torch.Tensor) -> bool:
    """Whether SNELL's compiled kernels take these tensors (all float32 on the CPU, switch on, library built)."""
    return (
        enabled()
        and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.layout == torch.strided for t in tensors)
        and _library() is not None
    )


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _term(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
    """``(Aᵀ as (2, h, n), B as (2, m, h), m, n, h)``, contiguous and detached, for the C functions."""
    at, b = a.detach().transpose(1, 2).contiguous(), b.detach().contiguous()
    return at, b, b.shape[1], at.shape[2], b.shape[2]


def _check_sum(name: str, base: Optional[torch.Tensor], out: Optional[torch.Tensor], shape: tuple[int, int]) -> None:
    """``base`` and ``out`` come together, contiguous and of ``shape``."""
    if (base is None) != (out is None):
        raise ValueError(f"{name} needs both base and out, or neither")
    for tensor in (base, out):
        if tensor is not None and (tuple(tensor.shape) != shape or not tensor.is_contiguous()):
            raise ValueError(f"{name} needs contiguous {shape} tensors, got {tuple(tensor.shape)}")


def snell_delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``ΔW[o, i] = c·(‖B_0[o] − A_0[i]‖ − ‖B_1[o] − A_1[i]‖)``, ``(m, n)`` float32, for ``a``: ``(2, n, h)``, ``b``:
    ``(2, m, h)`` float32 CPU tensors (check :func:`snell_applies` first)."""
    at, b, m, n, h = _term(a, b)
    delta = torch.empty(m, n, dtype=torch.float32)
    if _library().sparse_peft_snell_delta_f32(
        at.data_ptr(), b.data_ptr(), m, n, h, scale, delta.data_ptr(), _threads()
    ):
        raise MemoryError(f"sparse_peft SNELL kernel: could not allocate {2 * n * 4} bytes per thread")
    return delta


def kth_abs(values: torch.Tensor, k: int) -> float:
    """The ``k``-th smallest ``|values|`` (``1 ≤ k ≤ numel``), exactly (a radix select; ``torch.kthvalue``'s value)."""
    flat = values.detach().contiguous().view(-1)
    if not 1 <= k <= flat.numel():
        raise ValueError(f"k must be in [1, {flat.numel()}], got {k}")
    return float(_library().sparse_peft_kth_abs_f32(flat.data_ptr(), flat.numel(), k, _threads()))


def snell_apply(delta: torch.Tensor, tau: float, base: torch.Tensor, out: torch.Tensor) -> None:
    """``out = base + ΔW ⊙ |ΔW| ⊙ 1[|ΔW| > τ]`` (``out`` may be ``base``); all ``(m, n)`` contiguous float32."""
    for tensor in (delta, base, out):
        if tensor.shape != delta.shape or not tensor.is_contiguous():
            raise ValueError(f"snell_apply needs contiguous tensors of shape {tuple(delta.shape)}")
    _library().sparse_peft_snell_apply_f32(
        delta.data_ptr(), tau, base.data_ptr(), out.data_ptr(), delta.numel(), _threads()
    )


def snell_backward(
    grad: Optional[torch.Tensor],
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    tau: float,
    base: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """One term's ``(∂L/∂A, ∂L/∂B)`` from ``grad`` ``= ∂L/∂ΔW_s`` (``(m, n)``; ``None``: no factor gradients) and,
    with ``base`` and ``out``, ``out = base + ΔW_s`` in the same sweep (``out`` may be ``base``)."""
    at, b, m, n, h = _term(a, b)
    threads = _threads()
    _check_sum("snell_backward", base, out, (m, n))
    if grad is not None and (tuple(grad.shape) != (m, n) or not grad.is_contiguous()):
        raise ValueError(f"snell_backward needs a contiguous ({m}, {n}) gradient, got {tuple(grad.shape)}")
    grad_at = torch.zeros(threads, 2, h, n) if grad is not None else None
    grad_b = torch.empty(2, m, h) if grad is not None else None
    pointers = [0 if t is None else t.data_ptr() for t in (grad, at, b)]
    rest = [0 if t is None else t.data_ptr() for t in (base, out, grad_at, grad_b)]
    if _library().sparse_peft_snell_backward_f32(*pointers, m, n, h, scale, tau, *rest, threads):
        raise MemoryError(f"sparse_peft SNELL kernel: could not allocate {4 * n * 4} bytes per thread")
    if grad_at is None:
        return None, None
    return grad_at[0].transpose(1, 2).contiguous(), grad_b


def snell_survivors(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    tau: float,
    base: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The survivors ``|ΔW| > τ`` of one term in CSR order: ``(crow, col, coef_0, coef_1)`` with ``coef_p =
    ±c·|ΔW| / d_p`` (so ``M_p = G·coef_p`` at the survivors) and, with ``base`` and ``out``, ``out = base + ΔW_s``
    in the same sweep."""
    at, b, m, n, h = _term(a, b)
    threads = _threads()
    _check_sum("snell_survivors", base, out, (m, n))
    library = _library()
    crow = torch.empty(m + 1, dtype=torch.int64)
    total = library.sparse_peft_snell_count_f32(
        at.data_ptr(), b.data_ptr(), m, n, h, scale, tau, crow.data_ptr(), threads
    )
    if total < 0:
        raise MemoryError(f"sparse_peft SNELL kernel: could not allocate {2 * n * 4} bytes per thread")
    col = torch.empty(total, dtype=torch.int64)
    coef0, coef1 = torch.empty(total), torch.empty(total)
    rest = [0 if t is None else t.data_ptr() for t in (base, out)]
    pointers = [t.data_ptr() for t in (crow, col, coef0, coef1)]
    if library.sparse_peft_snell_fill_f32(at.data_ptr(), b.data_ptr(), m, n, h, scale, tau, *pointers, *rest, threads):
        raise MemoryError(f"sparse_peft SNELL kernel: could not allocate {2 * n * 4} bytes per thread")
    return crow, col, coef0, coef1


def snell_sparse_grads(
    gk: torch.Tensor,
    survivors: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    a: torch.Tensor,
    b: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(∂L/∂A, ∂L/∂B)`` of one term from ``gk = ∂L/∂ΔW_s`` at its survivors (CSR order of
    :func:`snell_survivors`)."""
    crow, col, coef0, coef1 = survivors
    a, b = a.detach().contiguous(), b.detach().contiguous()
    (_, m, h), n, threads = b.shape, a.shape[1], _threads()
    grad_a, grad_b = torch.zeros(threads, 2, n, h), torch.empty(2, m, h)
    tensors = (gk.contiguous(), crow, col, coef0, coef1, a, b)
    _library().sparse_peft_snell_sparse_grads_f32(
        *[t.data_ptr() for t in tensors], m, n, h, grad_a.data_ptr(), grad_b.data_ptr(), threads
    )
    return grad_a[0].clone(), grad_b
