"""Configuration of diff pruning: L0-gated dense diffs, projected to a sparse delta, then fine-tuned."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional

from ..base import SparseConfig, renamed_fields


@renamed_fields(target_density="density")
@dataclass
class DiffPruningConfig(SparseConfig):
    """Diff pruning (Guo, Rush and Kim, ACL 2021, "Parameter-Efficient Transfer Learning with Diff Pruning").

    Three stages, driven by :class:`sparse_peft.SparsePeftCallback` (or the custom-loop hooks):

    1. **Gated dense diff** (steps ``1 … projection_step``): ``W + z ⊙ w`` with dense ``w`` (init 0) and a
       hard-concrete gate ``z`` per entry (logits ``log α``, init ``log_alpha_init``, stretch ``(gate_left,
       gate_right)``), optionally times one gate per matrix (``structured``). The expected-L0 penalty
       ``l0_lambda · Σ P(z ≠ 0)`` is added to the gradient of ``log α`` once per optimizer step.
    2. **Projection** (after optimizer step ``projection_step``): one global magnitude threshold on the deterministic
       gated diff keeps exactly ``round(density · N)`` entries, ``N`` = all entries of all targeted matrices.
    3. **Fixed-mask fine-tuning**: the survivors become a sparse delta (values + indices); ``w`` and ``log α`` are
       dropped from the model and the optimizer.

    Args:
        density: fraction of all targeted weights kept by the projection (0.005 in the paper).
        projection_step: project after this optimizer step; ``None`` = only when called
            (``DiffPruningModel.project``).
        l0_lambda: weight ``λ`` of the expected-L0 penalty (1.25e-7 in the paper; 0 disables it).
        log_alpha_init: initial gate logit (5 in the paper: gates start open).
        gate_left, gate_right: stretch limits ``l < 0`` and ``r > 1`` of the hard-concrete gate (−1.5, 1.5).
        gate_temperature: ``β`` of the hard-concrete distribution (1 in the reference code).
        gate_lr: learning rate of the gate logits, constant and without weight decay (the paper: ``α`` at 0.1 with
            its own optimizer whose schedule never steps, ``w`` at 1e-5 with linear decay; weight decay would pull
            ``log α`` to 0 and close the gates). The gates get this group from :func:`sparse_peft.param_groups` /
            :func:`sparse_peft.use_param_groups`; ``None`` trains them with ``w``'s settings (at ``w``'s rate the
            logits barely move from ``log_alpha_init``: ~0.02 in 50 steps, so the L0 penalty does nothing).
        structured: add one gate per matrix (the paper's structured diff pruning).
        finetune_lr_scale: stage 3's values train in an optimizer group of their own, at ``finetune_lr_scale`` times
            the rate stage 1's diff started from, decaying linearly to 0 over the remaining steps: the paper
            fine-tunes the projected entries in a run of its own at 5x stage 1's rate (5e-5 after 1e-5). None: they
            join the diff's group and the trainer's schedule goes on (its decayed tail).
        finetune_init: stage-3 start values: ``"gated"`` (``z̄·w``, the projected function itself) or ``"raw"``
            (``w``, as the reference code does).
        projected_counts: filled at projection: per module, how many entries survived. Saved so that loaders build
            the stage-3 layers directly; do not set by hand.
    """

    method: ClassVar[str] = "diff_pruning"
    fractions: ClassVar[tuple[str, ...]] = ("density",)
    positive_ints: ClassVar[tuple[str, ...]] = ("projection_step",)
    positive_numbers: ClassVar[tuple[str, ...]] = ("gate_temperature", "gate_lr", "finetune_lr_scale")
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {"finetune_init": ("gated", "raw")}

    density: float = field(default=0.005, metadata={"help": "Fraction of all targeted weights kept."})
    projection_step: Optional[int] = field(
        default=None, metadata={"help": "Project to the sparse delta after this optimizer step (None: manual)."}
    )
    l0_lambda: float = field(default=1.25e-7, metadata={"help": "Weight of the expected-L0 penalty."})
    log_alpha_init: float = field(default=5.0, metadata={"help": "Initial gate logit log α."})
    gate_left: float = field(default=-1.5, metadata={"help": "Stretch limit l < 0 of the hard-concrete gate."})
    gate_right: float = field(default=1.5, metadata={"help": "Stretch limit r > 1 of the hard-concrete gate."})
    gate_temperature: float = field(default=1.0, metadata={"help": "Temperature β of the hard-concrete gate."})
    gate_lr: Optional[float] = field(
        default=0.1, metadata={"help": "Constant learning rate of the gate logits, no weight decay (None: as w)."}
    )
    structured: bool = field(default=False, metadata={"help": "One extra gate per matrix (structured variant)."})
    finetune_lr_scale: Optional[float] = field(
        default=5.0,
        metadata={"help": "Stage 3's own rate: this times stage 1's, decaying to 0 (None: the trainer's schedule)."},
    )
    finetune_init: Literal["gated", "raw"] = field(
        default="gated", metadata={"help": "Stage-3 start values: 'gated' (z̄·w) or 'raw' (w)."}
    )
    projected_counts: dict[str, int] = field(
        default_factory=dict,
        metadata={"help": "Filled at projection: surviving entries per module (for loaders); do not set by hand."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        if not float(self.l0_lambda) >= 0.0:
            raise ValueError(f"{owner}.l0_lambda must be >= 0, got {self.l0_lambda!r}; 0 disables the penalty")
        if not (float(self.gate_left) < 0.0 and float(self.gate_right) > 1.0):
            raise ValueError(
                f"{owner} needs gate_left < 0 and gate_right > 1 (the stretch that lets gates reach exactly 0 and 1), "
                f"got gate_left={self.gate_left}, gate_right={self.gate_right}; the paper uses -1.5 and 1.5"
            )
