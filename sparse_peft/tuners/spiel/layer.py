"""The SpIEL layer: a fixed-size sparse delta whose entries are dropped and regrown during training."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from ...sparse.delta import SparsePattern
from ...sparse.regrow import plan_drop_and_grow, reset_slots, unwrap_optimizer
from ...sparse.select import gradient_score, input_normalized_score, random_score, topk_per_row, topk_positions
from ...sparse.stats import Window as CalibrationWindow
from ...sparse.stats import calibrating
from ..base import from_checkpoint
from ..sparse_delta import SparseDeltaLinear
from .config import SpielConfig


@dataclass
class Window:
    """Statistics of one open selection window (SpIEL-AG), all float32 and sized k.

    ``candidates``: flat positions nominated on the window's first micro-batch; ``sum_g`` / ``sum_g2``: per
    optimizer step gradient ``G_t`` at the candidates summed over the window (``Σ G_t``, ``Σ G_t²``); ``x_sq``: the
    squared norm of each input feature over the window's tokens (``Σ x_j²``, for ``growth_score="input_normalized"``);
    ``pending``: the current step's micro-batch contributions, all-reduced across processes at the step's end.
    """

    candidates: Optional[torch.Tensor] = None
    pattern: Optional[SparsePattern] = None
    sum_g: Optional[torch.Tensor] = None
    sum_g2: Optional[torch.Tensor] = None
    pending: Optional[torch.Tensor] = None
    pending_active: Optional[torch.Tensor] = None
    x_sq: Optional[torch.Tensor] = None
    pending_x_sq: Optional[torch.Tensor] = None
    steps: int = 0
    group: Any = field(default=None, repr=False)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The committed statistics (checkpoint side file): candidates, ``Σ G``, ``Σ G²`` and ``steps``."""
        if self.candidates is None:
            return {}
        sums = {"sum_g": self.sum_g.detach(), "sum_g2": self.sum_g2.detach()}
        if self.x_sq is not None:
            sums["x_sq"] = self.x_sq.detach()
        return {"candidates": self.candidates.detach(), **sums, "steps": torch.tensor(self.steps)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], shape: tuple[int, int], index: torch.Tensor) -> Window:
        """The window of :meth:`to_tensors`, on ``index``'s device, candidates in ``index``'s dtype."""
        candidates = tensors["candidates"].to(device=index.device, dtype=index.dtype)
        keys = ("sum_g", "sum_g2", "x_sq")
        sums = {
            key: tensors[key].to(device=index.device, dtype=torch.float32).clone() for key in keys if key in tensors
        }
        if "x_sq" not in sums:  # a window saved before the feature norms were kept: all features weigh the same
            sums["x_sq"] = torch.ones(shape[1], dtype=torch.float32, device=index.device)
        pattern = SparsePattern.build(candidates, shape)
        return cls(candidates=candidates, pattern=pattern, **sums, steps=int(tensors["steps"]))


def growth_score(gradient: torch.Tensor, x_sq: Optional[torch.Tensor], kind: str) -> torch.Tensor:
    """How much a position should grow: ``|G|`` (``"gradient"``, the paper's) or ``|G_ij| / ‖x_j‖``
    (``"input_normalized"``, :func:`~sparse_peft.sparse.select.input_normalized_score`).

    ``gradient`` is dense ``(out, in)`` (then ``x_sq`` has ``in`` entries) or flat at candidates (then ``x_sq`` is
    gathered at their columns).
    """
    score = gradient_score(gradient)
    if kind == "gradient" or x_sq is None:
        return score
    return input_normalized_score(score, x_sq)


class SpielLinear(SparseDeltaLinear):
    """SpIEL on one linear layer (Ansell et al., 2024).

    Forward: ``y = x Wᵀ + b + x ΔWᵀ``, ``ΔW = scatter(values, indices)``, ``k = |indices|`` fixed.

    Schedule (``t`` = completed optimizer steps, R = ``reselection_steps``, S = ``window_steps``):
    statistics are collected during steps with ``(t−1) mod R < S`` and a selection runs after steps with
    ``t mod R = S`` and ``t ≤ T``.

    Adam reseeding: the reference keeps a per-element age ``a`` and sets ``m = m̄(1−β₁ᵃ)``, ``v = v̄(1−β₂ᵃ)``, so the
    bias-corrected moments of a new slot equal the window means ``m̄ = ΣG/a``, ``v̄ = ΣG²/a``. torch's AdamW keeps one
    step count ``t`` per tensor, so we set ``m = m̄(1−β₁ᵗ)``, ``v = v̄(1−β₂ᵗ)``: the bias-corrected moments again equal
    ``m̄`` and ``v̄``, which is the paper's intent. ``grown_moments="zero"`` leaves them at zero instead: the first
    update of a grown slot is then ``(1−β₁)/√(1−β₂) · (1−β₂ᵗ)^½/(1−β₁ᵗ)`` of a full one (about 0.5 at ``t = 25``).

    Initial selection ``"calibration"``: the calibration pass sets the ``k`` entries to the top-``k`` of
    ``|Σ_b G_b|`` over its batches (values zero, no optimizer state yet); the adapter is then *calibrated* and its
    selection at step S replaces ``ζ(S)·k`` slots instead of all of them. A loaded adapter of such a config counts as
    calibrated (its file holds the chosen entries), which also keeps a resume exact.

    Distributed: the first micro-batch's dense gradient (a transient of this layer) and every step's candidate
    statistics are all-reduced on a process group of their own before anything is chosen, so all ranks agree.
    """

    prefix = "sparse_peft_spiel_"
    _adapter_state = (*SparseDeltaLinear._adapter_state, "_windows", "_collecting", "uncalibrated", "keeps_initial")
    calibrates_at_train_begin = True  # the initial selection changes the index buffer and zero values; shapes stay

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._windows: dict[str, Window] = {}
        self._collecting: set[str] = set()
        self.uncalibrated: set[str] = set()
        self.keeps_initial: set[str] = set()
        super().__init__(*args, **kwargs)

    def update_layer(self, adapter_name: str, config: SpielConfig, **kwargs: Any) -> None:
        super().update_layer(adapter_name, config, **kwargs)
        self.keeps_initial.discard(adapter_name)
        if config.initial_selection == "calibration" and config.init_weights and not from_checkpoint(config):
            self.uncalibrated.add(adapter_name)
        if config.initial_selection == "random":
            self.keeps_initial.add(adapter_name)  # the initial entries stay: the selection at step S is an ordinary one

    # ---- initial selection by the calibration pass (initial_selection="calibration") ---------------------------
    def calibration_mode(self, adapter_name: str) -> Optional[str]:
        return "gradient" if adapter_name in self.uncalibrated else None

    @torch.no_grad()
    def finish_calibration(self, adapter_name: str, window: CalibrationWindow) -> None:
        """Initial entries: the top-``k`` of ``|Σ_b G_b|`` over the calibration batches; values restart at zero."""
        if window.gradient is None:
            raise RuntimeError(f"SpIEL calibration of {self.module_name} saw no batches; pass at least one batch")
        config: SpielConfig = self.adapter_configs[adapter_name]
        values, indices = self.values[adapter_name], self.indices[adapter_name]
        positions = topk_positions(gradient_score(window.gradient), values.numel(), seed=config.seed)
        indices.copy_(torch.sort(positions.long()).values.to(device=indices.device, dtype=indices.dtype))
        values.zero_()
        values.grad = None
        self.uncalibrated.discard(adapter_name)
        self.keeps_initial.add(adapter_name)

    def prepare_load(self, module_key: str, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
        """A loaded adapter's entries are chosen: no calibration over them (and, for ``"calibration"``, no full
        replacement at step S)."""
        super().prepare_load(module_key, adapter_name, state_dict)
        self.uncalibrated.discard(adapter_name)
        config = self.adapter_configs.get(adapter_name)
        if config is not None and config.initial_selection == "calibration":
            self.keeps_initial.add(adapter_name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        pending = [n for n in self.active_adapters if n in self.uncalibrated]
        if pending and self.training and torch.is_grad_enabled() and not calibrating() and not self._adapters_off():
            warnings.warn(
                f"SpielConfig(initial_selection='calibration') on {self.module_name}: adapter(s) {pending} were not "
                f"calibrated; call sparse_peft.calibrate(model, batches) before training (SparsePeftCallback does it "
                f"on the first batches). Falling back to the random start that step "
                f"window_steps replaces",
                UserWarning,
                stacklevel=2,
            )
            self.uncalibrated.difference_update(pending)
        return super().forward(x, *args, **kwargs)

    # ---- budget and initial mask -------------------------------------------------------------------------
    def budget(self, config: SpielConfig) -> int:
        if config.r is not None:
            return min((self.out_features + self.in_features) * config.r, self.numel)
        return max(1, round(config.density * self.numel))

    def select(self, config: SpielConfig, adapter_name: str, k: int) -> torch.Tensor:
        """A seeded uniform random k-subset (the first selection replaces it completely)."""
        return topk_positions(random_score(self.shape, self.module_seed(config.seed)), k, seed=config.seed)

    # ---- schedule ------------------------------------------------------------------------------------------
    def _total(self, config: SpielConfig, context: Any) -> int:
        return config.total_steps or getattr(context, "total_steps", 0) or 0

    def _selections(self, adapter_name: str) -> int:
        """A per-window number for seeding random growth: the sum of the current indices (changes at every
        selection, equal on every rank)."""
        return int(self.indices[adapter_name].long().sum().item()) % (2**31)

    def collecting(self, config: SpielConfig, step: int, total: int) -> bool:
        return (step - 1) % config.reselection_steps < config.window_steps and (not total or step <= total)

    def selecting(self, config: SpielConfig, step: int, total: int) -> bool:
        R, S = config.reselection_steps, config.window_steps
        return step >= S and step % R == S and (not total or step <= total)

    def on_step_begin(self, adapter_name: str, step: int, context: Any = None) -> None:
        config = self.adapter_configs[adapter_name]
        if config.selection_algorithm == "rigl" and self.collecting(config, step, self._total(config, context)):
            window = self._windows.setdefault(adapter_name, Window())
            window.group = getattr(context, "group", None)
            self._collecting.add(adapter_name)
        else:
            self._collecting.discard(adapter_name)

    def gradient_observer(self, adapter_name: str):
        if adapter_name not in self._collecting:
            return None
        return lambda grad_out, x, grad_values: self._observe(adapter_name, grad_out, x, grad_values)

    @torch.no_grad()
    def _observe(
        self, adapter_name: str, grad_out: torch.Tensor, x: torch.Tensor, grad_values: Optional[torch.Tensor] = None
    ) -> None:
        """Accumulate this micro-batch's weight gradient at the window's candidates (fp32)."""
        window = self._windows[adapter_name]
        g, xf = grad_out.float(), x.float()
        config: SpielConfig = self.adapter_configs[adapter_name]
        if window.candidates is None:
            self._nominate(adapter_name, window, g, xf)
        if window.pending is None:
            window.pending = torch.zeros_like(window.sum_g)
            window.pending_active = torch.zeros(self.values[adapter_name].numel(), device=g.device)
            if config.growth_score == "input_normalized":
                window.pending_x_sq = torch.zeros_like(window.x_sq)
        window.pending += window.pattern.sampled_grad(g, xf)
        if window.pending_x_sq is not None:
            window.pending_x_sq += xf.square().sum(0)
        k = window.pending_active.numel()
        if grad_values is None:  # values frozen in this pass: compute the active entries' gradient here
            grad_values = self.pattern(adapter_name).sampled_grad(g, xf)
        window.pending_active += grad_values[:k].float()

    def _nominate(self, adapter_name: str, window: Window, g: torch.Tensor, xf: torch.Tensor) -> None:
        """The window's ``k`` candidates, from its first micro-batch: the top-``k`` of :func:`growth_score` over the
        dense ``gᵀx`` (a transient ``(out, in)``, once per window and layer, all-reduced under DDP), or seeded
        random positions for ``growth_score="random"`` (no dense product)."""
        config: SpielConfig = self.adapter_configs[adapter_name]
        k = self.values[adapter_name].numel()
        if config.growth_score == "random":  # SET's regrowth: uniform random candidates and scores
            score = random_score(self.shape, self.module_seed(config.seed) + self._selections(adapter_name))
        else:
            score = g.t() @ xf
            x_sq = None
            if config.growth_score == "input_normalized":
                x_sq = xf.square().sum(0)
                window.x_sq = torch.zeros_like(x_sq)
            for tensor in (score, x_sq):
                if window.group is not None and tensor is not None:
                    dist.all_reduce(tensor, group=window.group)
            score = growth_score(score, x_sq, config.growth_score)
        window.candidates = self._candidates(score, k, config)
        del score
        window.pattern = SparsePattern.build(window.candidates, self.shape)
        window.sum_g = torch.zeros(window.candidates.numel(), dtype=torch.float32, device=g.device)
        window.sum_g2 = torch.zeros_like(window.sum_g)

    def _candidates(self, score: torch.Tensor, k: int, config: SpielConfig) -> torch.Tensor:
        """The top-``k`` of ``score`` over the matrix, or for ``growth_scope="row"`` the top ``⌈k/out⌉`` of every
        row (so each row has candidates to regrow what it drops)."""
        if config.growth_scope == "row":
            per_row = min(self.in_features, -(-k // self.out_features))
            return topk_per_row(score.reshape(self.shape), per_row, seed=config.seed)
        return topk_positions(score, k, seed=config.seed)

    def on_pre_optimizer_step(self, adapter_name: str, context: Any = None) -> None:
        """Commit this step's statistics on the scale of the gradient the optimizer will use (after clipping)."""
        window = self._windows.get(adapter_name)
        if window is not None and window.pending is not None:
            self._commit(window, context, self.values[adapter_name].grad)

    def _commit(self, window: Window, context: Any, clipped: Optional[torch.Tensor] = None) -> None:
        """Fold this step's gradient at the candidates, all-reduced and rank-averaged, into the window sums.

        ``pending_active`` is the same unclipped gradient at the active entries; comparing it with the clipped
        ``values.grad`` gives the trainer's clipping factor ``c``, and the candidates' gradient is scaled by ``c`` so
        that reseeded moments match the moments Adam keeps for the active entries.
        """
        if window.pending is None:
            return
        group = getattr(context, "group", None)
        if group is not None:
            for tensor in (window.pending, window.pending_active, window.pending_x_sq):
                if tensor is None:
                    continue
                dist.all_reduce(tensor, group=group)
                tensor /= dist.get_world_size(group)
        scale = 1.0
        if clipped is not None:
            unclipped = window.pending_active.norm()
            if unclipped > 0:
                scale = min(1.0, float(clipped.detach().float().norm() / unclipped))
        window.pending *= scale
        window.sum_g += window.pending
        window.sum_g2 += window.pending.square()
        if window.pending_x_sq is not None:
            window.x_sq += window.pending_x_sq
        window.steps += 1
        window.pending = window.pending_active = window.pending_x_sq = None

    def on_step_end(self, adapter_name: str, step: int, optimizer=None, context=None) -> int:
        config = self.adapter_configs[adapter_name]
        window = self._windows.get(adapter_name)
        if window is not None:
            self._commit(window, context)
        total = self._total(config, context)
        if not self.selecting(config, step, total):
            return 0
        rate = config.reselection_rate(step, total, keep_initial=adapter_name in self.keeps_initial)
        if config.selection_algorithm == "sm3":
            moved = self._regrow_sm3(adapter_name, rate, optimizer)
        else:
            moved = self._regrow_rigl(adapter_name, rate, optimizer, self._windows.pop(adapter_name, None))
        self._collecting.discard(adapter_name)
        return moved

    # ---- drop and grow -------------------------------------------------------------------------------------
    @torch.no_grad()
    def _regrow_rigl(self, adapter_name: str, rate: float, optimizer, window: Optional[Window]) -> int:
        if window is None or window.candidates is None or window.steps == 0:
            return 0
        values, indices = self.values[adapter_name], self.indices[adapter_name]
        n = int(values.numel() * rate)
        config: SpielConfig = self.adapter_configs[adapter_name]
        columns = window.candidates.long() % self.in_features
        if config.growth_score == "random":
            scores = random_score((window.candidates.numel(),), self.module_seed(config.seed) + window.steps)
        else:
            scores = growth_score(
                window.sum_g, window.x_sq[columns] if window.x_sq is not None else None, config.growth_score
            )
        row_length = self.in_features if config.growth_scope == "row" else None
        slots, positions = plan_drop_and_grow(values, indices, window.candidates, scores, n, row_length=row_length)
        if slots.numel() == 0:
            return 0
        reseed = None
        if config.grown_moments == "reseed":
            where = torch.searchsorted(window.candidates.long(), positions.long())  # candidates are sorted
            mean_g, mean_g2 = window.sum_g[where] / window.steps, window.sum_g2[where] / window.steps
            reseed = self._reseed(values, optimizer, mean_g, mean_g2)
        reset_slots(values, slots, optimizer, reseed)
        indices[slots] = positions.to(indices.device)
        return int(slots.numel())

    @staticmethod
    def _reseed(values: torch.Tensor, optimizer, mean_g: torch.Tensor, mean_g2: torch.Tensor) -> dict:
        """``exp_avg = m̄(1−β₁ᵗ)``, ``exp_avg_sq = v̄(1−β₂ᵗ)`` (see class docstring)."""
        if optimizer is None:
            return {}
        inner = unwrap_optimizer(optimizer)
        state = inner.state.get(values, {})
        step = state.get("step")
        betas = next((g.get("betas") for g in inner.param_groups if any(p is values for p in g["params"])), None)
        if step is None or betas is None:
            return {}
        t = float(step)
        return {"exp_avg": mean_g * (1 - betas[0] ** t), "exp_avg_sq": mean_g2 * (1 - betas[1] ** t)}

    @torch.no_grad()
    def _regrow_sm3(self, adapter_name: str, rate: float, optimizer) -> int:
        values, indices = self.values[adapter_name], self.indices[adapter_name]
        state = unwrap_optimizer(optimizer).state.get(values, {}) if optimizer is not None else {}
        if "row_acc" not in state:
            raise TypeError(
                f"SpielConfig(selection_algorithm='sm3') on {self.module_name} needs sparse_peft.SparseSM3 as the "
                f"optimizer (its accumulators score the candidates); got "
                f"{type(unwrap_optimizer(optimizer)).__name__ if optimizer is not None else None}"
            )
        scores = torch.outer(state["row_acc"], state["col_acc"])  # transient (out x in) grow score, no gradient
        n = int(values.numel() * rate)
        pool = topk_positions(scores, min(self.numel, n + values.numel()), seed=self.adapter_configs[adapter_name].seed)
        slots, positions = plan_drop_and_grow(values, indices, pool, scores.reshape(-1)[pool.long()], n)
        if slots.numel() == 0:
            return 0
        reset_slots(values, slots, optimizer)
        indices[slots] = positions.to(indices.device)
        return int(slots.numel())

    # ---- checkpointing of open windows ---------------------------------------------------------------------
    def export_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        window = self._windows.get(adapter_name)
        return window.to_tensors() if window is not None else {}

    def import_state(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
        self._windows[adapter_name] = Window.from_tensors(tensors, self.shape, self.indices[adapter_name])
