"""Configuration of SPP: sparsity-preserved parameter-efficient fine-tuning of pruned models."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..base import SparseConfig


@dataclass
class SppConfig(SparseConfig):
    """SPP (Lu et al., ICML 2024, "SPP: Sparsity-Preserved Parameter-Efficient Fine-Tuning for Large Models").

    Each target weight ``W̃`` (``out x in``, typically pruned) becomes ``W̃ ⊙ (1 + s·β·α̂)``: ``α`` holds ``groups``
    row vectors of length ``in`` (output rows are split into ``groups`` blocks of consecutive rows, each sharing one
    ``α`` row), ``β`` is one scalar per output row and starts at zero. Every zero of ``W̃`` stays zero, also after
    merging. Trainable parameters per matrix: ``groups·in + out``.

    Args:
        groups: ``G``, the number of output-row blocks sharing an ``α`` row (the reference hard-codes 16); must
            divide every target's ``out_features``.
        scaling: ``s``; the reference computes it as ``lora_alpha / r = 16 / 8 = 2``.
    """

    method: ClassVar[str] = "spp"
    positive_ints: ClassVar[tuple[str, ...]] = ("groups",)
    positive_numbers: ClassVar[tuple[str, ...]] = ("scaling",)

    groups: int = field(default=16, metadata={"help": "G: output-row blocks sharing one α row; must divide out."})
    scaling: float = field(default=2.0, metadata={"help": "s in W ⊙ (1 + s·β·α̂) (reference: lora_alpha/r = 2)."})
