"""What every sparse_peft PEFT layer shares: the bookkeeping around a base ``nn.Linear``, and the PEFT conventions
for forward, merge and unmerge.

Each method's layer (:class:`~sparse_peft.tuners.sparse_delta.SparseDeltaLinear` and its subclasses, SNELL, SMT,
S²FT, and :class:`~sparse_peft.tuners.recompute_layer.WeightRecomputeLayer` for LoRS and SPP) subclasses
:class:`SparseLayerBase` and keeps only its own formula: its storage, its forward term, and what its merge writes
into the weight and keeps for unmerge.
"""

from __future__ import annotations

import functools
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from peft.utils import resolve_quantization_backend
from torch import nn


@dataclass
class StorageReport:
    """What one adapter of one layer stores (what ``save_pretrained`` writes for it).

    ``tensors``: ``name -> (elements, bytes, dtype)`` of every per-adapter tensor; ``entries``: elements of its
    floating-point tensors (values, factors, blocks, gates: the learned numbers); ``bytes``: all tensors' bytes,
    index buffers included.
    """

    tensors: dict[str, tuple[int, int, str]] = field(default_factory=dict)

    @property
    def entries(self) -> int:
        return sum(n for n, _, dtype in self.tensors.values() if _is_float(dtype))

    @property
    def bytes(self) -> int:
        return sum(b for _, b, _ in self.tensors.values())

    def __add__(self, other: StorageReport) -> StorageReport:
        merged = dict(self.tensors)
        for name, (n, b, dtype) in other.tensors.items():
            old = merged.get(name, (0, 0, dtype))
            merged[name] = (old[0] + n, old[1] + b, dtype)
        return StorageReport(merged)


class AdapterStore:
    """``blocks = AdapterStore("blocks")`` on a layer class: the layer's per-adapter container ``<prefix>blocks``
    (PEFT's naming, which its save/load and ``delete_adapter`` rely on) under its short name."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, layer: Any, owner: Any = None) -> Any:
        return self if layer is None else getattr(layer, f"{layer.prefix}{self.name}")


def _is_float(dtype: str) -> bool:
    return getattr(torch, dtype.removeprefix("torch."), torch.int8).is_floating_point


class SparseLayerBase(nn.Module, BaseTunerLayer):
    """Base of the sparse_peft layers wrapping one linear ``base_layer``.

    Subclasses create their per-adapter containers after ``super().__init__(base_layer, module_name)``, then set
    ``self._active_adapter`` and call ``self.update_layer`` for the first adapter. They list in ``_adapter_state``
    the attributes holding per-adapter side state (dicts keyed by adapter name, or sets of names) that
    :meth:`delete_adapter` must clear besides PEFT's ``adapter_layer_names`` / ``other_param_names``.

    The protocol every layer answers (:mod:`sparse_peft.callbacks` calls it on every layer, no duck typing):

    * schedule hooks :meth:`on_step_begin`, :meth:`on_pre_optimizer_step`, :meth:`on_step_end` (no-ops for static
      methods);
    * :meth:`export_state` / :meth:`import_state`: open statistics windows and selector state as tensors, written
      to the checkpoint's side file so that a resume inside a window is exact;
    * :meth:`storage_report`: what an adapter really stores, by tensor.
    """

    prefix: str = "sparse_peft_"
    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()
    _adapter_state: tuple[str, ...] = ("adapter_configs", "_merge_originals")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass's own ``get_delta_weight`` gets the check of :func:`_names_missing_adapter`."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("get_delta_weight")
        if own is not None and not getattr(own, "_checks_adapter", False):
            cls.get_delta_weight = _names_missing_adapter(own)

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        super().__init__()
        self.base_layer = base_layer
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.module_name = module_name
        self.adapter_configs: dict[str, Any] = {}
        self._merge_originals: dict[str, Any] = {}  # per merged adapter: what unmerge writes back
        self.quantization_backend = resolve_quantization_backend(self.get_base_layer())
        self.in_features, self.out_features = _get_in_out_features(self.get_base_layer())

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)``, the shape of the base weight."""
        return (self.out_features, self.in_features)

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    def module_seed(self, seed: int) -> int:
        """``seed + crc32(module name)``: the same on every rank and every run, different between modules (so
        same-shaped layers do not start from identical random draws)."""
        return seed + zlib.crc32(self.module_name.encode())

    def _weight_device(self) -> torch.device:
        """Where new adapter tensors go: the base weight's device (CPU when the base layer has no ``weight``)."""
        weight = getattr(self.get_base_layer(), "weight", None)
        return weight.device if weight is not None else torch.device("cpu")

    # ---- forward -----------------------------------------------------------------------------------------------
    def _adapters_off(self) -> bool:
        """True when adapters are disabled; merged adapters are unmerged first (PEFT's convention)."""
        if self.disable_adapters and self.merged:
            self.unmerge()
        return self.disable_adapters

    def _active_in(self, store: Any) -> list[str]:
        """The active adapters that ``store`` (a per-adapter container) holds, in activation order."""
        return [name for name in self.active_adapters if name in store]

    def _base_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, bool]:
        """The base layer's output and whether it is final (adapters disabled, or merged into the weight).

        When it is not final, the output is safe to add adapter terms to (quantized backends may hand back a tensor
        that must be cloned first).
        """
        off = self._adapters_off()
        result = self.base_layer(x, *args, **kwargs)
        if off or self.merged:
            return result, True
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        return result, False

    # ---- merge / unmerge ---------------------------------------------------------------------------------------
    def _adapters_to_merge(
        self, adapter_names: Optional[list[str]], keep: Optional[Callable[[str], bool]] = None
    ) -> list[str]:
        """PEFT's ``check_adapters_to_merge`` (restricted to the names ``keep`` accepts, if given), warning once when
        merging into a quantized base, which re-quantizes the weight."""
        names = check_adapters_to_merge(self, adapter_names)
        if keep is not None:
            names = [name for name in names if keep(name)]
        if self.quantization_backend is not None and names:
            self._warn_lossy_merge(stacklevel=4)
        return names

    def _warn_lossy_merge(self, stacklevel: int = 3) -> None:
        """Warn that merging into this (quantized) base is lossy; ``stacklevel`` 3 points at ``merge``'s caller."""
        warnings.warn(
            f"merging into the quantized base of {self.module_name or type(self.get_base_layer()).__name__} "
            f"re-quantizes the weight and is lossy; merge into a dequantized copy of the model instead",
            UserWarning,
            stacklevel=stacklevel,
        )

    def _check_merged(self, merged: torch.Tensor, adapter_name: str, safe_merge: bool) -> None:
        """``safe_merge``: refuse a merged weight with non-finite entries."""
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(
                f"NaNs detected in the merged weights of {self.module_name}; adapter {adapter_name} is broken"
            )

    def _commit_merge(self, adapter_name: str, merged: torch.Tensor, safe_merge: bool, original: Any) -> None:
        """Write ``merged`` as the base weight (after the ``safe_merge`` check), keeping ``original`` (what
        :meth:`unmerge` restores: the replaced entries, slices or blocks) under the adapter's name."""
        self._check_merged(merged, adapter_name, safe_merge)
        self._merge_originals[adapter_name] = original
        self.set_base_weight(merged)
        self.merged_adapters.append(adapter_name)

    def _saved_merges(self) -> Iterator[tuple[str, Any]]:
        """``(adapter, what its merge kept)``, last merged first, for the adapters merged by :meth:`_commit_merge`."""
        for name in self._unmerge_order():
            original = self._merge_originals.pop(name, None)
            if original is not None:
                yield name, original

    def _nothing_to_unmerge(self, stacklevel: int = 3) -> bool:
        """True (after PEFT's warning) when no adapter is merged; ``stacklevel`` 3 points at ``unmerge``'s caller."""
        if self.merged:
            return False
        warnings.warn("Already unmerged. Nothing to do.", stacklevel=stacklevel)
        return True

    def _unmerge_order(self) -> Iterator[str]:
        """The merged adapters, last merged first, each removed from ``merged_adapters`` as it is yielded."""
        if self._nothing_to_unmerge(stacklevel=4):
            return
        while self.merged_adapters:
            yield self.merged_adapters.pop()

    # ---- schedule hooks: driven by SparsePeftCallback, or in a custom loop by begin_step / before_optimizer_step /
    # refresh_masks; ``step`` is 1-based ----------------------------------------------------------------------------
    def on_step_begin(self, adapter_name: str, step: int, context: Any = None) -> None:
        """Called before optimizer step ``step`` runs its forward/backward passes."""

    def on_pre_optimizer_step(self, adapter_name: str, context: Any = None) -> None:
        """Called after gradients are final (accumulated, all-reduced, clipped), before the optimizer step."""

    def on_step_end(self, adapter_name: str, step: int, optimizer: Any = None, context: Any = None) -> int:
        """Called after optimizer step ``step``; returns how many slots (entries, blocks) moved."""
        return 0

    # ---- state of open windows, as tensors -------------------------------------------------------------------------
    def export_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The tensors a resume needs to continue ``adapter_name``'s open statistics window exactly (``{}`` when none
        is open). Scalars are 0-d tensors."""
        return {}

    def import_state(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`export_state` returned (on this layer's device)."""
        if tensors:
            raise ValueError(
                f"{type(self).__name__} keeps no window state, but the checkpoint holds {sorted(tensors)} for "
                f"adapter {adapter_name!r} of {self.module_name}: resume with the adapter config the checkpoint was "
                f"trained with"
            )

    # ---- storage -----------------------------------------------------------------------------------------------
    def storage_report(self, adapter_name: str) -> StorageReport:
        """Every per-adapter tensor of ``adapter_name`` (PEFT's ``adapter_layer_names`` and ``other_param_names``)."""
        tensors = {}
        for attr in (*self.adapter_layer_names, *self.other_param_names):
            store = getattr(self, attr, None)
            tensor = store[adapter_name] if store is not None and adapter_name in store else None
            if isinstance(tensor, torch.Tensor):
                size = tensor.numel()
                tensors[attr.removeprefix(self.prefix)] = (size, size * tensor.element_size(), str(tensor.dtype))
        return StorageReport(tensors)

    # ---- adapter lifecycle -------------------------------------------------------------------------------------
    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for attr in self._adapter_state:
            store = getattr(self, attr)
            if isinstance(store, set):
                store.discard(adapter_name)
            else:
                store.pop(adapter_name, None)

    # ---- LoRA conversion (``peft.tuners.lora.conversion.convert_to_lora``) ---------------------------------------
    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """True: every sparse_peft layer is additive, ``W' = W + ΔW`` with ``ΔW = get_delta_weight(adapter)`` dense.

        PEFT's ``convert_to_lora`` factors ``ΔW ≈ B·A`` by a truncated SVD (``B = U_r Σ_r``, ``A = V_rᵀ``), the best
        rank-``r`` approximation (Eckart–Young), with relative error ``‖ΔW − B·A‖_F / ‖ΔW‖_F = sqrt(Σ_{i>r} σ_i² /
        Σ_i σ_i²)``: exact from ``r = rank(ΔW)`` on, while a sparse ``ΔW`` is often of high rank.

        Every method has such a ``ΔW``: the entry-sparse ``scatter(values)`` (LIFT, SpIEL, diff pruning after its
        projection; ``s·B·A + S`` for RoSA), diff pruning's ``z̄ ⊙ w`` before it, SMT's blocks and S²FT's slices,
        SNELL's sparsified kernel update, LoRS's ``(s·B·A) ⊙ M`` and SPP's ``W̃ ⊙ (s·β·α̂)`` (``W' = W̃ ⊙ (1 + s·β·α̂)
        = W̃ + W̃ ⊙ s·β·α̂``; these two depend on the base, so the LoRA holds for this base only, as every adapter
        does). Like PEFT's own layers this answers for the layer type (PEFT's ``BaseTuner.supports_lora_conversion``
        passes no adapter name); a layer that does not hold the adapter being converted raises in
        ``get_delta_weight``, naming the layer.
        """
        return True

    def __repr__(self) -> str:
        return f"{self.prefix.rstrip('_')}.{super().__repr__()}"


def _names_missing_adapter(get_delta_weight: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Wrap a layer's ``get_delta_weight`` so that an adapter this layer does not hold raises a ``ValueError`` naming
    the layer and the adapters it holds (instead of a bare ``KeyError``), e.g. in ``convert_to_lora`` on a model
    whose adapters target different modules."""

    @functools.wraps(get_delta_weight)
    def checked(self: SparseLayerBase, adapter_name: str, *args: Any, **kwargs: Any) -> torch.Tensor:
        if adapter_name not in self.adapter_configs:
            raise ValueError(
                f"layer {self.module_name or type(self).__name__} holds no adapter {adapter_name!r} (it holds "
                f"{sorted(self.adapter_configs)}): this model's adapters target different modules. For "
                f"convert_to_lora, load the adapter alone (PeftModel.from_pretrained of its folder) and convert that."
            )
        return get_delta_weight(self, adapter_name, *args, **kwargs)

    checked._checks_adapter = True  # type: ignore[attr-defined]
    return checked
