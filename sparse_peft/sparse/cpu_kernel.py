"""The CPU SDDMM behind every entry-sparse delta's ``∂values``: a small C kernel compiled on first use.

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
            "sparse_peft: no C compiler found ($CC, cc, gcc, clang); the CPU SDDMM of sparse deltas falls "
            "back to torch.sparse.sampled_addmm (slower). Install gcc to build the kernel.",
            stacklevel=3,
        )
        return None
    try:
        library = _load(compiler)
    except RuntimeError as error:
        warnings.warn(
            f"sparse_peft: the CPU SDDMM kernel did not build ({error}); falling back to "
            "torch.sparse.sampled_addmm (slower).",
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
    return library


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
