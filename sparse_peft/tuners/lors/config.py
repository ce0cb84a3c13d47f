"""Configuration of LoRS: sparsity-preserving low-rank adaptation with weight recompute."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

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
        init_lora_weights: ``"gradient"`` (the paper's, LoRA-GA-like): ``A = (top-r right singular vectors of the
            mean masked gradient ``Ḡ = mean_b(∂L/∂W_m) ⊙ M``)ᵀ / init_gamma`` and ``B = 0``, set by the calibration
            pass (:func:`sparse_peft.calibrate`, which :class:`sparse_peft.SparsePeftCallback` runs on the first
            training batches; the reference uses 128 samples); until then, and with ``"kaiming"``, ``A`` is
            Kaiming-uniform. Both start as the identity (``B = 0``).
        init_gamma: ``γ``, the divisor of the gradient init (``stable_gamma``, 1 in the reference).
        init_niter: power iterations of its randomized SVD (``q = 4r``; 4 in the reference).
    """

    method: ClassVar[str] = "lors"
    positive_ints: ClassVar[tuple[str, ...]] = ("r",)
    positive_numbers: ClassVar[tuple[str, ...]] = ("lora_alpha", "init_gamma")
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {
        "init_lora_weights": ("gradient", "kaiming"),
        "gradient": ("exact", "straight_through"),
    }

    r: int = field(default=16, metadata={"help": "Rank of B·A."})
    lora_alpha: float = field(default=16, metadata={"help": "Scale numerator: s = lora_alpha/sqrt(r) (rslora)."})
    use_rslora: bool = field(default=True, metadata={"help": "s = lora_alpha/sqrt(r) (reference) or lora_alpha/r."})
    gradient: Literal["exact", "straight_through"] = field(
        default="exact", metadata={"help": "'exact' masked gradient or the reference's 'straight_through' one."}
    )

    init_lora_weights: Literal["gradient", "kaiming"] = field(
        default="gradient", metadata={"help": "'gradient': A from the masked gradient's SVD (calibration); 'kaiming'."}
    )
    init_gamma: float = field(default=1.0, metadata={"help": "Divisor γ of the gradient init: A = Vᵀ/γ."})
    init_niter: int = field(default=4, metadata={"help": "Power iterations of the gradient init's randomized SVD."})

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        if isinstance(self.init_niter, bool) or not isinstance(self.init_niter, int) or self.init_niter < 0:
            raise ValueError(f"{owner}.init_niter must be a non-negative integer, got {self.init_niter!r}")

    @property
    def scaling(self) -> float:
        """``s`` in ``(W + s·B·A) ⊙ M``."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)
