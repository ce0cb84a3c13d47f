"""The PEFT layer for entry-sparse methods (LIFT, SpIEL, diff pruning, RoSA's sparse part).

``y = base(x) + x · (ΔW_active + ΔW_frozen)ᵀ`` where ``ΔW_active = scatter(values, indices)`` holds the ``k``
trainable entries and ``ΔW_frozen = scatter(frozen_values, frozen_indices)`` holds learned entries that left the
active mask (LIFT's refreshes keep what retired entries learned). Adapter state per adapter name, all saved by PEFT:

* ``<prefix>values``         trainable ``ParameterDict`` entry, float, length ``k``;
* ``<prefix>indices``        persistent integer buffer, flat row-major positions (int32 below 2^31 entries);
* ``<prefix>frozen_values``  persistent float buffer, any length (resized to the checkpoint on load);
* ``<prefix>frozen_indices`` persistent integer buffer, same length.

Subclasses decide the budget ``k`` (:meth:`budget`) and the initial positions (:meth:`select`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from ..sparse.delta import (
    DeltaTerm,
    LowRank,
    SparsePattern,
    add_into,
    dense_delta,
    fused_sparse_linear,
    gather,
    index_dtype,
    prefer_fused,
    sparse_delta_matmul,
)
from .base import SparseConfig, from_checkpoint
from .layer_base import AdapterStore, SparseLayerBase


def _same_key(a: tuple, b: tuple) -> bool:
    """Cache keys alternate tensors (compared by identity) and version counters (compared by value)."""
    return all((x is y) if isinstance(x, torch.Tensor) else (x == y) for x, y in zip(a, b, strict=True))


class SparseDeltaLinear(SparseLayerBase):
    """A linear layer plus sparse deltas, one per adapter (see module docstring for the formula and the storage)."""

    prefix: str = "sparse_delta_"
    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()
    min_budget: int = 1  # smallest allowed k; a subclass with an optional sparse part (RoSA's density=0) sets 0
    _adapter_state = (*SparseLayerBase._adapter_state, "_pattern_cache")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        p = cls.prefix
        cls.adapter_layer_names = (f"{p}values",)
        cls.other_param_names = (f"{p}indices", f"{p}frozen_values", f"{p}frozen_indices")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SparseConfig, module_name: str = "") -> None:
        super().__init__(base_layer, module_name)
        p = self.prefix
        setattr(self, f"{p}values", nn.ParameterDict({}))
        for name in ("indices", "frozen_values", "frozen_indices"):
            setattr(self, f"{p}{name}", BufferDict({}, persistent=True))
        self._pattern_cache: dict[str, tuple[tuple, SparsePattern]] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    # ---- storage accessors -------------------------------------------------------------------------------------
    values = AdapterStore("values")
    indices = AdapterStore("indices")
    frozen_values = AdapterStore("frozen_values")
    frozen_indices = AdapterStore("frozen_indices")

    # ---- method hooks ------------------------------------------------------------------------------------------
    def budget(self, config: SparseConfig) -> int:
        """Number of trainable entries ``k`` for this matrix."""
        raise NotImplementedError

    def select(self, config: SparseConfig, adapter_name: str, k: int) -> torch.Tensor:
        """Initial flat positions (``k`` unique, sorted) for a new adapter."""
        raise NotImplementedError

    def gradient_observer(self, adapter_name: str):
        """A callable ``(grad_out_2d, x_2d, grad_values) -> None`` to run in this layer's backward, or None."""
        return None

    def base_weight_float(self) -> torch.Tensor:
        """The (dequantized) base weight in float32; a transient copy for quantized or low-precision bases."""
        return self.get_base_weight().float()

    # ---- adapter lifecycle -------------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: SparseConfig, **kwargs: Any) -> None:
        """Create adapter ``adapter_name``: pick ``k`` positions, zero (or random) values, empty frozen part.

        When loading a saved adapter (:func:`~sparse_peft.tuners.base.from_checkpoint`) the positions are
        placeholders that the checkpoint overwrites, so no selection work (e.g. an SVD) is spent on them.
        """
        k = self.budget(config)
        if not self.min_budget <= k <= self.numel:
            raise ValueError(
                f"{type(self).__name__} on {self.module_name or 'a layer'} of shape {self.shape}: the budget gives "
                f"k={k} trainable entries, which must be in [{self.min_budget}, {self.numel}]; lower rank/density"
            )
        self.adapter_configs[adapter_name] = config
        device = self._weight_device()
        if from_checkpoint(config):
            positions = torch.arange(k, dtype=index_dtype(self.numel))
        else:
            positions = self.select(config, adapter_name, k).to(index_dtype(self.numel))
        generator = torch.Generator().manual_seed(self.module_seed(config.seed) + 1)
        init = torch.zeros(k) if config.init_weights else 0.02 * torch.randn(k, generator=generator)
        self.values[adapter_name] = nn.Parameter(init.to(device))
        self.indices[adapter_name] = positions.to(device)
        n_frozen = config.frozen_counts.get(self.module_name, 0)  # > 0 only when loading a trained adapter
        self.frozen_values[adapter_name] = torch.zeros(n_frozen, device=device)
        self.frozen_indices[adapter_name] = torch.zeros(n_frozen, dtype=positions.dtype, device=device)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def set_frozen(self, adapter_name: str, positions: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the frozen part of ``adapter_name`` and record its size in the config (for loaders)."""
        self.frozen_indices[adapter_name] = positions.to(self.indices[adapter_name].dtype)
        self.frozen_values[adapter_name] = values.to(self.frozen_values[adapter_name].dtype)
        self.adapter_configs[adapter_name].frozen_counts[self.module_name] = int(positions.numel())

    @torch.no_grad()
    def set_delta(self, adapter_name: str, positions: torch.Tensor, values: torch.Tensor) -> None:
        """Make ``ΔW`` of ``adapter_name`` equal ``scatter(values, positions)`` (unique flat positions), keeping ``k``
        (arithmetic on adapters writes its results through this).

        The ``k`` trainable slots take the ``k`` largest ``|values|`` (ties: lower position first), the other entries
        become the frozen part, whose size :meth:`set_frozen` records in ``config.frozen_counts`` (and the loader
        reads); with fewer than ``k`` entries the free slots hold zeros at the lowest positions not in ``positions``,
        which leaves ``ΔW`` unchanged. Both parts are stored sorted by position.
        """
        values_param, indices = self.values[adapter_name], self.indices[adapter_name]
        k, device = values_param.numel(), values_param.device
        positions, by_place = torch.sort(positions.long().cpu())
        values = values.detach().float().cpu()[by_place]
        order = torch.sort(values.abs(), descending=True, stable=True).indices  # stable: ties keep the lower place
        active, frozen = order[:k], order[k:]
        active_pos, active_val = positions[active], values[active]
        if active_pos.numel() < k:
            free = torch.ones(self.numel, dtype=torch.bool)
            free[positions] = False
            padding = free.nonzero().flatten()[: k - active_pos.numel()]
            active_pos = torch.cat([active_pos, padding])
            active_val = torch.cat([active_val, torch.zeros(padding.numel())])
        active_pos, slot = torch.sort(active_pos)
        values_param.copy_(active_val[slot].to(device=device, dtype=values_param.dtype))
        indices.copy_(active_pos.to(device=indices.device, dtype=indices.dtype))
        frozen_pos, slot = torch.sort(positions[frozen])
        self.set_frozen(adapter_name, frozen_pos.to(device), values[frozen][slot].to(device))

    def delta_tensors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(values, indices, n_trainable)`` of the whole delta: active entries first, then the frozen ones."""
        values, n_trainable = self._all_values(adapter_name)
        return values, self._all_indices(adapter_name), n_trainable

    def _all_indices(self, adapter_name: str) -> torch.Tensor:
        active, frozen = self.indices[adapter_name], self.frozen_indices[adapter_name]
        return torch.cat([active.long(), frozen.long()]) if frozen.numel() else active

    def _all_values(self, adapter_name: str) -> tuple[torch.Tensor, int]:
        """Active values followed by the frozen ones (the order of :meth:`pattern`), and the active count."""
        values, frozen = self.values[adapter_name], self.frozen_values[adapter_name]
        merged = torch.cat([values, frozen.to(values.dtype)]) if frozen.numel() else values
        return merged, values.numel()

    def pattern(self, adapter_name: str) -> SparsePattern:
        """The CSR layout of the whole delta (active, then frozen), rebuilt only when an index tensor changes.

        The cache key holds the index tensors themselves (so their ids cannot be reused) and their version
        counters, which every in-place edit (a mask refresh, ``load_state_dict``) increments.
        """
        active, frozen = self.indices[adapter_name], self.frozen_indices[adapter_name]
        key = (active, active._version, frozen, frozen._version)
        cached = self._pattern_cache.get(adapter_name)
        if cached is not None and _same_key(cached[0], key):
            return cached[1]
        built = SparsePattern.build(self._all_indices(adapter_name), self.shape)
        self._pattern_cache[adapter_name] = (key, built)
        return built

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Dense ``ΔW`` of one adapter, shape ``(out, in)`` (merging and inspection only)."""
        values, indices, _ = self.delta_tensors(adapter_name)
        return dense_delta(values.detach(), indices, self.shape)

    # ---- forward -----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._adapters_off() or self.merged:
            return self.base_layer(x, *args, **kwargs)
        return self._delta_forward(x, *args, **kwargs)

    def delta_term(self, adapter_name: str) -> Optional[tuple[DeltaTerm, torch.Tensor]]:
        """This adapter's delta for the forward (its layout, trainable count, observer) and its values, or None
        when it stores no entries. Subclasses change which slots train or what observes the backward."""
        values, n_trainable = self._all_values(adapter_name)
        if values.numel() == 0:
            return None
        observer = self.gradient_observer(adapter_name) if self.training and torch.is_grad_enabled() else None
        return DeltaTerm(self.pattern(adapter_name), n_trainable, observer), values

    def _delta_forward(
        self, x: torch.Tensor, *args: Any, low_rank: Sequence[LowRank] = (), **kwargs: Any
    ) -> torch.Tensor:
        """``base(x) + x · Σ_a (s_a·B_a·A_a + ΔW_a)ᵀ`` over the active adapters and the given ``low_rank`` terms.

        With gradients (training) or enough tokens this is one GEMM on ``W + Σ s·B·A + Σ ΔW_a``
        (:func:`~sparse_peft.sparse.delta.fused_sparse_linear`); a no-grad call on few tokens (decoding) runs the
        base layer plus a CSR product (and each low-rank term as ``s·(x Aᵀ) Bᵀ``) instead
        (:func:`~sparse_peft.sparse.delta.prefer_fused` has the rule), and so does a base whose weight was made
        trainable by hand (the fused path gives no gradient to ``W``).
        """
        pairs = [pair for name in self.active_adapters if name in self.values and (pair := self.delta_term(name))]
        if not pairs and not low_rank:
            return self.base_layer(x, *args, **kwargs)
        terms, values = zip(*pairs, strict=True) if pairs else ((), ())
        factors = [t for term in low_rank for t in (term.a, term.b)]
        grads = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *values, *factors))
        tokens = x.numel() // max(x.shape[-1], 1)
        base = self.get_base_layer()
        frozen_base = not getattr(getattr(base, "weight", None), "requires_grad", False)
        fused = prefer_fused(tokens, grads)
        if fused and frozen_base and not args and not kwargs:
            bias = getattr(base, "bias", None)
            return fused_sparse_linear(x, self.get_base_weight, bias, terms, values, low_rank)
        result, _ = self._base_forward(x, *args, **kwargs)
        for term, vals in zip(terms, values, strict=True):
            delta = sparse_delta_matmul(x, vals, term.pattern, self.shape, term.n_trainable, term.observer)
            result = result + delta.to(result.dtype)
        for term in low_rank:
            a, b = term.a, term.b
            result = result + (F.linear(F.linear(x.to(a.dtype), a), b) * term.scale).to(result.dtype)
        return result

    # ---- merge / unmerge ---------------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """``W ← W + ΔW`` for each adapter, touching only its entries; the replaced entries are kept so that
        :meth:`unmerge` restores the base exactly (up to re-quantization on quantized bases)."""
        for name in self._adapters_to_merge(adapter_names):
            if name not in self.values:
                continue
            weight = self.get_base_weight()
            dense = self._dense_merge_term(name)
            if dense is not None:
                weight = (weight.float() + dense.to(weight.device)).to(weight.dtype)
            values, indices, _ = self.delta_tensors(name)
            self._commit_merge(name, add_into(weight, values.detach(), indices), safe_merge, gather(weight, indices))

    def unmerge(self) -> None:
        """Undo :meth:`merge`, last merged adapter first, writing back the saved original entries."""
        for name, original in self._saved_merges():
            self._restore_merged(name, original)

    def _restore_merged(self, name: str, original: torch.Tensor) -> None:
        """Write the entries one adapter's merge replaced back into the weight (and remove its dense part)."""
        _, indices, _ = self.delta_tensors(name)
        weight = self.get_base_weight().clone()
        weight.view(-1)[indices.long()] = original.to(weight.dtype)
        dense = self._dense_merge_term(name)
        if dense is not None:
            weight = (weight.float() - dense.to(weight.device)).to(weight.dtype)
        self.set_base_weight(weight)

    def _dense_merge_term(self, adapter_name: str) -> Optional[torch.Tensor]:
        """A dense float32 ``(out, in)`` part of ``ΔW`` besides the entries (RoSA's ``s·B·A``), or None.

        :meth:`merge` adds it before writing the entries; :meth:`unmerge` writes the entries back, then subtracts it
        (exact up to float rounding, like PEFT's LoRA).
        """
        return None

    # ---- loading -----------------------------------------------------------------------------------------------
    def prepare_load(self, module_key: str, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
        """Validate a checkpoint's entries for this layer and resize the variable-length frozen part to fit it.

        Raises a ``ValueError`` naming the layer when an entry is missing, has another shape than this base model
        implies, or points outside the weight.
        """
        if adapter_name not in self.values:
            return
        p, where = self.prefix, module_key or "the model"
        keys = {n: f"{module_key}.{p}{n}.{adapter_name}".lstrip(".") for n in ("values", "indices")}
        for name, key in keys.items():
            if key not in state_dict:
                raise ValueError(
                    f"the adapter checkpoint has no {p}{name} for {where}: the file is incomplete or was saved for "
                    f"other target modules; re-save the adapter or load it into the model it was trained on"
                )
        saved_values, saved_indices = state_dict[keys["values"]], state_dict[keys["indices"]]
        expected = self.values[adapter_name].shape
        if saved_values.shape != expected or saved_indices.shape != expected:
            raise ValueError(
                f"adapter entry for {where} holds {tuple(saved_values.shape)} values but this base layer of shape "
                f"{self.shape} expects {tuple(expected)}: the adapter was trained on a base model with other layer "
                f"shapes (or another rank/density). Load it into the base model it was trained on."
            )
        self._check_positions(saved_indices, where)
        self._resize_frozen(module_key, adapter_name, state_dict)

    def _check_positions(self, positions: torch.Tensor, where: str) -> None:
        if positions.dtype.is_floating_point:
            raise ValueError(f"adapter indices for {where} are stored as {positions.dtype}; they must be integers")
        if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= self.numel):
            raise ValueError(
                f"adapter indices for {where} point outside its weight of shape {self.shape}: the adapter was "
                f"trained on a base model with other layer shapes; load it into the base model it was trained on"
            )

    def _resize_frozen(self, module_key: str, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
        p = self.prefix
        vkey = f"{module_key}.{p}frozen_values.{adapter_name}".lstrip(".")
        ikey = f"{module_key}.{p}frozen_indices.{adapter_name}".lstrip(".")
        if vkey not in state_dict and ikey not in state_dict:
            return
        if vkey not in state_dict or ikey not in state_dict or state_dict[vkey].shape != state_dict[ikey].shape:
            raise ValueError(f"adapter checkpoint for {module_key}: frozen values and indices do not match")
        self._check_positions(state_dict[ikey], module_key)
        current = self.frozen_values[adapter_name]
        self.frozen_values[adapter_name] = torch.zeros(
            state_dict[vkey].shape, dtype=current.dtype, device=current.device
        )
        self.frozen_indices[adapter_name] = torch.zeros(
            state_dict[ikey].shape, dtype=self.indices[adapter_name].dtype, device=current.device
        )
