"""Configuration of SNELL: sparse tuning with kernelised LoRA."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

from ..base import SparseConfig


@dataclass
class SnellConfig(SparseConfig):
    """SNELL (Shen et al., NeurIPS 2024, "Expanding Sparse Tuning for Low Memory Usage").

    Each target matrix ``W`` (``m x n``) gets two pairs of low-rank factors of rank ``r/2`` (so ``(m+n)·r``
    parameters, as a rank-``r`` LoRA). They are merged through the piecewise-linear distance kernel
    ``ΔW[o, i] = kernel_scale·(‖B_0[o] − A_0[i]‖ − ‖B_1[o] − A_1[i]‖)``, and at every forward only the entries above
    the ``sparsity``-quantile of ``|ΔW|`` survive, each weighted by its own detached magnitude (the competition):
    ``ΔW_s = ΔW ⊙ stopgrad(|ΔW|) ⊙ 1[|ΔW| > τ]``.

    Initialisation (``init_weights``):

    * ``True`` (default, the paper's and the reference code's): each factor tensor Kaiming-uniform (``a=√5``) as a
      whole 3-D tensor, so PyTorch's fan-in is ``in·r/2`` (``A``) and ``out·r/2`` (``B``) and the bound
      ``1/√fan_in`` (0.0147 for ``in = 576``, ``r = 16``). ``ΔW_s`` starts tiny but not zero (``‖ΔW_s‖_F ≈ 1e-3``
      on a 576² matrix): ``ΔW = 0`` is a fixed point of the magnitude weighting (no gradient reaches the factors
      there), so the update cannot start at exactly zero.
    * ``"identity"``: the same factors, plus a frozen copy ``(A⁰, B⁰)`` of them whose ``ΔW_s`` is subtracted:
      ``ΔW_s(A, B) − ΔW_s(A⁰, B⁰)``, exactly zero at step 0 while the trainable factors get the paper's gradients.
      It costs one more kernel evaluation per pass and stores the copy (saved with the adapter).
    * ``False``: each 2-D slice Kaiming-uniform on its own (fan-in ``r/2``, factors ~25-40x larger): a visibly
      non-zero delta for tests, not for training.

    Each layer draws its factors from its own seed (``seed`` + a hash of the module name), so same-shaped layers
    start from different factors.

    SNELLA's learnable kernel terms and per-layer sparsity allocation are not implemented.

    Args:
        r: LoRA-equivalent rank, even; each factor pair has rank ``r/2``.
        sparsity: ``s``, the fraction of ``ΔW``'s entries zeroed at every forward, in ``[0, 1)``.
        kernel_scale: ``c``, the fixed scale of the kernel (0.1 in the reference code, tuned on ViTs over 100
            epochs). ``ΔW_s`` grows like ``c²``: on the built-in task (SmolLM2-135M, 100 steps) 0.1 reached 4-10%
            exact match, 1.0 reached 42% and 3.0 57% (LoRA r=16: 54%; ``benchmarks/results/sweeps/snell``), so the
            main job uses 3.0.
        dropout: dropout on the branch input (the reference uses 0.1 on ViTs).
    """

    method: ClassVar[str] = "snell"
    positive_ints: ClassVar[tuple[str, ...]] = ("r",)
    positive_numbers: ClassVar[tuple[str, ...]] = ("kernel_scale",)
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {"init_weights": (True, False, "identity")}
    identity_at_init: ClassVar[bool] = False  # the default init; init_weights="identity" is (starts_as_identity)

    r: int = field(default=8, metadata={"help": "LoRA-equivalent rank (even); two factor pairs of rank r/2."})
    sparsity: float = field(default=0.9, metadata={"help": "Fraction of ΔW zeroed at every forward, in [0, 1)."})
    kernel_scale: float = field(default=0.1, metadata={"help": "Fixed scale c of the distance kernel."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the input of the SNELL branch."})
    init_weights: Union[bool, str] = field(
        default=True,
        metadata={
            "help": "True: the paper's init (tiny non-zero delta). 'identity': also subtract a frozen copy of the "
            "initial delta, so the adapter starts as the identity. False: large per-slice init, for tests."
        },
    )

    @property
    def starts_as_identity(self) -> bool:
        """Whether a fresh adapter leaves the model's outputs unchanged (only with ``init_weights="identity"``)."""
        return self.init_weights == "identity"

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        if self.r % 2:
            raise ValueError(f"{owner}.r must be even (two factor pairs of rank r/2), got {self.r}; use e.g. r=8")
        if isinstance(self.sparsity, bool) or not 0.0 <= float(self.sparsity) < 1.0:
            raise ValueError(f"{owner}.sparsity must be in [0, 1), got {self.sparsity!r}; e.g. 0.9 keeps 10% of ΔW")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"{owner}.dropout must be in [0, 1), got {self.dropout!r}")
