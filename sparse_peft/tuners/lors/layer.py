"""The LoRS layer: ``W_eff = (W + s·B·A) ⊙ M`` on the shared weight-recompute layer
(:class:`~sparse_peft.tuners.recompute_layer.WeightRecomputeLayer`, which also documents the mask and quantized
bases)."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch

from ...sparse.recompute import FactorGrads
from ...sparse.stats import Window, calibrating
from ..base import from_checkpoint
from ..recompute_layer import WeightRecomputeLayer, kaiming_uniform
from .config import LorsConfig


class LorsLinear(WeightRecomputeLayer):
    """LoRS on one linear layer (Hu et al., 2025, arXiv 2501.08582).

    Forward: ``y = x·W_mᵀ + b`` with ``W_m = W + (s·B·A) ⊙ M``, ``M = (W ≠ 0)``, which equals the paper's
    ``(W + s·B·A) ⊙ M`` because ``W ⊙ M = W``. ``A`` is ``r x in`` (Kaiming-uniform), ``B`` is ``out x r`` (zero),
    PEFT's naming; the reference names them the other way round. Stores ``A`` and ``B`` only (``M`` is recomputed
    from the base, see the module docstring). Saved for backward: ``x``, ``A``, ``B``; ``W_m`` is rebuilt in backward
    (weight recompute). Gradient: ``config.gradient`` (exact masked or the reference's straight-through).
    Merge: ``W ← W + (s·B·A) ⊙ M``. LoRA dropout is not offered: dropout on ``x`` would not keep the fused form.
    """

    prefix = "sparse_peft_lors_"
    factor_names = ("A", "B")
    _adapter_state = ("adapter_configs", "uncalibrated")
    calibrates_at_train_begin = True  # the gradient init changes values only

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.uncalibrated: dict[str, tuple[Optional[float], Optional[int]]] = {}
        super().__init__(*args, **kwargs)

    def init_factors(self, config: LorsConfig) -> dict[str, torch.Tensor]:
        """``A`` Kaiming-uniform, ``B = 0``; the gradient init (``init_lora_weights="gradient"``) replaces ``A`` in
        the calibration pass (:meth:`finish_calibration`)."""
        generator = self._generator(config)
        a = kaiming_uniform(config.r, self.in_features, generator)
        b = torch.zeros(self.out_features, config.r)
        if not config.init_weights:
            b = kaiming_uniform(self.out_features, config.r, generator)
        return {"A": a, "B": b}

    # ---- gradient init, through sparse_peft.calibrate ------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: LorsConfig, **kwargs: Any) -> None:
        super().update_layer(adapter_name, config, **kwargs)
        if config.init_lora_weights == "gradient" and config.init_weights and not from_checkpoint(config):
            self.request_gradient_init(adapter_name)

    def request_gradient_init(self, adapter_name: str, gamma: Optional[float] = None, niter: Optional[int] = None):
        """Make the next calibration pass set this adapter's ``A`` from the gradient (``gamma`` / ``niter``
        override the config's)."""
        self.uncalibrated[adapter_name] = (gamma, niter)

    def calibration_mode(self, adapter_name: str) -> Optional[str]:
        return "gradient" if adapter_name in self.uncalibrated else None

    @torch.no_grad()
    def finish_calibration(self, adapter_name: str, window: Window) -> None:
        """``A = Vᵣᵀ/γ``, ``B = 0`` with ``Vᵣ`` the top-``r`` right singular vectors of the mean masked gradient
        ``Ḡ = (Σ_b gᵀx / batches) ⊙ M`` (randomized SVD, ``q = 4r``, ``init_niter`` power iterations, seeded)."""
        config = self.adapter_configs[adapter_name]
        gamma, niter = self.uncalibrated.pop(adapter_name, (None, None))
        gradient = window.gradient / max(1, window.batches)
        gradient *= self.get_base_weight() != 0
        a, b = self.factors(adapter_name)
        rank = a.shape[0]
        q = min(4 * rank, *gradient.shape)
        devices = [gradient.device.index or 0] if gradient.is_cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.module_seed(config.seed))
            _, _, v = torch.svd_lowrank(gradient, q=q, niter=config.init_niter if niter is None else niter)
        top = torch.zeros(rank, gradient.shape[1], dtype=v.dtype, device=v.device)
        top[: min(rank, v.shape[1])] = v[:, :rank].t()
        a.copy_((top / (config.init_gamma if gamma is None else gamma)).to(a.dtype))
        b.zero_()

    def prepare_load(self, module_key: str, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
        """Loaded factors are final: no gradient init over them."""
        self.uncalibrated.pop(adapter_name, None)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        pending = [n for n in self.active_adapters if n in self.uncalibrated]
        if pending and self.training and torch.is_grad_enabled() and not calibrating():
            warnings.warn(
                f"LorsConfig(init_lora_weights='gradient') on {self.module_name}: adapter(s) {pending} were not "
                f"initialised from the gradient; call sparse_peft.calibrate(model, batches) before training "
                f"(SparsePeftCallback does it on the first batches). Training from Kaiming-uniform A",
                UserWarning,
                stacklevel=2,
            )
            for name in pending:
                self.uncalibrated.pop(name)
        return super().forward(x, *args, **kwargs)

    def apply_adapter(
        self, weight: torch.Tensor, base: torch.Tensor, config: LorsConfig, a: torch.Tensor, b: torch.Tensor
    ) -> torch.Tensor:
        """``(W' + s·B·A) ⊙ M`` for the weight ``W'`` so far (zero wherever ``W`` is, so it equals
        ``W' + (s·B·A) ⊙ M``): one ``addmm`` and one masked fill, in the promoted dtype of ``W'`` and the factors."""
        dtype = torch.promote_types(weight.dtype, b.dtype)
        out = torch.addmm(weight.to(dtype), b.to(dtype), a.to(dtype), alpha=config.scaling)
        return out.masked_fill_(base == 0, 0)

    def factor_grads(self, names: Sequence[str]) -> Optional[FactorGrads]:
        """The exact masked gradient (:func:`_exact_masked`, one ``gᵀx`` shared by every pair) or the reference's
        straight-through one (:func:`_straight_through`)."""
        configs = [self.adapter_configs[name] for name in names]
        if all(c.gradient == "exact" for c in configs):
            return functools.partial(_exact_masked, [c.scaling for c in configs], self.get_base_weight)
        if any(c.gradient == "exact" for c in configs):
            raise ValueError(
                f"active LoRS adapters {list(names)} on {self.module_name} mix gradient='exact' and "
                f"'straight_through'; activate them one at a time or give them the same gradient mode"
            )
        return functools.partial(_straight_through, [c.scaling for c in configs])


def _exact_masked(
    scales: Sequence[float],
    base_fn: Callable[[], torch.Tensor],
    g: torch.Tensor,
    x: torch.Tensor,
    *factors: torch.Tensor,
) -> list[torch.Tensor]:
    """The exact gradient of every ``(A, B)`` pair through ``W_eff = W + Σ_k (s_k·B_k·A_k) ⊙ M``:

    ``G_M = (gᵀx) ⊙ M`` (one dense transient of this layer, masked in place), ``∂L/∂A_k = s_k·B_kᵀ G_M``,
    ``∂L/∂B_k = s_k·G_M A_kᵀ``, in the promoted dtype of ``g`` and the factors (float32 for float32 factors under
    autocast)."""
    dtype = torch.promote_types(g.dtype, factors[0].dtype)
    masked = g.to(dtype).t() @ x.to(dtype)
    masked.masked_fill_(base_fn() == 0, 0)
    grads: list[torch.Tensor] = []
    for i, scale in enumerate(scales):
        a, b = factors[2 * i].to(dtype), factors[2 * i + 1].to(dtype)
        grads.append(scale * (b.t() @ masked))  # ∂L/∂A, r x in
        grads.append(scale * (masked @ a.t()))  # ∂L/∂B, out x r
    return grads


def _straight_through(
    scales: Sequence[float], g: torch.Tensor, x: torch.Tensor, *factors: torch.Tensor
) -> list[torch.Tensor]:
    """The reference's gradient: plain LoRA gradients of each ``(A, B)`` pair, ignoring ``M`` (no ``gᵀx`` formed)."""
    grads: list[torch.Tensor] = []
    for i, scale in enumerate(scales):
        a, b = factors[2 * i].to(g.dtype), factors[2 * i + 1].to(g.dtype)
        grads.append(scale * (g @ b).t() @ x)  # ∂L/∂A, r x in
        grads.append(scale * g.t() @ (x @ a.t()))  # ∂L/∂B, out x r
    return grads
