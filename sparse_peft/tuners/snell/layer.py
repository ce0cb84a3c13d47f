"""The SNELL layer: kernelised low-rank factors whose merged delta is sparsified by competition at every forward."""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional, Union

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from ...sparse.delta import add_into, gather
from ...sparse.kernel_delta import kernel_sparse_linear, kernel_sparse_matmul, sparse_kernel_weight
from ..layer_base import SparseLayerBase
from .config import SnellConfig


def init_factors(
    in_features: int, out_features: int, half: int, init: Union[bool, str], seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of shapes ``(2, in, r/2)`` and ``(2, out, r/2)``, Kaiming-uniform with ``a=√5`` (bound
    ``1/√fan_in``), from a generator seeded with ``seed``.

    ``init`` True or ``"identity"``: the reference's init, on each whole 3-D tensor (``fan_in = in·r/2`` resp.
    ``out·r/2``). False: on each 2-D slice (``fan_in = r/2``), much larger, for tests.
    """
    generator = torch.Generator().manual_seed(seed)
    a = torch.empty(2, in_features, half)
    b = torch.empty(2, out_features, half)
    tensors = (a, b) if init else (*a, *b)
    for tensor in tensors:
        nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)
    return a, b


class SnellLinear(SparseLayerBase):
    """SNELL on one linear layer (Shen et al., NeurIPS 2024).

    Forward: ``y = x Wᵀ + b + drop(x) ΔW_sᵀ`` with

    * ``ΔW[o, i] = c·(‖B_0[o] − A_0[i]‖₂ − ‖B_1[o] − A_1[i]‖₂)`` (piecewise-linear distance kernel, ``c`` =
      ``kernel_scale``),
    * ``τ`` = the ``round(s·m·n)``-th smallest ``|ΔW|`` (``s`` = ``sparsity``), so exactly ``m·n − round(s·m·n)``
      entries survive (ties at ``τ`` aside),
    * ``ΔW_s = ΔW ⊙ stopgrad(|ΔW|) ⊙ 1[|ΔW| > τ]``, recomputed at every forward, so the surviving set moves as the
      shared factors train.

    Stored per adapter: ``<prefix>A`` of shape ``(2, in, r/2)`` and ``<prefix>B`` of shape ``(2, out, r/2)``
    (trainable), nothing else: no mask and no indices. With ``init_weights="identity"`` also the frozen initial
    factors ``<prefix>A0`` / ``<prefix>B0`` (persistent buffers), whose ``ΔW_s`` is subtracted
    (:class:`~sparse_peft.tuners.snell.config.SnellConfig`). The dense ``ΔW`` is a transient of one layer in forward
    and in backward: the layer runs one GEMM on ``W + ΔW_s`` each way
    (:class:`sparse_peft.sparse.kernel_delta.KernelSparseLinear` saves only ``x``, the factors and ``τ``).

    Merge writes ``ΔW_s`` at the current factors into ``W`` and keeps the replaced entries, so unmerge is exact.
    """

    prefix = "sparse_peft_snell_"
    adapter_layer_names: tuple[str, ...] = ("sparse_peft_snell_A", "sparse_peft_snell_B")
    other_param_names: tuple[str, ...] = ("sparse_peft_snell_A0", "sparse_peft_snell_B0", "sparse_peft_snell_dropout")
    _adapter_state = SparseLayerBase._adapter_state

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SnellConfig, module_name: str = "") -> None:
        super().__init__(base_layer, module_name)
        self.sparse_peft_snell_A = nn.ParameterDict({})
        self.sparse_peft_snell_B = nn.ParameterDict({})
        self.sparse_peft_snell_A0 = BufferDict({}, persistent=True)
        self.sparse_peft_snell_B0 = BufferDict({}, persistent=True)
        self.sparse_peft_snell_dropout = nn.ModuleDict({})
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def n_drop(self, adapter_name: str) -> int:
        """How many entries of ``ΔW`` the competition zeroes: ``round(s·m·n)``."""
        return round(self.adapter_configs[adapter_name].sparsity * self.numel)

    def update_layer(self, adapter_name: str, config: SnellConfig, **kwargs: Any) -> None:
        """Create adapter ``adapter_name`` with factors from :func:`init_factors`, drawn from this module's seed."""
        half = config.r // 2
        if half > min(self.shape):
            warnings.warn(
                f"SNELL rank r={config.r} on {self.module_name or 'a layer'} of shape {self.shape} gives factors "
                f"wider than the matrix; a smaller r would do",
                UserWarning,
                stacklevel=2,
            )
        self.adapter_configs[adapter_name] = config
        seed = self.module_seed(config.seed)
        a, b = init_factors(self.in_features, self.out_features, half, config.init_weights, seed)
        device = self._weight_device()
        self.sparse_peft_snell_A[adapter_name] = nn.Parameter(a.to(device))
        self.sparse_peft_snell_B[adapter_name] = nn.Parameter(b.to(device))
        if config.starts_as_identity:
            self.sparse_peft_snell_A0[adapter_name] = a.clone().to(device)
            self.sparse_peft_snell_B0[adapter_name] = b.clone().to(device)
        self.sparse_peft_snell_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _terms(self, name: str) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        """``(A, B, c)`` of every kernel term of adapter ``name``: its factors, and for ``init_weights="identity"``
        the frozen initial factors with scale ``−c`` (``ΔW_s`` is odd in ``c``, so they subtract the initial
        delta)."""
        scale = self.adapter_configs[name].kernel_scale
        terms = [(self.sparse_peft_snell_A[name], self.sparse_peft_snell_B[name], scale)]
        if name in self.sparse_peft_snell_A0:
            a0, b0 = self.sparse_peft_snell_A0[name], self.sparse_peft_snell_B0[name]
            terms.append((a0.to(terms[0][0].dtype), b0.to(terms[0][1].dtype), -scale))
        return terms

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The sparsified ``ΔW_s`` at the current factors (minus the initial one for an identity init), ``(out,
        in)``, in float32 for half-precision factors (no gradient)."""
        n_drop = self.n_drop(adapter_name)
        with torch.no_grad():
            deltas = [sparse_kernel_weight(a, b, c, n_drop) for a, b, c in self._terms(adapter_name)]
            return deltas[0] if len(deltas) == 1 else deltas[0] + deltas[1]

    # ---- forward -----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """One GEMM on ``W + Σ_a ΔW_s,a`` (:func:`~sparse_peft.sparse.kernel_delta.kernel_sparse_linear`) when no
        active adapter has dropout and the base weight is frozen; else the base output plus each ``drop(x) ΔW_sᵀ``."""
        names = [name for name in self.active_adapters if name in self.sparse_peft_snell_A]
        if self._adapters_off() or self.merged or not names:
            return self.base_layer(x, *args, **kwargs)
        configs = [self.adapter_configs[name] for name in names]
        terms = [(name, term) for name in names for term in self._terms(name)]
        base = self.get_base_layer()
        frozen_base = not getattr(getattr(base, "weight", None), "requires_grad", False)
        if frozen_base and not args and not kwargs and not any(c.dropout for c in configs):
            pairs = [(a, b) for _, (a, b, _) in terms]
            scales = [c for _, (_, _, c) in terms]
            n_drops = [self.n_drop(name) for name, _ in terms]
            return kernel_sparse_linear(x, self.get_base_weight, getattr(base, "bias", None), pairs, scales, n_drops)
        result, _ = self._base_forward(x, *args, **kwargs)
        for name in names:  # an adapter's terms are summed first, so an identity init adds an exact zero
            x_in = self.sparse_peft_snell_dropout[name](x)
            outputs = [kernel_sparse_matmul(x_in, a, b, c, self.n_drop(name)) for a, b, c in self._terms(name)]
            result = result + sum(outputs[1:], outputs[0]).to(result.dtype)
        return result

    # ---- merge / unmerge ---------------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """``W ← W + ΔW_s``, writing only the surviving entries and keeping the replaced ones for :meth:`unmerge`."""
        for name in self._adapters_to_merge(adapter_names):
            if name not in self.sparse_peft_snell_A:
                continue
            weight = self.get_base_weight()
            delta = self.get_delta_weight(name).reshape(-1)
            positions = delta.nonzero().flatten()
            original = (positions, gather(weight, positions))
            self._commit_merge(name, add_into(weight, delta[positions], positions), safe_merge, original)

    def unmerge(self) -> None:
        """Undo :meth:`merge` exactly, last merged adapter first."""
        for _, (positions, originals) in self._saved_merges():
            weight = self.get_base_weight().clone()
            weight.view(-1)[positions] = originals.to(weight.dtype)
            self.set_base_weight(weight)

    def __repr__(self) -> str:
        return f"snell.{nn.Module.__repr__(self)}"  # not the base's ``<prefix>.`` tag
