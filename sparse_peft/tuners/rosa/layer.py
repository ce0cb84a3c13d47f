"""The RoSA layer: a LoRA plus a sparse delta on the shared engine, with a gradient-statistics mask."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from ...sparse.delta import DeltaTerm, LowRank, dense_delta, index_dtype
from ...sparse.masks_file import read_mask
from ...sparse.regrow import unwrap_optimizer
from ...sparse.select import (
    gradient_score,
    input_normalized_score,
    magnitude_score,
    random_score,
    topk_positions,
    topk_row_balanced,
)
from ...sparse.stats import Window, calibrating, per_sample_squares
from ..layer_base import AdapterStore
from ..sparse_delta import SparseDeltaLinear
from .config import FISHER_SCORES, RosaConfig


@dataclass
class GradientWindow:
    """Gradient statistics of one adapter during the collection phase (float32).

    ``total``: ``Σ G_b²`` (or ``Σ G_b``) over every micro-batch ``b`` committed so far, summed over DDP ranks, with
    ``G_b = gᵀx`` the micro-batch's gradient of ``W``; ``input_sq``: ``Σ_t x_tj²`` over the same tokens (``(in,)``,
    only for ``mask_score="input_normalized"``); ``count``: how many micro-batches that is; ``pending`` /
    ``pending_input_sq`` / ``pending_count``: this step's local contributions, all-reduced and folded in at the step's
    end; ``steps``: committed optimizer steps.
    """

    total: Optional[torch.Tensor] = None
    input_sq: Optional[torch.Tensor] = None
    count: float = 0.0
    pending: Optional[torch.Tensor] = None
    pending_input_sq: Optional[torch.Tensor] = None
    pending_count: float = 0.0
    steps: int = 0
    group: Any = field(default=None, repr=False)

    def add(self, grad: torch.Tensor, x_sq: Optional[torch.Tensor]) -> None:
        """One micro-batch's statistic (and its ``Σ_t x_tj²``). In one process, once a step has been committed, it is
        added to the total in place, so the window holds one ``(out, in)`` float32 buffer per layer, not two."""
        if self.group is None and self.total is not None:
            self.total.add_(grad)
            if x_sq is not None and self.input_sq is not None:
                self.input_sq.add_(x_sq)
        else:
            self.pending = grad if self.pending is None else self.pending.add_(grad)
            if x_sq is not None:
                self.pending_input_sq = x_sq if self.pending_input_sq is None else self.pending_input_sq.add_(x_sq)
        self.pending_count += 1

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The committed statistics (checkpoint side file): ``total`` (and ``input_sq``) bit-exact, ``count``,
        ``steps``."""
        if self.total is None:
            return {}
        count = torch.tensor(self.count, dtype=torch.float64)
        tensors = {"total": self.total.detach(), "count": count, "steps": torch.tensor(self.steps)}
        if self.input_sq is not None:
            tensors["input_sq"] = self.input_sq.detach()
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], shape: tuple[int, int], device: Any) -> GradientWindow:
        total = tensors["total"].to(device=device, dtype=torch.float32).view(shape).clone()
        input_sq = tensors.get("input_sq")
        if input_sq is not None:
            input_sq = input_sq.to(device=device, dtype=torch.float32).clone()
        return cls(total=total, input_sq=input_sq, count=float(tensors["count"]), steps=int(tensors["steps"]))


class RosaLinear(SparseDeltaLinear):
    """RoSA on one linear layer (Nikdan et al., ICML 2024).

    Forward: ``y = x·(W + S)ᵀ + b + s·dropout(x)·Aᵀ·Bᵀ`` with ``A`` (``r x in``, Kaiming-uniform), ``B``
    (``out x r``, zero) and ``S = scatter(values, indices)`` (``k`` entries, values zero at start), so the adapter
    starts as the identity. ``x·(W + S)ᵀ`` runs on the shared sparse engine (one GEMM on a transient ``W + S``,
    SDDMM value gradient); nothing of size ``out x in`` is kept for backward.

    Stored per adapter: ``<prefix>lora_A``, ``<prefix>lora_B`` (trainable), ``<prefix>values`` (trainable, length
    ``k``), ``<prefix>indices`` (persistent int buffer) and ``<prefix>mask_ready`` (persistent flag: 1 once the mask
    is final, so a resumed or reloaded adapter never re-selects it).

    Mask from gradients without a trainable ``W`` (also on 4-bit bases): while statistics are collected, the engine's
    backward hands this layer the micro-batch's output gradient ``g`` and input ``x``, and ``G = gᵀx`` is added to a
    float32 accumulator (for the Fisher score, each example's ``G_i²``: per-sample, not the batch's square). That
    dense ``out x in`` accumulator, and the transient ``G``, are the one dense cost of RoSA: they exist only during
    the ``window_steps`` of the collection phase (one per layer, on ``stats_device``) and are freed when the
    mask is chosen. Statistics are all-reduced over the schedule's process group at every step's end, so every DDP
    rank holds (and checkpoints) the same sums and picks the same mask.

    Frozen phases: before the mask is final (warm-up and collection) the values sit at zero and the engine gives them
    a zero gradient (``n_trainable=0``), so they neither move nor affect gradient clipping; ``on_pre_optimizer_step``
    sets their ``.grad`` to ``None`` so the optimizer skips them and Adam's step count starts when they start training.
    (Without that hook AdamW still leaves them at exactly zero: zero gradient, zero moments, zero weight decay of 0.)

    Differences from the reference code: statistics are accumulated in float32 (the reference keeps bf16 squares),
    the accumulator stays on the layer's device unless ``stats_device`` says otherwise, and unmerge subtracts the LoRA
    term (like PEFT's LoRA: exact up to float rounding) but writes the sparse entries back bit-exactly.
    """

    prefix = "sparse_peft_rosa_"
    _adapter_state = (*SparseDeltaLinear._adapter_state, "_windows", "_phase")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._windows: dict[str, GradientWindow] = {}
        self._phase: dict[str, str] = {}  # "warmup" | "collect" | "train", set by on_step_begin
        self._samples = 1  # examples in the current micro-batch, for the per-sample Fisher
        super().__init__(*args, **kwargs)

    # ---- storage ---------------------------------------------------------------------------------------------
    lora_A = AdapterStore("lora_A")
    lora_B = AdapterStore("lora_B")
    mask_ready = AdapterStore("mask_ready")  # int32 flag per adapter: the sparse mask is chosen

    def _init_rosa_containers(self) -> None:
        """Create the LoRA and flag containers once (``update_layer`` runs inside the engine's ``__init__``)."""
        p = self.prefix
        if not hasattr(self, f"{p}lora_A"):
            setattr(self, f"{p}lora_A", nn.ParameterDict({}))
            setattr(self, f"{p}lora_B", nn.ParameterDict({}))
            setattr(self, f"{p}mask_ready", BufferDict({}, persistent=True))

    # ---- budget and initial mask -------------------------------------------------------------------------
    min_budget = 0  # density 0 (schedule "lora_only") gives an empty sparse part

    def budget(self, config: RosaConfig) -> int:
        density = config.density_for(self.module_name)
        return max(1, round(density * self.numel)) if density > 0 else 0

    def select(self, config: RosaConfig, adapter_name: str, k: int) -> torch.Tensor:
        """Positions at creation: the saved mask (``mask_path``), a seeded random mask (``init_weights=False``, for
        tests) or evenly spaced placeholders that the collected statistics replace before the values train."""
        if k == 0:
            return torch.zeros(0, dtype=index_dtype(self.numel))
        if config.mask_path is not None:
            return read_mask(config.mask_path, self.module_name, self.shape, k)
        if not config.init_weights:
            return topk_positions(random_score(self.shape, self.module_seed(config.seed)), k, seed=config.seed)
        return torch.arange(k, dtype=torch.int64) * (self.numel // k)

    def update_layer(self, adapter_name: str, config: RosaConfig, **kwargs: Any) -> None:
        self._init_rosa_containers()
        device = self._weight_device()
        if config.r > 0:
            generator = torch.Generator().manual_seed(self.module_seed(config.seed))
            bound = 1.0 / self.in_features**0.5  # nn.init.kaiming_uniform_(a=sqrt(5)), as nn.Linear and PEFT's LoRA
            a = (torch.rand(config.r, self.in_features, generator=generator) * 2 - 1) * bound
            b = torch.zeros(self.out_features, config.r)
            if not config.init_weights:
                b = 0.1 * torch.randn(self.out_features, config.r, generator=generator)
            self.lora_A[adapter_name] = nn.Parameter(a.to(device))
            self.lora_B[adapter_name] = nn.Parameter(b.to(device))
        ready = self.budget(config) == 0 or config.mask_path is not None or not config.init_weights
        self.mask_ready[adapter_name] = torch.tensor([int(ready)], dtype=torch.int32, device=device)
        super().update_layer(adapter_name, config, **kwargs)

    def is_mask_ready(self, adapter_name: str) -> bool:
        return bool(self.mask_ready[adapter_name].item())

    # ---- forward -----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``x (W + s·B·A + S)ᵀ`` on one GEMM (the shared entry-sparse path with the LoRA folded into ``W_eff``);
        a LoRA with dropout in training runs as its own term ``s·B(A drop(x))`` beside it."""
        if self._adapters_off() or self.merged:
            return self.base_layer(x, *args, **kwargs)
        if self.training and torch.is_grad_enabled() and not calibrating():
            self._check_driven()
            self._samples = x.shape[0] if x.dim() > 2 else 1  # examples in this micro-batch (per-sample Fisher)
        loras = [name for name in self.active_adapters if name in self.adapter_configs and name in self.lora_A]
        dropped = [name for name in loras if self.training and self.adapter_configs[name].lora_dropout > 0]
        folded = [self._low_rank(name) for name in loras if name not in dropped]
        result = self._delta_forward(x, *args, low_rank=folded, **kwargs)
        for name in dropped:
            result = result + self._lora_term(name, x).to(result.dtype)
        return result

    def _low_rank(self, name: str) -> LowRank:
        return LowRank(self.lora_A[name], self.lora_B[name], self.adapter_configs[name].scaling)

    def _check_driven(self) -> None:
        """A training forward with a mask still to collect and no schedule driving it would train LoRA alone."""
        for name in self.active_adapters:
            if name not in self.adapter_configs or name in self._phase or self.is_mask_ready(name):
                continue
            config: RosaConfig = self.adapter_configs[name]
            if config.schedule == "lora_only" or self.values[name].numel() == 0:
                continue
            raise RuntimeError(
                f"RoSA adapter {name!r} has no sparse mask yet and nothing drives its schedule "
                f"({config.schedule!r}), so its sparse part would never train. Train with transformers/TRL and "
                f"callbacks=[sparse_peft.SparsePeftCallback()]; or, in a custom loop, call sparse_peft.begin_step("
                f"model, step), sparse_peft.before_optimizer_step(model) and sparse_peft.refresh_masks(model, step, "
                f"optimizer) around every optimizer step; or choose the mask before training with "
                f"schedule='default' and sparse_peft.calibrate(model, batches) (or a saved mask, mask_path=...)"
            )

    # ---- the calibration pass (sparse_peft.calibrate): the mask from the pretrained model ----------------------
    def calibration_mode(self, adapter_name: str) -> Optional[str]:
        """``"fisher"`` (or ``"gradient"`` for ``mask_score="mean"``) when the schedule collects at step 0
        (``"default"`` / ``"spa_only"``) and the mask is not chosen yet."""
        config: RosaConfig = self.adapter_configs[adapter_name]
        if self.is_mask_ready(adapter_name) or not config.needs_collection or config.warmup_steps > 0:
            return None
        if config.schedule == "lora_only" or self.values[adapter_name].numel() == 0:
            return None
        return "fisher" if config.mask_score in FISHER_SCORES else "gradient"

    def finish_calibration(self, adapter_name: str, window: Window) -> None:
        """The mask: top-``k`` of the per-sample Fisher ``Σ_i G_i²`` (divided by ``Σ_t x_tj²`` for
        ``"input_normalized"``; or of ``|Σ_b G_b|``) over the calibration batches; the values start training at step
        1 (no collection steps inside training)."""
        config: RosaConfig = self.adapter_configs[adapter_name]
        statistic = window.gradient_sq if window.gradient_sq is not None else window.gradient
        scores = self._score(statistic, window.input_sq, config)
        self.set_mask(adapter_name, self._top_k(scores, self.values[adapter_name].numel(), config))

    def delta_term(self, adapter_name: str) -> Optional[tuple[DeltaTerm, torch.Tensor]]:
        """S trains only once its mask is chosen and the phase is ``train``; during collection the observer
        gathers the gradient statistics (the dense ``gᵀx`` of this layer, one window at a time)."""
        if adapter_name not in self.adapter_configs:
            return None
        values, n_trainable = self._all_values(adapter_name)
        if values.numel() == 0:
            return None
        observer = None
        if self.training and torch.is_grad_enabled() and self._phase.get(adapter_name) == "collect":
            observer = self._observer(adapter_name)
        trains = self._phase.get(adapter_name, "train") == "train" and self.is_mask_ready(adapter_name)
        return DeltaTerm(self.pattern(adapter_name), n_trainable if trains else 0, observer), values

    def _lora_term(self, name: str, x: torch.Tensor) -> torch.Tensor:
        config = self.adapter_configs[name]
        a, b = self.lora_A[name], self.lora_B[name]
        x = F.dropout(x.to(a.dtype), p=config.lora_dropout, training=self.training)
        return F.linear(F.linear(x, a), b) * config.scaling

    # ---- merge / unmerge -----------------------------------------------------------------------------------
    def _lora_delta(self, name: str) -> Optional[torch.Tensor]:
        if name not in self.lora_A:
            return None
        a, b = self.lora_A[name].detach().float(), self.lora_B[name].detach().float()
        return (b @ a) * self.adapter_configs[name].scaling

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Dense ``ΔW = s·B·A + S`` of one adapter, shape ``(out, in)`` (merging and inspection only)."""
        values, indices, _ = self.delta_tensors(adapter_name)
        delta = dense_delta(values.detach().float(), indices, self.shape)
        lora = self._lora_delta(adapter_name)
        return delta if lora is None else delta + lora.to(delta.device)

    def _dense_merge_term(self, name: str) -> Optional[torch.Tensor]:
        """``s·B·A``: :meth:`merge` gives ``W ← W + s·B·A + S`` for each adapter, keeping the entries ``S``
        overwrites; :meth:`unmerge` (last merged adapter first) writes those back, then subtracts ``s·B·A``."""
        return self._lora_delta(name)

    # ---- schedule ------------------------------------------------------------------------------------------
    def on_step_begin(self, adapter_name: str, step: int, context: Any = None) -> None:
        """Decide this step's phase; selects a statistics-free mask (magnitude, random) when its time has come."""
        config: RosaConfig = self.adapter_configs[adapter_name]
        if config.schedule == "lora_only" or step <= config.warmup_steps:
            self._phase[adapter_name] = "warmup"
            return
        if not self.is_mask_ready(adapter_name) and not config.needs_collection:
            self.set_mask(adapter_name, self._static_mask(adapter_name))
        if self.is_mask_ready(adapter_name):
            self._phase[adapter_name] = "train"
            self._windows.pop(adapter_name, None)
            return
        self._phase[adapter_name] = "collect"
        window = self._windows.setdefault(adapter_name, GradientWindow())
        window.group = getattr(context, "group", None)

    def on_pre_optimizer_step(self, adapter_name: str, context: Any = None) -> None:
        """Values that must not train yet get no gradient at all, so the optimizer skips them (no state, no decay)."""
        if not self._sparse_trains(adapter_name) and adapter_name in self.values:
            self.values[adapter_name].grad = None

    def on_step_end(self, adapter_name: str, step: int, optimizer: Any = None, context: Any = None) -> int:
        """Fold this step's statistics into the window; after ``window_steps`` steps select the mask."""
        window = self._windows.get(adapter_name)
        if window is None or self._phase.get(adapter_name) != "collect":
            return 0
        self._commit(adapter_name, window, getattr(context, "group", None) or window.group)
        config: RosaConfig = self.adapter_configs[adapter_name]
        if window.steps < config.window_steps:
            return 0
        if window.count == 0:
            raise RuntimeError(
                f"RoSA collected no gradients for {self.module_name} during {window.steps} step(s): run the model in "
                f"train mode with gradients enabled while the mask is collected"
            )
        scores = self._score(window.total, window.input_sq, config)  # one scale per layer: top-k is scale-free
        self._windows.pop(adapter_name)
        positions = self._top_k(scores, self.values[adapter_name].numel(), config)
        del scores
        self.set_mask(adapter_name, positions, optimizer)
        self._phase[adapter_name] = "train"
        return int(positions.numel())

    def _sparse_trains(self, adapter_name: str) -> bool:
        return self._phase.get(adapter_name, "train") == "train" and self.is_mask_ready(adapter_name)

    def _static_mask(self, adapter_name: str) -> torch.Tensor:
        config: RosaConfig = self.adapter_configs[adapter_name]
        k = self.values[adapter_name].numel()
        if config.mask_score == "magnitude":
            score = magnitude_score(self.base_weight_float())  # transient (out x in) dequantized copy
        else:
            score = random_score(self.shape, self.module_seed(config.seed))
        return self._top_k(score, k, config)

    @staticmethod
    def _score(statistic: torch.Tensor, input_sq: Optional[torch.Tensor], config: RosaConfig) -> torch.Tensor:
        """``|Σ G|`` or ``Σ G²`` as collected; for ``"input_normalized"`` ``Σ G² / Σ_t x_tj²``."""
        scores = gradient_score(statistic)
        if config.mask_score == "input_normalized" and input_sq is not None:
            scores = input_normalized_score(scores, input_sq.to(scores.device), squared=True)
        return scores

    def _top_k(self, scores: torch.Tensor, k: int, config: RosaConfig) -> torch.Tensor:
        """The mask's ``k`` positions: the top-``k`` of ``scores`` (``mask_scope="matrix"``) or the row-balanced
        top-``k`` (``"row"``)."""
        if config.mask_scope == "row":
            return topk_row_balanced(scores.reshape(self.shape), k, seed=config.seed)
        return topk_positions(scores, k, seed=config.seed)

    def _observer(self, adapter_name: str):
        return lambda grad_out, x, grad_values: self._observe(adapter_name, grad_out, x)

    @torch.no_grad()
    def _observe(self, adapter_name: str, grad_out: torch.Tensor, x: torch.Tensor) -> None:
        """Add this micro-batch's ``G = gᵀx`` (or its examples' ``Σ_i G_i²``, and for ``"input_normalized"`` its
        ``Σ_t x_tj²``) to the window, in float32."""
        config: RosaConfig = self.adapter_configs[adapter_name]
        if config.mask_score in FISHER_SCORES:  # per-sample squares: the empirical Fisher of the paper
            grad = per_sample_squares(grad_out, x, self._samples)
        else:
            grad = grad_out.float().t() @ x.float()  # transient (out x in), one layer at a time
        x_sq = x.float().square().sum(0) if config.mask_score == "input_normalized" else None
        if config.stats_device is not None:
            grad = grad.to(config.stats_device)
            x_sq = None if x_sq is None else x_sq.to(config.stats_device)
        self._windows[adapter_name].add(grad, x_sq)

    def _commit(self, adapter_name: str, window: GradientWindow, group: Any) -> None:
        """All-reduce this step's sums over the ranks and fold them into the window (every rank holds the total).

        In one process the micro-batches after the first step were already added to the total in place, so the
        window holds one ``(out, in)`` float32 buffer per layer instead of two."""
        device = self.values[adapter_name].device
        pending, pending_x = window.pending, window.pending_input_sq
        if pending is None and group is None:  # folded into the total as it came (or nothing was seen)
            window.count += window.pending_count
            window.steps += 1
            window.pending_count = 0.0
            return
        if pending is None:  # this rank saw no micro-batch: it still takes part in the all-reduce
            pending = torch.zeros(self.shape, dtype=torch.float32, device=device)
        if pending_x is None and self.adapter_configs[adapter_name].mask_score == "input_normalized":
            pending_x = torch.zeros(self.in_features, dtype=torch.float32, device=pending.device)
        count = torch.tensor([window.pending_count], dtype=torch.float64, device=device)
        if group is not None:
            pending = _all_reduced(pending, device, group)
            pending_x = None if pending_x is None else _all_reduced(pending_x, device, group)
            dist.all_reduce(count, group=group)
        window.total = pending if window.total is None else window.total.add_(pending)
        if pending_x is not None:
            window.input_sq = pending_x if window.input_sq is None else window.input_sq.add_(pending_x)
        window.count += float(count.item())
        window.steps += 1
        window.pending, window.pending_input_sq, window.pending_count = None, None, 0.0

    @torch.no_grad()
    def set_mask(self, adapter_name: str, positions: torch.Tensor, optimizer: Any = None) -> None:
        """Make ``positions`` the final mask of ``adapter_name``; the values restart from zero with no optimizer
        state (they have not trained yet, see the class docstring)."""
        values, indices = self.values[adapter_name], self.indices[adapter_name]
        if positions.shape != indices.shape:
            raise ValueError(
                f"mask for {self.module_name} has {positions.numel()} entries but the adapter holds {indices.numel()} "
                f"(density {self.adapter_configs[adapter_name].density_for(self.module_name)}); use the density the "
                f"mask was made with"
            )
        self._check_positions(positions, self.module_name)
        if positions.numel() and torch.unique(positions).numel() != positions.numel():
            raise ValueError(f"mask for {self.module_name} has repeated positions")
        indices.copy_(torch.sort(positions.long()).values.to(indices.dtype))
        values.zero_()
        values.grad = None
        if optimizer is not None:
            unwrap_optimizer(optimizer).state.pop(values, None)
        self.mask_ready[adapter_name].fill_(1)

    # ---- checkpointing of the collection window ----------------------------------------------------------------
    def export_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        window = self._windows.get(adapter_name)
        return window.to_tensors() if window is not None else {}

    def import_state(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
        config: RosaConfig = self.adapter_configs[adapter_name]
        device = config.stats_device or self.values[adapter_name].device
        self._windows[adapter_name] = GradientWindow.from_tensors(tensors, self.shape, device)


_p = RosaLinear.prefix
RosaLinear.adapter_layer_names = (f"{_p}values", f"{_p}lora_A", f"{_p}lora_B")
RosaLinear.other_param_names = (*RosaLinear.other_param_names, f"{_p}mask_ready")


def _all_reduced(tensor: torch.Tensor, device: torch.device, group: Any) -> torch.Tensor:
    """``tensor`` summed over ``group``'s ranks (reduced on the layer's ``device``), back on its own device."""
    reduced = tensor.to(device)
    dist.all_reduce(reduced, group=group)
    return reduced.to(tensor.device)
