"""The compiled CPU kernels (sparse_peft/sparse/cpu_kernel.py, kernels.c): the SDDMM exact against the dense product,
the entry add / restore bitwise, their build cache, and the fallback to torch's kernels."""

from __future__ import annotations

import subprocess
import warnings

import pytest
import torch

from sparse_peft.sparse import cpu_kernel
from sparse_peft.sparse.delta import SparsePattern

needs_compiler = pytest.mark.skipif(cpu_kernel._compiler() is None, reason="no C compiler: the kernel cannot build")


def _case(m: int, n: int, k: int, tokens: int, seed: int = 0, empty_rows: bool = False):
    generator = torch.Generator().manual_seed(seed)
    flat = torch.randperm(m * n, generator=generator)[:k]
    if empty_rows:  # every third row holds no entry
        flat = flat[(flat // n) % 3 != 0]
    pattern = SparsePattern.build(flat, (m, n))
    g = torch.randn(tokens, m, generator=generator)
    x = torch.randn(tokens, n, generator=generator)
    expected = (g.double().t() @ x.double()).view(-1)[flat].float()
    return pattern, g, x, expected


@needs_compiler
@pytest.mark.parametrize(
    ("m", "n", "k", "tokens", "chunk", "empty_rows"),
    [
        (1, 1, 1, 1, 128, False),
        (6, 9, 20, 7, 4, False),  # rows of 0..9 entries: the 4-entry loop and its tail
        (37, 29, 300, 203, 64, True),  # ragged 8 x 8 transposes, a partial last chunk, empty rows
        (64, 48, 1500, 130, 128, False),
        (16, 200, 3000, 5, 128, False),  # fewer tokens than one chunk
    ],
)
@pytest.mark.parametrize("threads", [1, 3])
def test_kernel_equals_dense_product_at_the_entries(monkeypatch, m, n, k, tokens, chunk, empty_rows, threads):
    monkeypatch.setattr(cpu_kernel, "MIN_MACS_PER_THREAD", 1)  # let every case split across threads
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        pattern, g, x, expected = _case(m, n, k, tokens, empty_rows=empty_rows)
        result = cpu_kernel.sddmm(g, x, pattern.crow, pattern.col_sorted, pattern.row_order, chunk=chunk)
    finally:
        torch.set_num_threads(previous)
    assert result is not None
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4)


@needs_compiler
def test_kernel_takes_strided_inputs_and_no_entries():
    pattern, g, x, expected = _case(20, 30, 100, 50)
    result = cpu_kernel.sddmm(g.t().contiguous().t(), x, pattern.crow, pattern.col_sorted, pattern.row_order)
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4)
    empty = SparsePattern.build(torch.empty(0, dtype=torch.long), (20, 30))
    assert cpu_kernel.sddmm(g, x, empty.crow, empty.col_sorted, empty.row_order).numel() == 0


@needs_compiler
def test_sampled_grad_runs_the_kernel_on_cpu_float32(monkeypatch):
    pattern, g, x, expected = _case(40, 24, 200, 33)
    calls = []
    original = cpu_kernel.sddmm
    monkeypatch.setattr(cpu_kernel, "sddmm", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    torch.testing.assert_close(pattern.sampled_grad(g, x), expected, rtol=1e-4, atol=1e-4)
    assert calls and cpu_kernel.available()


@pytest.mark.parametrize("reason", ["switched off", "float64"])
def test_fallback_to_sampled_addmm_gives_the_same_gradient(monkeypatch, reason):
    pattern, g, x, expected = _case(40, 24, 200, 33)
    if reason == "switched off":
        monkeypatch.setenv(cpu_kernel.SWITCH_ENV_VAR, "0")
    else:
        g, x, expected = g.double(), x.double(), expected.double()
    assert cpu_kernel.sddmm(g, x, pattern.crow, pattern.col_sorted, pattern.row_order) is None
    torch.testing.assert_close(pattern.sampled_grad(g, x), expected, rtol=1e-4, atol=1e-4)


@needs_compiler
def test_build_is_cached_per_machine_and_never_half_written(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSE_PEFT_CACHE", str(tmp_path))
    compiler = cpu_kernel._compiler()
    assert cpu_kernel._load(compiler) is not None
    [built] = (tmp_path / "kernels").iterdir()  # one build, no temporary file left behind
    assert built == cpu_kernel._target(compiler, cpu_kernel.FLAG_SETS[0])

    def no_compile(command):
        raise AssertionError("rebuilt a cached kernel")

    monkeypatch.setattr(cpu_kernel, "_compile", no_compile)
    assert cpu_kernel._load(compiler) is not None
    monkeypatch.setattr(cpu_kernel, "_cpu_fingerprint", lambda: "another CPU")
    with pytest.raises(AssertionError, match="rebuilt a cached kernel"):
        cpu_kernel._load(compiler)  # another CPU's build is never reused


def test_a_compiler_that_hangs_falls_back_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSE_PEFT_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_compiler", lambda: "/usr/bin/cc")

    def hang(command):
        raise subprocess.TimeoutExpired(command, 120)

    monkeypatch.setattr(cpu_kernel, "_compile", hang)
    cpu_kernel._library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="did not build"):
            assert not cpu_kernel.available()
        pattern, g, x, expected = _case(10, 12, 30, 9)
        torch.testing.assert_close(pattern.sampled_grad(g, x), expected, rtol=1e-4, atol=1e-4)
    finally:
        cpu_kernel._library.cache_clear()


def test_no_compiler_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "_compiler", lambda: None)
    cpu_kernel._library.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not cpu_kernel.available()
            assert not cpu_kernel.available()
        assert len([w for w in caught if "no C compiler" in str(w.message)]) == 1
        assert not cpu_kernel.snell_applies(torch.zeros(2))  # SNELL takes torch's path too
        pattern, g, x, expected = _case(10, 12, 30, 9)
        torch.testing.assert_close(pattern.sampled_grad(g, x), expected, rtol=1e-4, atol=1e-4)
    finally:
        cpu_kernel._library.cache_clear()


@needs_compiler
def test_entry_add_and_restore_are_bitwise_those_of_index_add():
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(5000, generator=generator)
    index = torch.randperm(5000, generator=generator)[:700]
    values = torch.randn(700, generator=generator) * 1e-3
    expected = weight.clone().index_add_(0, index, values)
    original = weight.clone()
    saved = torch.empty(700)
    assert cpu_kernel.add_entries(weight, index, values, saved) and torch.equal(weight, expected)
    assert torch.equal(saved, original[index])
    assert cpu_kernel.put_entries(weight, index, saved)
    assert torch.equal(weight, original)


@needs_compiler
def test_entry_restore_is_exact_where_a_position_repeats():
    """LIFT's frozen entries may share a position with an active one: W must come back bitwise all the same."""
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(50, generator=generator)
    index = torch.tensor([3, 7, 3, 11, 7, 3])
    values = torch.randn(6, generator=generator)
    original = weight.clone()
    expected = weight.clone().index_add_(0, index, values)
    saved = torch.empty(6)
    assert cpu_kernel.add_entries(weight, index, values, saved)
    torch.testing.assert_close(weight, expected, rtol=0, atol=1e-6)
    assert cpu_kernel.put_entries(weight, index, saved)
    assert torch.equal(weight, original)


def test_effective_weight_restores_the_base_with_repeated_positions():
    from sparse_peft.sparse.delta import DeltaTerm, effective_weight

    weight = torch.randn(6, 5)
    original = weight.clone()
    pattern = SparsePattern.build(torch.tensor([4, 9, 4, 22, 9]), (6, 5))
    values = torch.randn(5)
    with effective_weight(weight, [DeltaTerm(pattern, 5)], [values], torch.float32) as w_eff:
        expected = original.view(-1).clone().index_add_(0, pattern.flat, values).view(6, 5)
        torch.testing.assert_close(w_eff, expected, rtol=0, atol=1e-6)
    assert torch.equal(weight, original)
    with pytest.raises(ValueError, match="cannot apply to a weight of shape"):
        with effective_weight(torch.randn(5, 6), [DeltaTerm(pattern, 5)], [values], torch.float32):
            pass


def test_sampled_grad_refuses_operands_of_other_shapes():
    pattern = SparsePattern.build(torch.tensor([1, 5]), (3, 4))
    with pytest.raises(ValueError, match="needs grad_out"):
        pattern.sampled_grad(torch.randn(7, 3), torch.randn(7, 9))
    with pytest.raises(ValueError, match="positive number of tokens"):
        cpu_kernel.sddmm(torch.randn(7, 3), torch.randn(7, 4), pattern.crow, pattern.col_sorted, pattern.row_order, 0)


def test_entry_kernels_leave_other_dtypes_to_torch():
    weight, index = torch.zeros(10, dtype=torch.bfloat16), torch.arange(3)
    saved = torch.empty(3, dtype=torch.bfloat16)
    assert not cpu_kernel.add_entries(weight, index, torch.ones(3, dtype=torch.bfloat16), saved)
    assert not cpu_kernel.put_entries(weight, index, torch.ones(3, dtype=torch.bfloat16))
    assert torch.equal(weight, torch.zeros(10, dtype=torch.bfloat16))
