"""The S²FT layer: trainable whole rows (V heads, up channels) or columns (O heads, down channels) of a matrix."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from ...sparse.slices import col_slice_matmul, row_slice_matmul
from ...sparse.stats import Window, calibrating
from ..base import from_checkpoint
from ..layer_base import AdapterStore, SparseLayerBase
from .config import S2ftConfig


@dataclass(frozen=True)
class AttentionShape:
    """Head layout of the model: ``num_heads`` query heads, ``num_kv_heads`` KV heads of ``head_dim`` each."""

    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class SliceSpec:
    """What one adapter trains in this matrix: ``count`` units of ``unit`` rows (or columns) out of ``n_units``."""

    role: str
    axis: str  # "rows" or "cols"
    unit: int
    n_units: int
    count: int

    def coordinates(self, units: torch.Tensor) -> torch.Tensor:
        """Original row (or column) indices of the given units, sorted."""
        units = torch.sort(units.long()).values
        return (units[:, None] * self.unit + torch.arange(self.unit)).reshape(-1)


def slice_spec(role: str, shape: tuple[int, int], config: S2ftConfig, attention: Optional[AttentionShape], where: str):
    out_f, in_f = shape
    if role in ("v", "o"):
        if attention is None:
            raise ValueError(
                f"S2ftConfig: {where} has the attention role {role!r}, but the model config gives no head layout "
                f"(num_attention_heads); map it to 'up'/'down' in module_roles or leave it out of target_modules"
            )
        group = attention.num_heads // attention.num_kv_heads
        size, expected = (out_f, attention.num_kv_heads) if role == "v" else (in_f, attention.num_heads)
        if size != expected * attention.head_dim:
            raise ValueError(
                f"S2ftConfig: {where} of shape {shape} does not match role {role!r} with {expected} heads of "
                f"head_dim {attention.head_dim}; fix module_roles"
            )
        if role == "v" or config.o_unit == "head":
            unit = attention.head_dim
            n_units = attention.num_kv_heads if role == "v" else attention.num_heads
        else:  # "kv_group": the query heads that read one KV head
            unit, n_units = group * attention.head_dim, attention.num_kv_heads
    else:
        unit, n_units = 1, out_f if role == "up" else in_f
    axis = "rows" if role in ("v", "up") else "cols"
    count = min(n_units, max(1, round(config.ratio(role) * n_units)))
    return SliceSpec(role, axis, unit, n_units, count)


class S2FTLinear(SparseLayerBase):
    """S²FT on one linear layer (Yang et al., NeurIPS 2024, "S²FT").

    Forward, row role (V heads, up channels): ``y = x Wᵀ + b``, then ``y[..., R] += x · Dᵀ``, ``D`` of shape
    ``(|R|, in)``. Column role (O heads, down channels): ``y = x Wᵀ + b + x[..., C] · Dᵀ``, ``D`` of shape
    ``(out, |C|)``. So ``ΔW[R, :] = D`` or ``ΔW[:, C] = D``.

    Stored per adapter: ``sparse_peft_s2ft_delta`` (trainable ``D``) and ``sparse_peft_s2ft_index`` (persistent
    int32 buffer: the selected rows ``R`` or columns ``C`` in the weight's original coordinates, sorted). No
    permutation is applied to the model, at training, loading or inference: the reference code co-permutes heads
    to make the slices contiguous and, on grouped-query models, builds that permutation over query heads while
    reshaping by KV heads (wrong for GQA); here V rows are chosen per KV head and O columns per KV group instead.

    Backward (:class:`~sparse_peft.sparse.slices.SliceMatmul`): ``∂L/∂D = g[..., R]ᵀ · x`` (rows) or
    ``gᵀ · x[..., C]`` (columns); the column case saves only ``x[..., C]``. No dense weight gradient is formed.
    Merge adds ``D`` into the slice of ``W``; unmerge writes the saved original slice back (exact).
    """

    prefix: str = "sparse_peft_s2ft_"
    adapter_layer_names: tuple[str, ...] = ("sparse_peft_s2ft_delta",)
    other_param_names: tuple[str, ...] = ("sparse_peft_s2ft_index",)
    _adapter_state = (*SparseLayerBase._adapter_state, "specs", "uncalibrated")
    calibrates_at_train_begin = True  # choosing units changes the index buffer and zeroes D; shapes stay

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: S2ftConfig,
        module_name: str = "",
        attention: Optional[AttentionShape] = None,
    ) -> None:
        super().__init__(base_layer, module_name)
        self.sparse_peft_s2ft_delta = nn.ParameterDict({})
        self.sparse_peft_s2ft_index = BufferDict({}, persistent=True)
        self.attention = attention
        self.specs: dict[str, SliceSpec] = {}
        self.uncalibrated: set[str] = set()
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    delta = AdapterStore("delta")
    index = AdapterStore("index")

    def role(self, config: S2ftConfig) -> str:
        leaf = self.module_name.split(".")[-1]
        role = config.module_roles.get(leaf)
        if role is None:
            raise ValueError(
                f"S2ftConfig.module_roles has no role for {self.module_name or leaf!r}; add {leaf!r} to module_roles "
                f"(one of 'v', 'o', 'up', 'down') or remove it from target_modules"
            )
        return role

    # ---- adapter lifecycle ---------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: S2ftConfig, **kwargs: Any) -> None:
        spec = slice_spec(self.role(config), self.shape, config, self.attention, self.module_name or "a layer")
        self.adapter_configs[adapter_name] = config
        self.specs[adapter_name] = spec
        if from_checkpoint(config):
            units = torch.arange(spec.count)  # placeholder, overwritten by the checkpoint
        else:
            units = self._choose(config, spec, self._static_scores(config, spec))
            if config.selection in ("activation", "gradient"):
                self.uncalibrated.add(adapter_name)
        coords = spec.coordinates(units)
        width = coords.numel()
        shape = (width, self.in_features) if spec.axis == "rows" else (self.out_features, width)
        device = self._weight_device()
        generator = torch.Generator().manual_seed(self.module_seed(config.seed) + 1)
        init = torch.zeros(shape) if config.init_weights else 0.02 * torch.randn(shape, generator=generator)
        self.delta[adapter_name] = nn.Parameter(init.to(device))
        self.index[adapter_name] = coords.to(device=device, dtype=torch.int32)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _static_scores(self, config: S2ftConfig, spec: SliceSpec) -> torch.Tensor:
        """Unit scores available without data: seeded random, or the norm of each unit's weights."""
        if config.selection != "weight":
            generator = torch.Generator().manual_seed(self.module_seed(config.seed))
            return torch.rand(spec.n_units, generator=generator)
        weight = self.get_base_weight().detach().float()  # dequantized transient for quantized bases
        return self._unit_norms(weight.square(), spec)

    @staticmethod
    def _unit_norms(squares: torch.Tensor, spec: SliceSpec) -> torch.Tensor:
        """``sqrt`` of the per-unit sum of ``squares`` (``(out, in)``, or a per-row / per-column vector)."""
        if squares.dim() == 2:
            squares = squares.sum(dim=1) if spec.axis == "rows" else squares.sum(dim=0)
        return squares.view(spec.n_units, spec.unit).sum(dim=1).sqrt().cpu()

    def _choose(self, config: S2ftConfig, spec: SliceSpec, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() if config.select_largest else -scores.float()
        order = torch.randperm(spec.n_units, generator=torch.Generator().manual_seed(config.seed))
        ranked = order[torch.sort(scores[order], descending=True, stable=True).indices]
        return torch.sort(ranked[: spec.count]).values

    # ---- calibration (activation / gradient selection), through sparse_peft.calibrate ---------------------------
    def calibration_mode(self, adapter_name: str) -> Optional[str]:
        """``"activation"`` / ``"gradient"`` while this adapter's data-driven units are still to be chosen."""
        return self.adapter_configs[adapter_name].selection if adapter_name in self.uncalibrated else None

    @torch.no_grad()
    def finish_calibration(self, adapter_name: str, window: Window) -> None:
        """Choose the units from the (all-reduced) calibration window and reset ``D`` to zero.

        Activation: a unit's score is the norm of its output rows (V, up: ``Σ y²`` over the unit's rows) or input
        columns (O, down: ``Σ x²``). Gradient: the norm of the unit's slice of ``Σ ∂L/∂W``.
        """
        spec, config = self.specs[adapter_name], self.adapter_configs[adapter_name]
        if window.batches == 0:
            raise RuntimeError(f"S²FT calibration of {self.module_name} saw no batches; pass at least one batch")
        if config.selection == "activation":
            stat = window.output_sq if spec.axis == "rows" else window.input_sq
        else:
            stat = window.gradient.square()
        coords = spec.coordinates(self._choose(config, spec, self._unit_norms(stat, spec)))
        self.index[adapter_name].copy_(coords.to(self.index[adapter_name]))
        self.delta[adapter_name].zero_()
        self.uncalibrated.discard(adapter_name)

    # ---- forward -------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result, final = self._base_forward(x, *args, **kwargs)
        if final:
            return result
        for name in self._active_in(self.delta):
            if name in self.uncalibrated and self.training and torch.is_grad_enabled() and not calibrating():
                warnings.warn(
                    f"S2ftConfig(selection={self.adapter_configs[name].selection!r}) on {self.module_name}: call "
                    f"sparse_peft.calibrate(model, batches) before training (SparsePeftCallback does it on the first "
                    f"batches); training the random units",
                    UserWarning,
                    stacklevel=2,
                )
                self.uncalibrated.discard(name)
            result = self._add_delta(name, x, result)
        return result

    def _add_delta(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        delta, index = self.delta[name], self.index[name].long()
        if self.specs[name].axis == "rows":
            return result.index_add(-1, index, row_slice_matmul(x, delta).to(result.dtype))
        return result + col_slice_matmul(x, delta, index).to(result.dtype)

    # ---- merge / unmerge -----------------------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Dense ``ΔW`` of one adapter (merging and inspection only)."""
        delta, index = self.delta[adapter_name].detach(), self.index[adapter_name].long()
        dense = torch.zeros(self.shape, dtype=delta.dtype, device=delta.device)
        if self.specs[adapter_name].axis == "rows":
            dense[index] = delta
        else:
            dense[:, index] = delta
        return dense

    def _slice(self, name: str, weight: torch.Tensor) -> tuple[slice | torch.Tensor, ...]:
        index = self.index[name].long().to(weight.device)
        return (index,) if self.specs[name].axis == "rows" else (slice(None), index)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """``W[R, :] += D`` or ``W[:, C] += D``; the replaced slice is kept so :meth:`unmerge` is exact."""
        for name in self._adapters_to_merge(adapter_names):
            if name not in self.delta:
                continue
            weight = self.get_base_weight().clone()
            where = self._slice(name, weight)
            original = weight[where].clone()
            weight[where] = original + self.delta[name].detach().to(weight.dtype)
            self._commit_merge(name, weight, safe_merge, original)

    def unmerge(self) -> None:
        for name, original in self._saved_merges():
            weight = self.get_base_weight().clone()
            weight[self._slice(name, weight)] = original
            self.set_base_weight(weight)

    def prepare_load(self, module_key: str, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
        """Check that the checkpoint's slice indices fit this layer and are whole units of its role."""
        if adapter_name not in self.delta:
            return
        key = f"{module_key}.{self.prefix}index.{adapter_name}".lstrip(".")
        saved = state_dict.get(key)
        spec = self.specs[adapter_name]
        limit = self.out_features if spec.axis == "rows" else self.in_features
        if saved is None or saved.shape != self.index[adapter_name].shape or saved.dtype.is_floating_point:
            raise ValueError(
                f"adapter slice indices for {module_key} are missing or do not match this layer ({spec.count} "
                f"{spec.role} units of {spec.unit}); load the adapter into the base model and config it was "
                f"trained with"
            )
        units = saved.long().view(spec.count, spec.unit)
        if (
            int(saved.min()) < 0
            or int(saved.max()) >= limit
            or not torch.equal(units - units[:, :1], torch.arange(spec.unit).expand_as(units))
        ):
            raise ValueError(
                f"adapter slice indices for {module_key} are not whole {spec.role} units inside the weight"
            )
        self.uncalibrated.discard(adapter_name)
