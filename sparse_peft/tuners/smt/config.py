"""Configuration of SMT: fine-tuning the sub-matrix blocks with the largest warm-up gradients."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional, Union

from ..base import SparseConfig, renamed_fields

SCORES = ("mean_abs", "abs_mean", "l1", "l2")


@renamed_fields(warmup_steps="window_steps", block_ratio="density")
@dataclass
class SmtConfig(SparseConfig):
    """SMT (He et al., ICLR 2025, "Sparse Matrix Tuning"; arXiv 2405.15525).

    Each target matrix is cut into a grid of ``block_size`` x ``block_size`` blocks (edge blocks are smaller when the
    size does not divide a dimension). During the first ``window_steps`` optimizer steps each target matrix's weight
    gradient is accumulated in float32 (``G = Σ_t ∂L/∂W``) while the model does not change; then every block is
    scored (``block_score``, default ``mean |G_blk|``) and the top blocks are selected once, either globally across
    all target matrices (``selection="global"``, the paper's default ``no_restriction``) or per matrix
    (``"per_matrix"``). Only the selected blocks train afterwards. The schedule runs through
    :class:`sparse_peft.SparsePeftCallback` (or :func:`sparse_peft.begin_step` / :func:`sparse_peft.refresh_masks`).

    Budget: ``num_blocks`` (global: in total; per_matrix: per matrix), or ``density`` of all target blocks.

    Two ways to select, both from ``Σ ∂L/∂W`` of the frozen model:

    * **Calibration pass** (recommended; the CLI and recipes use it): :func:`sparse_peft.calibrate` on a few
      batches before the optimizer exists. Global selection takes the top ``n`` blocks over all matrices with no
      per-matrix cap (the paper's ``no_restriction``; ``max_blocks_per_matrix`` caps it only if set), and every
      matrix's storage is sized to its selected blocks, so the trainable count is exactly the budget and no step of
      the learning-rate schedule is spent without training.
    * **In-training warm-up** (``window_steps`` optimizer steps through :class:`sparse_peft.SparsePeftCallback`):
      the optimizer already exists, so storage is allocated up front with a fixed shape, per matrix ``capacity``
      slots of ``(b, b)``: per matrix the per-matrix budget; globally ``max_blocks_per_matrix`` or, when None,
      ``⌈2·n/M⌉`` (twice the average over the ``M`` target matrices, raised until the capacities hold ``n``;
      selection skips a matrix whose slots are full). Unused slots stay zero and never train. The blocks see zero
      gradients during the warm-up; their optimizer state is dropped at the selection, so a block's first real
      step is a fresh Adam step. The warm-up steps do use up the start of the learning-rate schedule.

    A training forward before any selection raises an error that names both ways (a plain loop without either
    would train nothing).
    """

    method: ClassVar[str] = "smt"
    positive_ints: ClassVar[tuple[str, ...]] = ("block_size", "num_blocks", "max_blocks_per_matrix", "window_steps")
    fractions: ClassVar[tuple[str, ...]] = ("density",)
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {"selection": ("global", "per_matrix"), "block_score": SCORES}
    needs_one_of: ClassVar[tuple[str, ...]] = ("num_blocks", "density")

    target_modules: Optional[Union[list[str], str]] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj"],
        metadata={"help": "Matrices to cut into blocks; the paper finds attention (V most of all) matters most."},
    )
    block_size: int = field(default=256, metadata={"help": "Side b of the square blocks (edge blocks smaller)."})
    num_blocks: Optional[int] = field(
        default=None, metadata={"help": "Blocks to train: in total (global) or per matrix (per_matrix)."}
    )
    density: Optional[float] = field(
        default=0.05, metadata={"help": "Fraction of all target blocks to train when num_blocks is None."}
    )
    selection: Literal["global", "per_matrix"] = field(
        default="global", metadata={"help": "'global': top blocks across all target matrices; 'per_matrix'."}
    )
    max_blocks_per_matrix: Optional[int] = field(
        default=None, metadata={"help": "Global selection: slots per matrix (None: twice the average)."}
    )
    block_score: Literal["mean_abs", "abs_mean", "l1", "l2"] = field(
        default="mean_abs", metadata={"help": "Block score of the accumulated gradient G: mean|G|, |mean G|, L1, L2."}
    )
    window_steps: int = field(
        default=100, metadata={"help": "Optimizer steps of gradient accumulation before the one-shot selection."}
    )

    block_counts: dict[str, int] = field(
        default_factory=dict,
        metadata={
            "help": "Filled by the calibration pass: selected blocks per module (exact storage). Saved so that "
            "loaders allocate the same sizes; do not set by hand."
        },
    )
