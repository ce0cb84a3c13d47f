"""Configuration of RoSA: robust adaptation, a LoRA plus a sparse delta whose mask comes from gradient statistics."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

from peft.utils.other import get_pattern_key

from ..base import SparseConfig, renamed_fields

MASK_SCORES = ("mean_squared", "input_normalized", "mean", "magnitude", "random")
#: The scores that come from per-sample squared gradients (the empirical Fisher).
FISHER_SCORES = ("mean_squared", "input_normalized")
_WARMUP = re.compile(r"wl(\d+)")


@renamed_fields(grad_collection_steps="window_steps")
@dataclass
class RosaConfig(SparseConfig):
    """RoSA (Nikdan et al., ICML 2024, "RoSA: Accurate Parameter-Efficient Fine-Tuning via Robust Adaptation").

    Each target matrix ``W`` (``out x in``) gets a rank-``r`` LoRA ``s·B·A`` and a sparse delta ``S`` with
    ``k = max(1, round(density·out·in))`` entries (``density=0``: no sparse part). The values of ``S`` are allocated
    at creation, so the optimizer state never changes shape; the mask (which entries) is chosen during training by
    :class:`sparse_peft.SparsePeftCallback` (or ``begin_step`` / ``before_optimizer_step`` / ``refresh_masks`` in a
    custom loop) from gradient statistics of ``W``, or read from a file written by :func:`sparse_peft.save_rosa_masks`.

    Schedules (``t`` = optimizer step, 1-based; ``G`` = ``window_steps``):

    * ``"wl{N}"`` (e.g. ``"wl64"``): LoRA only for ``t ≤ N``; LoRA while collecting statistics for ``N < t ≤ N+G``;
      the mask is selected after step ``N+G``; LoRA + sparse after that.
    * ``"default"`` (= ``"wl0"``): collect from step 1.
    * ``"spa_only"``: collect, then train only the sparse values (needs ``r=0``).
    * ``"lora_only"``: LoRA only (needs ``density=0``).

    With ``mask_path`` (or after :func:`sparse_peft.load_rosa_masks`), or with ``mask_score`` ``"magnitude"`` /
    ``"random"``, there is no collection: the sparse values train from step ``N+1``. The paper's two-phase recipe:
    run ``"wl64"`` for 65 steps and :func:`sparse_peft.save_rosa_masks`, then start a fresh run with
    ``schedule="default", mask_path=...``.

    Args:
        r: LoRA rank (0: no LoRA factors).
        lora_alpha: LoRA scale numerator, ``s = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout on the LoRA input.
        density: fraction of each matrix in the sparse delta; 0 disables it.
        density_pattern: per-module overrides of ``density``, keys are regexes like PEFT's ``rank_pattern``.
        schedule: ``"default"``, ``"wl{N}"``, ``"spa_only"`` or ``"lora_only"``.
        mask_score: ``"mean_squared"`` (the paper's: ``F_ij = Σ_i G_i,ij²``, the per-sample squared gradients, an
            empirical diagonal Fisher), ``"input_normalized"`` (``F_ij / Σ_t x_tj²``: the Fisher divided by the
            input feature's energy over the same tokens, :func:`sparse_peft.sparse.select.input_normalized_score`),
            ``"mean"`` (``|mean gradient|``), ``"magnitude"`` (``|W|``) or ``"random"`` (seeded). Measured on the
            built-in task (``benchmarks/README.md``, 2026-12-03): the Fisher's top-k crowds into the columns of
            large input features and its largest-curvature entries, where sparse values at the LoRA rate (1e-3)
            overshoot (per row: 30%, ``"input_normalized"`` 41%; a random mask at that rate: 56%), so the paper's
            score needs the sparse values 10x slower (1e-4: 51-53%).
        mask_scope: ``"matrix"`` (the paper's: the top-``k`` of the score over the whole matrix) or ``"row"`` (every
            row gets its best ``⌊k/out⌋`` or ``⌊k/out⌋+1`` entries;
            :func:`sparse_peft.sparse.select.topk_row_balanced`). On the built-in task, with the sparse values at
            1e-4: ``"row"`` 53% / 52% at training seeds 0 / 1 and 53% at LoRA's budget, ``"matrix"`` 51% / 52% and
            48% (the main job uses ``"row"``).
        window_steps: ``G``, optimizer steps of gradient collection; every micro-batch is one sample.
        mask_path: safetensors file of masks saved by :func:`sparse_peft.save_rosa_masks`; no collection.
        stats_device: where the collection-phase accumulators live (``None``: the layer's device; ``"cpu"`` keeps
            accelerator memory free at the cost of a transfer per micro-batch).
    """

    method: ClassVar[str] = "rosa"
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"mask_scope": ("matrix", "row")}

    r: int = field(default=8, metadata={"help": "LoRA rank; 0 trains the sparse part only."})
    lora_alpha: float = field(default=8, metadata={"help": "LoRA scale s = lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the LoRA input."})
    use_rslora: bool = field(default=False, metadata={"help": "s = lora_alpha / sqrt(r) (rank-stabilized LoRA)."})
    density: float = field(default=0.003, metadata={"help": "Fraction of each matrix in the sparse delta S."})
    density_pattern: dict[str, float] = field(
        default_factory=dict, metadata={"help": "Per-module density overrides, {regex: density}."}
    )
    schedule: str = field(default="wl64", metadata={"help": "'default', 'wl{N}', 'spa_only' or 'lora_only'."})
    mask_score: Literal["mean_squared", "input_normalized", "mean", "magnitude", "random"] = field(
        default="mean_squared", metadata={"help": "How entries are ranked for the mask."}
    )
    mask_scope: Literal["matrix", "row"] = field(
        default="matrix", metadata={"help": "'matrix': top-k over the matrix; 'row': the same count in every row."}
    )
    window_steps: int = field(default=1, metadata={"help": "G: optimizer steps of gradient statistics."})
    mask_path: Optional[str] = field(default=None, metadata={"help": "Masks saved by save_rosa_masks; no collection."})
    stats_device: Optional[str] = field(default=None, metadata={"help": "Device of the collection accumulators."})

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 0:
            raise ValueError(f"{owner}.r must be an integer >= 0 (0: no LoRA factors), got {self.r!r}")
        if not self.lora_alpha > 0:
            raise ValueError(f"{owner}.lora_alpha must be positive, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"{owner}.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        self._check_density(owner, "density", self.density)
        for pattern, value in self.density_pattern.items():
            self._check_density(owner, f"density_pattern[{pattern!r}]", value)
        self._check_positive(owner, "window_steps", self.window_steps)
        if self.mask_score not in MASK_SCORES:
            raise ValueError(f"{owner}.mask_score must be one of {', '.join(MASK_SCORES)}; got {self.mask_score!r}")
        _ = self.warmup_steps  # validates the schedule string
        sparse = self.density > 0 or any(v > 0 for v in self.density_pattern.values())
        if self.r == 0 and not sparse:
            raise ValueError(f"{owner} with r=0 and density=0 trains nothing; set r > 0 or density > 0")
        if self.schedule == "lora_only" and sparse:
            raise ValueError(
                f"{owner}(schedule='lora_only') never trains the sparse values; set density=0 (and no "
                f"density_pattern) or choose schedule='default' / 'wl{{N}}'"
            )
        if self.schedule == "spa_only" and (self.r != 0 or not sparse):
            raise ValueError(
                f"{owner}(schedule='spa_only') trains only the sparse values: set r=0 and density > 0 "
                f"(got r={self.r}, density={self.density})"
            )

    @staticmethod
    def _check_density(owner: str, name: str, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{owner}.{name} must be in [0, 1], got {value!r}; e.g. 0.006 trains 0.6% of each matrix")

    @property
    def warmup_steps(self) -> int:
        """``N`` of ``"wl{N}"``: optimizer steps of LoRA-only training before the sparse part starts (0 otherwise)."""
        if self.schedule in ("default", "df", "spa_only", "lora_only"):
            return 0
        match = _WARMUP.fullmatch(str(self.schedule))
        if match is None:
            raise ValueError(
                f"{type(self).__name__}.schedule must be 'default', 'wl{{N}}' (e.g. 'wl64'), 'spa_only' or "
                f"'lora_only'; got {self.schedule!r}"
            )
        return int(match.group(1))

    @property
    def scaling(self) -> float:
        """The LoRA scale ``s``."""
        if self.r == 0:
            return 1.0
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)

    def density_for(self, module_name: str) -> float:
        """``density``, or the ``density_pattern`` entry whose regex matches ``module_name``."""
        key = get_pattern_key(list(self.density_pattern), module_name)
        return float(self.density_pattern.get(key, self.density))

    @property
    def needs_collection(self) -> bool:
        """Whether the mask comes from gradient statistics collected during training."""
        return self.mask_path is None and self.mask_score in (*FISHER_SCORES, "mean")
