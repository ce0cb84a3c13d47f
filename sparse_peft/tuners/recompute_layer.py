"""The PEFT layer shared by methods whose weight is rebuilt from the base (LoRS, SPP).

:class:`WeightRecomputeLayer` holds the mechanics (per-adapter factor ``ParameterDict`` s, a forward through
:func:`sparse_peft.sparse.recompute.recomputed_linear` with nothing ``out x in`` kept for backward, exact
merge/unmerge, and the zero pattern of the base); each method's folder keeps only its formula (``apply_adapter``)
and its init.

**The mask.** ``M = (W ≠ 0)`` is never stored: it is recomputed from the base weight whenever the weight is built.
A saved adapter therefore holds only its factors, and reloading it onto the same pruned base gives the same ``M``.
While adapters are merged the layer's forward is the base's own (no mask needed) and :meth:`merge` keeps a copy of
the unmerged weight (on CPU), so the mask of later merges comes from that copy and :meth:`unmerge` restores the base
bit for bit. A merged weight keeps every zero of the base; it can gain a zero where ``W + ΔW`` cancels exactly, so
a new adapter stacked on a ``merge_and_unload`` ed model may see a (slightly) larger zero set than the original.

**Quantized bases (bitsandbytes).** The mask comes from the dequantized weight. NF4 and FP4 both have an exact zero
code, and LLM.int8 rounds to an integer grid containing 0, so a pruned zero dequantizes to exactly 0; small non-zero
weights may dequantize to 0 as well, so ``M`` is a subset of the float base's non-zeros and merges into a
dequantized copy keep every zero of the pruned float base (``tests/test_spp_lors.py`` checks NF4). Merging into
the quantized base itself re-quantizes and is lossy (a warning says so).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn

from ..sparse.recompute import FactorGrads, recomputed_linear
from .base import SparseConfig
from .layer_base import SparseLayerBase


class WeightRecomputeLayer(SparseLayerBase):
    """A linear layer whose weight ``W_eff = f_K(…f_1(W)…)`` applies each active adapter ``k`` in turn.

    Subclasses set ``prefix`` and ``factor_names`` (short names, e.g. ``("A", "B")``; the attributes are
    ``<prefix><name>``) and implement :meth:`init_factors` and :meth:`apply_adapter`; optionally
    :meth:`factor_grads` for a custom (non-exact) gradient.
    """

    prefix: str = "weight_recompute_"
    factor_names: tuple[str, ...] = ()
    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.adapter_layer_names = tuple(f"{cls.prefix}{name}" for name in cls.factor_names)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SparseConfig, module_name: str = "") -> None:
        super().__init__(base_layer, module_name)
        for attr in self.adapter_layer_names:
            setattr(self, attr, nn.ParameterDict({}))
        self._unmerged_weight: Optional[torch.Tensor] = None
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    # ---- method hooks ------------------------------------------------------------------------------------------
    def init_factors(self, config: SparseConfig) -> dict[str, torch.Tensor]:
        """Initial value of every factor (keyed by ``factor_names``) of a new adapter."""
        raise NotImplementedError

    def apply_adapter(
        self, weight: torch.Tensor, base: torch.Tensor, config: SparseConfig, *factors: torch.Tensor
    ) -> torch.Tensor:
        """``f_k(weight)``: the weight after adapter ``k``; ``base`` is the unmerged base weight (for masks)."""
        raise NotImplementedError

    def factor_grads(self, names: Sequence[str]) -> Optional[FactorGrads]:
        """A custom gradient for the factors of ``names`` (see :func:`recomputed_linear`), or None for exact."""
        return None

    # ---- storage -----------------------------------------------------------------------------------------------
    def factors(self, adapter_name: str) -> list[nn.Parameter]:
        return [getattr(self, attr)[adapter_name] for attr in self.adapter_layer_names]

    def _has(self, adapter_name: str) -> bool:
        return adapter_name in getattr(self, self.adapter_layer_names[0])

    def update_layer(self, adapter_name: str, config: SparseConfig, **kwargs: Any) -> None:
        """Create adapter ``adapter_name`` with the factors of :meth:`init_factors`."""
        device, initial = self._weight_device(), self.init_factors(config)
        for short, attr in zip(self.factor_names, self.adapter_layer_names, strict=True):
            getattr(self, attr)[adapter_name] = nn.Parameter(initial[short].to(device))
        self.adapter_configs[adapter_name] = config
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _generator(self, config: SparseConfig) -> torch.Generator:
        return torch.Generator().manual_seed(self.module_seed(config.seed) + 1)

    # ---- the effective weight ----------------------------------------------------------------------------------
    def _build(self, names: Sequence[str], *flat: torch.Tensor) -> torch.Tensor:
        """``W_eff`` of the active adapters ``names`` from their flat factors (forward and backward call this)."""
        base = self.get_base_weight()
        weight, per = base, len(self.factor_names)
        for i, name in enumerate(names):
            weight = self.apply_adapter(weight, base, self.adapter_configs[name], *flat[i * per : (i + 1) * per])
        return weight

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``f_k(W) − W`` of one adapter on the unmerged base ``W``, shape ``(out, in)`` (inspection, LoRA
        conversion); while adapters are merged ``W`` is the copy :meth:`merge` kept, not the merged weight."""
        with torch.no_grad():
            base = self.get_base_weight()
            if self._unmerged_weight is not None:
                base = self._unmerged_weight.to(device=base.device)
            factors = [f.detach() for f in self.factors(adapter_name)]
            return self.apply_adapter(base, base, self.adapter_configs[adapter_name], *factors) - base

    # ---- forward -----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        names = [name for name in self.active_adapters if self._has(name)]
        if self._adapters_off() or self.merged or not names:
            return self.base_layer(x, *args, **kwargs)
        flat = [factor for name in names for factor in self.factors(name)]
        bias = getattr(self.get_base_layer(), "bias", None)
        build = functools.partial(self._build, tuple(names))
        out = recomputed_linear(x, build, flat, bias=bias, factor_grads=self.factor_grads(names))
        return out

    # ---- merge / unmerge ---------------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """``W ← f_k(W)`` for each adapter in turn; the first merge keeps a CPU copy of ``W`` for :meth:`unmerge`."""
        for name in self._adapters_to_merge(adapter_names, keep=self._has):
            weight = self.get_base_weight()
            if self._unmerged_weight is None:
                self._unmerged_weight = weight.detach().to("cpu", copy=True)
            base = self._unmerged_weight.to(weight.device)
            with torch.no_grad():
                factors = [f.detach() for f in self.factors(name)]
                merged = self.apply_adapter(weight, base, self.adapter_configs[name], *factors).to(weight.dtype)
            self._check_merged(merged, name, safe_merge)
            self.set_base_weight(merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Restore the weight saved by the first :meth:`merge` (bit for bit on float bases)."""
        if self._nothing_to_unmerge():
            return
        device = self.get_base_weight().device
        self.set_base_weight(self._unmerged_weight.to(device))
        self._unmerged_weight = None
        self.merged_adapters.clear()


def kaiming_uniform(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """``nn.init.kaiming_uniform_(a=√5)`` of a ``rows x cols`` matrix (PEFT's LoRA ``A`` init), seeded."""
    bound = 1.0 / math.sqrt(cols)
    return (torch.rand(rows, cols, generator=generator) * 2 - 1) * bound
