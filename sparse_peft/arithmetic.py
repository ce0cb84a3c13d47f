"""Arithmetic on entry-sparse adapters: weighted sums, sparse model soups, TIES and DARE merging.

An entry-sparse adapter (LIFT, SpIEL, diff pruning after its projection) stores, for each adapted matrix ``W`` of
shape ``(m, n)``, a sparse update ``ΔW = Σ_{p∈P} v_p·e_p`` on a support ``P`` of flat row-major positions. Adapters
of one base model add like vectors (Ansell et al., ACL 2022, "Composable Sparse Fine-Tuning for Cross-Lingual
Transfer"), layer by layer::

    ΔW = Σ_i w_i·ΔW_i,        support P = ∪_i P_i,        v_p = Σ_{i: p∈P_i} w_i·v_{i,p}

and the result is again a sparse adapter of the same method. :func:`add_weighted_sparse_adapter` adds it to the
model under a new name (as PEFT's ``add_weighted_adapter`` does for LoRA): it can be activated, merged, trained
further, saved with ``save_pretrained`` and loaded with ``PeftModel.from_pretrained`` like any other adapter.

**Composable sparse fine-tuning**, the recipe (``lang`` and ``task`` trained on copies of one base model)::

    import sparse_peft
    from peft import PeftModel

    from sparse_peft import add_weighted_sparse_adapter

    # 1. a "language" adapter: causal-LM loss on unlabelled text of the target language
    #    get_peft_model(base, sparse_peft.LiftConfig(r=16)), train, save_pretrained("lang")
    # 2. a "task" adapter: the task's labelled data (in a source language), trained the same way -> "task"
    # 3. both on one base, added entry by entry
    model = PeftModel.from_pretrained(base, "lang", adapter_name="lang")
    model.load_adapter("task", adapter_name="task")
    add_weighted_sparse_adapter(model, ["lang", "task"], [1.0, 1.0], "lang_task")
    model.set_adapter("lang_task")                         # or merge_and_unload(adapter_names=["lang_task"])
    model.save_pretrained("out", selected_adapters=["lang_task"])   # written to out/lang_task

Where supports overlap the values add, and adapters can interfere there (LIFT's masks, chosen from the base
weight's principal components, overlap much); :func:`combine_deltas` also offers TIES and DARE for such adapters,
and :func:`add_sparse_soup` averages adapters that share one mask (sparse model soups, Zimmer et al., ICLR 2024).

**How a combined adapter is stored.** Its support per layer (the union) is usually larger than the budget ``k`` of
the method's config, and differs from layer to layer. The combined adapter keeps the config of the first input, so
its trainable ``values`` keep ``k`` slots per layer (the ``k`` largest ``|v_p|``), and the remaining entries go to the
layer's frozen part (``frozen_values`` / ``frozen_indices``, the part LIFT fills with retired entries), whose size per
module the config records in ``frozen_counts``. That is what the existing loader reads: ``PeftModel.from_pretrained``
allocates ``k`` values from the config (the method's budget; diff pruning's ``projected_counts``) and
``frozen_counts[module]`` frozen entries (``prepare_load`` also sizes the frozen part from the file), so the adapter
loads back with no new format. A layer whose combination has fewer than ``k`` entries fills the free slots with zeros.

Everything here works on one model holding all inputs as adapters (a ``PeftModel`` holds adapters of one method):
load them with ``load_adapter``. :func:`combine_deltas` and :func:`soup_deltas` also work on plain dictionaries of
:class:`SparseDelta` (:func:`adapter_deltas` makes them from a model), e.g. from two models, and check that their
layers and shapes agree.
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .tuners.base import loading_checkpoint
from .tuners.sparse_delta import SparseDeltaLinear

#: Methods whose adapters are entry-sparse deltas and nothing else, with the names used in messages.
SUPPORTED_METHODS: dict[str, str] = {"lift": "LIFT", "spiel": "SpIEL", "diff_pruning": "diff pruning (projected)"}
COMBINATION_TYPES = ("linear", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")


@dataclass(frozen=True)
class SparseDelta:
    """``ΔW = scatter(values, positions)`` of one ``(out, in)`` matrix: int64 flat row-major ``positions``, sorted
    and unique, and float32 ``values`` of the same length. Build it with :meth:`from_entries` (which coalesces)."""

    positions: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]

    @classmethod
    def from_entries(cls, positions: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> SparseDelta:
        """The coalesced delta of possibly repeated entries: ``v_p = Σ`` of the values given at ``p``."""
        positions, values = positions.detach().long().cpu().flatten(), values.detach().float().cpu().flatten()
        numel = shape[0] * shape[1]
        if positions.numel() != values.numel():
            raise ValueError(f"{positions.numel()} positions but {values.numel()} values")
        if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= numel):
            raise ValueError(f"positions outside a matrix of shape {tuple(shape)}")
        unique, inverse = torch.unique(positions, return_inverse=True)
        summed = torch.zeros(unique.numel()).index_add_(0, inverse, values)
        return cls(unique, summed, (int(shape[0]), int(shape[1])))

    @classmethod
    def from_dense(cls, dense: torch.Tensor) -> SparseDelta:
        """The non-zero entries of a dense ``(out, in)`` matrix."""
        flat = dense.detach().reshape(-1)
        positions = flat.nonzero().flatten()
        return cls.from_entries(positions, flat[positions], tuple(dense.shape))

    @property
    def nnz(self) -> int:
        """Number of stored entries (zeros included when stored)."""
        return self.positions.numel()

    def to_dense(self) -> torch.Tensor:
        flat = torch.zeros(self.shape[0] * self.shape[1])
        flat[self.positions] = self.values
        return flat.view(self.shape)


# ---- one layer: the formulas -------------------------------------------------------------------------------------
def _label(labels: Optional[Sequence[str]], i: int) -> str:
    return repr(labels[i]) if labels is not None else f"#{i}"


def _check_shapes(deltas: Sequence[SparseDelta], where: str, labels: Optional[Sequence[str]]) -> None:
    """All deltas of one layer must have one shape; otherwise the adapters belong to different bases."""
    if not deltas:
        raise ValueError("nothing to combine: pass at least one adapter")
    for i, delta in enumerate(deltas[1:], start=1):
        if delta.shape != deltas[0].shape:
            raise ValueError(
                f"layer {where or '?'}: adapter {_label(labels, 0)} has shape {deltas[0].shape} but adapter "
                f"{_label(labels, i)} has {delta.shape}: they were trained on different base models (or layer "
                f"shapes). Combine adapters of one base model."
            )


def _aligned(deltas: Sequence[SparseDelta]) -> tuple[torch.Tensor, torch.Tensor]:
    """The union support ``U = ∪_i P_i`` (sorted) and the ``(n_adapters, |U|)`` matrix of values on it (0 off P_i)."""
    union = torch.unique(torch.cat([d.positions for d in deltas]))
    stacked = torch.zeros(len(deltas), union.numel())
    for i, delta in enumerate(deltas):
        stacked[i, torch.searchsorted(union, delta.positions)] = delta.values
    return union, stacked


def _weights(weights: Sequence[float], n: int) -> torch.Tensor:
    if len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} adapters; pass one weight per adapter")
    tensor = torch.tensor([float(w) for w in weights])
    if not torch.isfinite(tensor).all():
        raise ValueError(f"weights must be finite, got {list(weights)}")
    return tensor


def weighted_sum(
    deltas: Sequence[SparseDelta], weights: Sequence[float], *, where: str = "", labels: Optional[Sequence[str]] = None
) -> SparseDelta:
    """``Σ_i w_i·ΔW_i`` on the union of the supports: ``v_p = Σ_{i: p∈P_i} w_i·v_{i,p}`` for ``p ∈ ∪_i P_i`` (an entry
    whose terms cancel stays in the support with value 0)."""
    _check_shapes(deltas, where, labels)
    union, stacked = _aligned(deltas)
    return SparseDelta(union, _weights(weights, len(deltas)) @ stacked, deltas[0].shape)


def sparse_soup(
    deltas: Sequence[SparseDelta], *, union: bool = False, where: str = "", labels: Optional[Sequence[str]] = None
) -> SparseDelta:
    """The uniform soup ``(1/N)·Σ_i ΔW_i`` of adapters that share one support ``P_1 = … = P_N`` (same mask: the
    average of the values). With ``union=True`` the supports may differ and an entry missing from an adapter counts
    as 0 there (``Σ_i ΔW_i / N`` on ``∪_i P_i``). Raises a ``ValueError`` naming the layer when masks differ."""
    _check_shapes(deltas, where, labels)
    if not union:
        for i, delta in enumerate(deltas[1:], start=1):
            if not torch.equal(delta.positions, deltas[0].positions):
                outside = int((~torch.isin(delta.positions, deltas[0].positions)).sum())
                raise ValueError(
                    f"layer {where or '?'}: the masks differ (adapter {_label(labels, i)} stores {delta.nnz} entries, "
                    f"{outside} of them outside the {deltas[0].nnz} of adapter {_label(labels, 0)}). A sparse soup "
                    f"averages adapters that share one mask; pass union=True to average on the union of the masks."
                )
    return weighted_sum(deltas, [1.0 / len(deltas)] * len(deltas), where=where, labels=labels)


def trim(delta: SparseDelta, density: float) -> SparseDelta:
    """TIES' trim: keep the ``max(1, round(density·|P|))`` entries of largest ``|v_p|`` (ties: lower position first).

    ``density`` is relative to the entries the adapter stores in this layer (a sparse adapter is already sparse
    relative to the matrix)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    keep = min(delta.nnz, max(1, round(density * delta.nnz)))
    order = torch.sort(delta.values.abs(), descending=True, stable=True).indices[:keep]
    kept = torch.sort(order).values
    return SparseDelta(delta.positions[kept], delta.values[kept], delta.shape)


def elect_sign(weighted: torch.Tensor, method: str = "total") -> torch.Tensor:
    """TIES' sign election over the rows of ``weighted`` (``w_i·v_{i,p}``, one row per adapter): ``γ_p =
    sign(Σ_i w_i·v_{i,p})`` (``"total"``: the sign with more mass) or ``sign(Σ_i sign(w_i·v_{i,p}))``
    (``"frequency"``: the sign of more adapters)."""
    if method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}, got {method!r}")
    return torch.sign(weighted.sum(0) if method == "total" else torch.sign(weighted).sum(0))


def disjoint_mean(weighted: torch.Tensor, sign: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES' disjoint merge: ``v_p = Σ_{i∈A_p} w_i·v_{i,p} / |A_p|`` with ``A_p = {i : sign(w_i·v_{i,p}) = γ_p ≠ 0}``;
    returns the values and the mask of positions with ``A_p ≠ ∅`` (the others leave the support)."""
    agree = (torch.sign(weighted) == sign) & (weighted != 0)
    count = agree.sum(0)
    return (weighted * agree).sum(0) / count.clamp(min=1), count > 0


def ties_merge(
    deltas: Sequence[SparseDelta],
    weights: Sequence[float],
    density: Optional[float] = None,
    *,
    majority_sign_method: str = "total",
    where: str = "",
    labels: Optional[Sequence[str]] = None,
) -> SparseDelta:
    """TIES merging (Yadav et al., NeurIPS 2023) of sparse deltas: trim each ``ΔW_i`` to ``density`` of its entries
    (:func:`trim`; ``None`` keeps all), weight, elect a sign per entry (:func:`elect_sign`) and take the disjoint mean
    (:func:`disjoint_mean`). The support is where some adapter agrees with the elected sign."""
    _check_shapes(deltas, where, labels)
    trimmed = [trim(d, density) for d in deltas] if density is not None else list(deltas)
    union, stacked = _aligned(trimmed)
    weighted = _weights(weights, len(deltas))[:, None] * stacked
    values, kept = disjoint_mean(weighted, elect_sign(weighted, majority_sign_method))
    return SparseDelta(union[kept], values[kept], deltas[0].shape)


def dare_drop(delta: SparseDelta, drop_rate: float, generator: torch.Generator) -> SparseDelta:
    """DARE (Yu et al., ICML 2024) on one delta: drop each entry with probability ``p`` and rescale the survivors,
    ``v_p ← m_p·v_p / (1 − p)`` with ``m_p ~ Bernoulli(1 − p)`` (``m_p = [u_p ≥ p]``, ``u_p ~ U[0, 1)`` from
    ``generator``, one draw per stored entry in position order), so ``E[ΔW]`` is unchanged."""
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
    keep = torch.rand(delta.nnz, generator=generator) >= drop_rate
    return SparseDelta(delta.positions[keep], delta.values[keep] / (1.0 - drop_rate), delta.shape)


def dare_merge(
    deltas: Sequence[SparseDelta],
    weights: Sequence[float],
    drop_rate: float,
    generators: Sequence[torch.Generator],
    *,
    ties: bool = False,
    majority_sign_method: str = "total",
    where: str = "",
    labels: Optional[Sequence[str]] = None,
) -> SparseDelta:
    """DARE: :func:`dare_drop` on each ``ΔW_i`` (with ``generators[i]``), then the weighted sum (``dare_linear``) or,
    with ``ties``, TIES' sign election and disjoint mean without the trim (``dare_ties``)."""
    _check_shapes(deltas, where, labels)
    dropped = [dare_drop(d, drop_rate, g) for d, g in zip(deltas, generators, strict=True)]
    if ties:
        return ties_merge(dropped, weights, None, majority_sign_method=majority_sign_method, where=where, labels=labels)
    return weighted_sum(dropped, weights, where=where, labels=labels)


def dare_generator(seed: int, where: str, index: int) -> torch.Generator:
    """The CPU generator DARE uses for adapter ``index`` in layer ``where``: seeded with ``seed + crc32(where#index)``,
    so every layer and adapter draws its own stream, the same on every run and device."""
    return torch.Generator().manual_seed((seed + zlib.crc32(f"{where}#{index}".encode())) % 2**63)


# ---- many layers ---------------------------------------------------------------------------------------------------
def _layerwise(
    deltas: Mapping[str, Mapping[str, SparseDelta]], combine: Callable[[str, list[SparseDelta]], SparseDelta]
) -> dict[str, SparseDelta]:
    """``combine(layer, [ΔW_i of that layer])`` for every layer; every adapter must cover the same layers."""
    labels = list(deltas)
    if not labels:
        raise ValueError("nothing to combine: pass at least one adapter")
    layers = list(deltas[labels[0]])
    for label in labels[1:]:
        missing = [layer for layer in layers if layer not in deltas[label]]
        extra = [layer for layer in deltas[label] if layer not in deltas[labels[0]]]
        if missing or extra:
            layer, lacking, holder = (missing[0], label, labels[0]) if missing else (extra[0], labels[0], label)
            raise ValueError(
                f"layer {layer}: adapter {holder!r} adapts it but adapter {lacking!r} does not (the adapters target "
                f"different modules, or were trained on different base models). Combine adapters with the same "
                f"target modules of one base model."
            )
    return {layer: combine(layer, [deltas[label][layer] for label in labels]) for layer in layers}


def combine_deltas(
    deltas: Mapping[str, Mapping[str, SparseDelta]],
    weights: Sequence[float],
    combination_type: str = "linear",
    *,
    density: Optional[float] = None,
    drop_rate: Optional[float] = None,
    seed: int = 0,
    majority_sign_method: str = "total",
) -> dict[str, SparseDelta]:
    """Combine adapters layer by layer; ``deltas`` maps adapter name → layer name → :class:`SparseDelta`.

    ``combination_type``: ``"linear"`` (:func:`weighted_sum`), ``"ties"`` (:func:`ties_merge` with ``density``),
    ``"dare_linear"`` / ``"dare_ties"`` (:func:`dare_merge` with ``drop_rate``, seeded by :func:`dare_generator`).
    Raises a ``ValueError`` naming the layer when the adapters cover different layers or shapes.
    """
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"combination_type must be one of {COMBINATION_TYPES}, got {combination_type!r}")
    if combination_type == "ties" and density is None:
        raise ValueError("combination_type='ties' needs density (the fraction of each adapter's entries to keep)")
    if combination_type.startswith("dare") and drop_rate is None:
        raise ValueError(f"combination_type={combination_type!r} needs drop_rate (the probability to drop an entry)")
    labels = list(deltas)
    _weights(weights, len(labels))

    def combine(layer: str, parts: list[SparseDelta]) -> SparseDelta:
        if combination_type == "linear":
            return weighted_sum(parts, weights, where=layer, labels=labels)
        if combination_type == "ties":
            sign = majority_sign_method
            return ties_merge(parts, weights, density, majority_sign_method=sign, where=layer, labels=labels)
        generators = [dare_generator(seed, layer, i) for i in range(len(parts))]
        ties, sign = combination_type == "dare_ties", majority_sign_method
        return dare_merge(
            parts, weights, drop_rate, generators, ties=ties, majority_sign_method=sign, where=layer, labels=labels
        )

    return _layerwise(deltas, combine)


def soup_deltas(deltas: Mapping[str, Mapping[str, SparseDelta]], *, union: bool = False) -> dict[str, SparseDelta]:
    """:func:`sparse_soup` of the adapters in ``deltas`` (adapter name → layer name → delta), layer by layer."""
    labels = list(deltas)
    return _layerwise(deltas, lambda layer, parts: sparse_soup(parts, union=union, where=layer, labels=labels))


# ---- the model -----------------------------------------------------------------------------------------------------
def _entry_layers(model: nn.Module) -> list[SparseDeltaLinear]:
    return [m for m in model.modules() if isinstance(m, SparseDeltaLinear)]


def _check_adapter(model: nn.Module, adapter_name: str) -> None:
    """The adapter exists, is of a supported method and holds nothing besides its sparse deltas."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or adapter_name not in configs:
        known = sorted(configs) if isinstance(configs, dict) else []
        raise ValueError(f"the model has no adapter {adapter_name!r} (it has {known}); load it with load_adapter")
    config = configs[adapter_name]
    method = getattr(config, "method", None)
    if method not in SUPPORTED_METHODS:
        peft_type = getattr(config.peft_type, "value", config.peft_type)
        what = f"method {method!r}" if method else "a method that is not a sparse_peft method"
        raise ValueError(
            f"adapter {adapter_name!r} is a {peft_type} adapter ({what}); sparse adapter arithmetic combines the "
            f"entry-sparse methods {', '.join(SUPPORTED_METHODS.values())} (config method "
            f"{', '.join(repr(m) for m in SUPPORTED_METHODS)}). RoSA adds a LoRA part and the structured and "
            f"low-rank methods have no entries to add; for LoRA adapters use PEFT's add_weighted_adapter."
        )
    extras = {
        "modules_to_save": getattr(config, "modules_to_save", None),
        "trainable_token_indices": getattr(config, "trainable_token_indices", None),
        "bias": None if getattr(config, "bias", "none") == "none" else config.bias,
    }
    trained = {k: v for k, v in extras.items() if v}
    if trained:
        raise ValueError(
            f"adapter {adapter_name!r} also trains {trained}; sparse adapter arithmetic combines only the sparse "
            f"deltas, so the combination would silently drop these. Combine adapters without them."
        )


def _check_same_base(model: nn.Module, adapters: Sequence[str]) -> None:
    bases = {name: getattr(model.peft_config[name], "base_model_name_or_path", None) for name in adapters}
    known = {name: base for name, base in bases.items() if base}
    if len(set(known.values())) > 1:
        raise ValueError(
            f"the adapters were trained on different base models: {known}. Sparse deltas of different bases do not "
            f"add up to anything meaningful; combine adapters of one base model."
        )


def adapter_deltas(model: nn.Module, adapter_name: str) -> dict[str, SparseDelta]:
    """The sparse ``ΔW`` of ``adapter_name`` per adapted layer (keyed by the layer's module name), coalesced: the
    active entries plus the frozen ones, summed where a position is stored twice (a LIFT entry retired, then chosen
    again)."""
    _check_adapter(model, adapter_name)
    result = {}
    for layer in _entry_layers(model):
        if adapter_name not in layer.adapter_configs:
            continue
        if adapter_name not in layer.values:
            raise ValueError(
                f"layer {layer.module_name}: adapter {adapter_name!r} has no sparse entries yet (diff pruning before "
                f"its projection trains a dense diff); run the projection first (projection_step, or "
                f"model.base_model.project('{adapter_name}'))."
            )
        values, indices, _ = layer.delta_tensors(adapter_name)
        result[layer.module_name] = SparseDelta.from_entries(indices, values, layer.shape)
    return result


def add_sparse_adapter(model: nn.Module, adapter_name: str, deltas: Mapping[str, SparseDelta], like: str) -> None:
    """Add ``deltas`` (layer name → delta) to ``model`` as adapter ``adapter_name`` with a copy of the config of
    adapter ``like``; each layer's entries go in through ``SparseDeltaLinear.set_delta`` (``k`` trainable slots, the
    rest frozen, sizes in ``frozen_counts``; see the module docstring). No selection runs. The adapter is not made
    active (PEFT's convention: ``model.set_adapter(adapter_name)``)."""
    _check_adapter(model, like)
    if adapter_name in model.peft_config:
        raise ValueError(f"the model already has an adapter named {adapter_name!r}; pick another name")
    config = copy.deepcopy(model.peft_config[like])
    config.frozen_counts = {}
    with loading_checkpoint():  # placeholder positions, no selection (set_delta writes the real ones)
        model.add_adapter(adapter_name, config)
    layers = {layer.module_name: layer for layer in _entry_layers(model) if adapter_name in layer.values}
    try:
        _check_layers(layers, deltas, adapter_name)
        for name, layer in layers.items():
            layer.set_delta(adapter_name, deltas[name].positions, deltas[name].values)
    except Exception:
        model.delete_adapter(adapter_name)
        raise


def _check_layers(layers: Mapping[str, SparseDeltaLinear], deltas: Mapping[str, SparseDelta], adapter: str) -> None:
    mismatched = sorted(set(layers) ^ set(deltas))
    if mismatched:
        name = mismatched[0]
        holder = "its config targets it but no delta is given" if name in layers else "a delta is given, no target"
        raise ValueError(f"layer {name}: {holder}; adapter {adapter!r} was not added")
    for name, layer in layers.items():
        if deltas[name].shape != layer.shape:
            raise ValueError(
                f"layer {name} has shape {layer.shape} but its delta has shape {deltas[name].shape}: the delta "
                f"belongs to another base model; adapter {adapter!r} was not added"
            )


def add_weighted_sparse_adapter(
    model: nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "linear",
    *,
    density: Optional[float] = None,
    drop_rate: Optional[float] = None,
    seed: int = 0,
    majority_sign_method: str = "total",
) -> None:
    """Add ``Σ_i w_i·ΔW_i`` of the entry-sparse ``adapters`` as a new adapter ``adapter_name`` (PEFT's
    ``add_weighted_adapter`` for sparse deltas).

    ``combination_type="linear"``: on the union of the supports, ``v_p = Σ_{i: p∈P_i} w_i·v_{i,p}``, so merging the
    new adapter gives ``W + Σ_i w_i·ΔW_i`` exactly. ``"ties"`` (with ``density``), ``"dare_linear"`` and
    ``"dare_ties"`` (with ``drop_rate`` and ``seed``): see :func:`combine_deltas`. The result takes the config of
    ``adapters[0]``; it is stored and loaded as the module docstring says.

    Raises a ``ValueError`` for adapters of an unsupported method (naming it and the supported ones), of different
    base models, covering different layers or shapes (naming the layer), or diff pruning before its projection.
    """
    deltas = _collect(model, adapters)
    combined = combine_deltas(
        deltas,
        weights,
        combination_type,
        density=density,
        drop_rate=drop_rate,
        seed=seed,
        majority_sign_method=majority_sign_method,
    )
    add_sparse_adapter(model, adapter_name, combined, like=adapters[0])


def add_sparse_soup(model: nn.Module, adapters: Sequence[str], adapter_name: str, *, union: bool = False) -> None:
    """Add the sparse model soup ``(1/N)·Σ_i ΔW_i`` of ``adapters`` as adapter ``adapter_name``: the average of
    adapters that share one mask (e.g. fine-tuned from one selection with different seeds or data orders). Raises a
    ``ValueError`` naming the first layer whose masks differ, unless ``union=True`` (then the average on the union,
    missing entries counting as 0)."""
    add_sparse_adapter(model, adapter_name, soup_deltas(_collect(model, adapters), union=union), like=adapters[0])


def _collect(model: nn.Module, adapters: Sequence[str]) -> dict[str, dict[str, SparseDelta]]:
    if not adapters:
        raise ValueError("nothing to combine: pass at least one adapter")
    if len(set(adapters)) != len(adapters):
        raise ValueError(f"adapters must be distinct, got {list(adapters)}")
    for name in adapters:
        _check_adapter(model, name)
    _check_same_base(model, adapters)
    return {name: adapter_deltas(model, name) for name in adapters}
