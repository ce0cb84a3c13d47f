"""Configuration of SNELL: sparse tuning with kernelised LoRA."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..base import SparseConfig


@dataclass
class SnellConfig(SparseConfig):
    """SNELL (Shen et al., NeurIPS 2024, "Expanding Sparse Tuning for Low Memory Usage").

    Each target matrix ``W`` (``m x n``) gets two pairs of low-rank factors of rank ``r/2`` (so ``(m+n)·r``
    parameters, as a rank-``r`` LoRA). They are merged through the piecewise-linear distance kernel
    ``ΔW[o, i] = kernel_scale·(‖B_0[o] − A_0[i]‖ − ‖B_1[o] − A_1[i]‖)``, and at every forward only the entries above
    the ``sparsity``-quantile of ``|ΔW|`` survive, each weighted by its own detached magnitude (the competition):
    ``ΔW_s = ΔW ⊙ stopgrad(|ΔW|) ⊙ 1[|ΔW| > τ]``.

    The adapter is never exactly the identity: ``ΔW = 0`` is a fixed point of the magnitude weighting (no gradient
    reaches the factors there), so the factors start Kaiming-uniform as in the reference code and ``ΔW_s`` starts
    small but non-zero. ``init_weights`` therefore has no effect.

    SNELLA's learnable kernel terms and per-layer sparsity allocation are not implemented.

    Args:
        r: LoRA-equivalent rank, even; each factor pair has rank ``r/2``.
        sparsity: ``s``, the fraction of ``ΔW``'s entries zeroed at every forward, in ``[0, 1)``.
        kernel_scale: ``c``, the fixed scale of the kernel (0.1 in the reference code).
        dropout: dropout on the branch input (the reference uses 0.1 on ViTs).
    """

    method: ClassVar[str] = "snell"
    identity_at_init: ClassVar[bool] = False

    r: int = field(default=8, metadata={"help": "LoRA-equivalent rank (even); two factor pairs of rank r/2."})
    sparsity: float = field(default=0.9, metadata={"help": "Fraction of ΔW zeroed at every forward, in [0, 1)."})
    kernel_scale: float = field(default=0.1, metadata={"help": "Fixed scale c of the distance kernel."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the input of the SNELL branch."})

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        self._check_positive(owner, "r", self.r)
        if self.r % 2:
            raise ValueError(f"{owner}.r must be even (two factor pairs of rank r/2), got {self.r}; use e.g. r=8")
        if isinstance(self.sparsity, bool) or not 0.0 <= float(self.sparsity) < 1.0:
            raise ValueError(f"{owner}.sparsity must be in [0, 1), got {self.sparsity!r}; e.g. 0.9 keeps 10% of ΔW")
        if not float(self.kernel_scale) > 0.0:
            raise ValueError(f"{owner}.kernel_scale must be positive, got {self.kernel_scale!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"{owner}.dropout must be in [0, 1), got {self.dropout!r}")
