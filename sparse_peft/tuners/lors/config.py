"""Configuration of LoRS: sparsity-preserving low-rank adaptation with weight recompute."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from ..base import SparseConfig


@dataclass
class LorsConfig(SparseConfig):
    """LoRS (Hu et al., 2025, arXiv 2501.08582, "LoRS: Efficient Low-Rank Adaptation for Sparse Large Language Model").

    Each target weight ``W`` (``out x in``, typically pruned, mask ``M = (W ≠ 0)``) becomes
    ``W_m = (W + s·B·A) ⊙ M`` with ``A`` (``r x in``) and ``B`` (``out x r``, zero at start), so every zero of ``W``
    stays zero, also after merging. ``s = lora_alpha/√r`` (``use_rslora=True``, as the reference) or
    ``lora_alpha/r``.

    Args:
        r: rank of ``B·A``.
        lora_alpha: numerator of the scale ``s``.
        use_rslora: ``s = lora_alpha/√r`` (reference) instead of ``lora_alpha/r``.
        gradient: ``"exact"``: the true gradient of the masked weight, ``∂L/∂A = s·Bᵀ((gᵀx) ⊙ M)`` and
            ``∂L/∂B = s·((gᵀx) ⊙ M)·Aᵀ``, which forms the dense ``gᵀx`` as a transient of one layer in backward;
            ``"straight_through"``: the reference code's gradient, plain LoRA gradients that ignore ``M``
            (``∂L/∂A = s·(g·B)ᵀx``, ``∂L/∂B = s·gᵀ(x·Aᵀ)``), which never forms an ``out x in`` tensor in backward.
            The reference also drops ``s`` there; we keep it (it only rescales Adam's inputs).
    """

    method: ClassVar[str] = "lors"

    r: int = field(default=16, metadata={"help": "Rank of B·A."})
    lora_alpha: float = field(default=16, metadata={"help": "Scale numerator: s = lora_alpha/sqrt(r) (rslora)."})
    use_rslora: bool = field(default=True, metadata={"help": "s = lora_alpha/sqrt(r) (reference) or lora_alpha/r."})
    gradient: Literal["exact", "straight_through"] = field(
        default="exact", metadata={"help": "'exact' masked gradient or the reference's 'straight_through' one."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        self._check_positive(owner, "r", self.r)
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ValueError(f"{owner}.lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if self.gradient not in ("exact", "straight_through"):
            raise ValueError(f"{owner}.gradient must be 'exact' or 'straight_through', got {self.gradient!r}")

    @property
    def scaling(self) -> float:
        """``s`` in ``(W + s·B·A) ⊙ M``."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)
