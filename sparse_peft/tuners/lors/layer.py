"""The LoRS layer, and the PEFT layer shared by methods whose weight is rebuilt from the base (LoRS, SPP).

:class:`WeightRecomputeLayer` holds the mechanics (it lives here because LoRS was its first user; SPP imports it):
per-adapter factor ``ParameterDict`` s, a forward through :func:`sparse_peft.sparse.recompute.recomputed_linear`
(nothing ``out x in`` kept for backward), exact merge/unmerge, and the zero pattern of the base.

**The mask.** ``M = (W ≠ 0)`` is never stored: it is recomputed from the base weight whenever the weight is built.
A saved adapter therefore holds only its factors, and reloading it onto the same pruned base gives the same ``M``.
While adapters are merged the layer's forward is the base's own (no mask needed) and :meth:`merge` keeps a copy of
the unmerged weight (on CPU), so the mask of later merges comes from that copy and :meth:`unmerge` restores the base
bit for bit. A merged weight keeps every zero of the base; it can gain a zero where ``W + ΔW`` cancels exactly, so
a new adapter stacked on a ``merge_and_unload`` ed model may see a (slightly) larger zero set than the original.

**Quantized bases (bitsandbytes).** The mask comes from the dequantized weight. NF4 and FP4 both have an exact zero
code, and LLM.int8 rounds to an integer grid containing 0, so a pruned zero dequantizes to exactly 0; small non-zero
weights may dequantize to 0 as well, so ``M`` is a subset of the float base's non-zeros and merges into a
dequantized copy keep every zero of the pruned float base (``tests/test_spp_lors.py`` checks NF4). Merging into
the quantized base itself re-quantizes and is lossy (a warning says so).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn

from ...sparse.recompute import FactorGrads, recomputed_linear
from ...sparse.stats import Window, calibrating
from ..base import SparseConfig, from_checkpoint
from ..layer_base import SparseLayerBase
from .config import LorsConfig


class WeightRecomputeLayer(SparseLayerBase):
    """A linear layer whose weight ``W_eff = f_K(…f_1(W)…)`` applies each active adapter ``k`` in turn.

    Subclasses set ``prefix`` and ``factor_names`` (short names, e.g. ``("A", "B")``; the attributes are
    ``<prefix><name>``) and implement :meth:`init_factors` and :meth:`apply_adapter`; optionally
    :meth:`factor_grads` for a custom (non-exact) gradient.
    """

    prefix: str = "weight_recompute_"
    factor_names: tuple[str, ...] = ()
    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.adapter_layer_names = tuple(f"{cls.prefix}{name}" for name in cls.factor_names)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SparseConfig, module_name: str = "") -> None:
        super().__init__(base_layer, module_name)
        for attr in self.adapter_layer_names:
            setattr(self, attr, nn.ParameterDict({}))
        self._unmerged_weight: Optional[torch.Tensor] = None
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    # ---- method hooks ------------------------------------------------------------------------------------------
    def init_factors(self, config: SparseConfig) -> dict[str, torch.Tensor]:
        """Initial value of every factor (keyed by ``factor_names``) of a new adapter."""
        raise NotImplementedError

    def apply_adapter(
        self, weight: torch.Tensor, base: torch.Tensor, config: SparseConfig, *factors: torch.Tensor
    ) -> torch.Tensor:
        """``f_k(weight)``: the weight after adapter ``k``; ``base`` is the unmerged base weight (for masks)."""
        raise NotImplementedError

    def factor_grads(self, names: Sequence[str]) -> Optional[FactorGrads]:
        """A custom gradient for the factors of ``names`` (see :func:`recomputed_linear`), or None for exact."""
        return None

    # ---- storage -----------------------------------------------------------------------------------------------
    def factors(self, adapter_name: str) -> list[nn.Parameter]:
        return [getattr(self, attr)[adapter_name] for attr in self.adapter_layer_names]

    def _has(self, adapter_name: str) -> bool:
        return adapter_name in getattr(self, self.adapter_layer_names[0])

    def update_layer(self, adapter_name: str, config: SparseConfig, **kwargs: Any) -> None:
        """Create adapter ``adapter_name`` with the factors of :meth:`init_factors`."""
        device, initial = self._weight_device(), self.init_factors(config)
        for short, attr in zip(self.factor_names, self.adapter_layer_names, strict=True):
            getattr(self, attr)[adapter_name] = nn.Parameter(initial[short].to(device))
        self.adapter_configs[adapter_name] = config
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _generator(self, config: SparseConfig) -> torch.Generator:
        return torch.Generator().manual_seed(self.module_seed(config.seed) + 1)

    # ---- the effective weight ----------------------------------------------------------------------------------
    def _build(self, names: Sequence[str], *flat: torch.Tensor) -> torch.Tensor:
        """``W_eff`` of the active adapters ``names`` from their flat factors (forward and backward call this)."""
        base = self.get_base_weight()
        weight, per = base, len(self.factor_names)
        for i, name in enumerate(names):
            weight = self.apply_adapter(weight, base, self.adapter_configs[name], *flat[i * per : (i + 1) * per])
        return weight

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``f_k(W) − W`` of one adapter on the unmerged base ``W``, shape ``(out, in)`` (inspection, LoRA
        conversion); while adapters are merged ``W`` is the copy :meth:`merge` kept, not the merged weight."""
        with torch.no_grad():
            base = self.get_base_weight()
            if self._unmerged_weight is not None:
                base = self._unmerged_weight.to(device=base.device)
            factors = [f.detach() for f in self.factors(adapter_name)]
            return self.apply_adapter(base, base, self.adapter_configs[adapter_name], *factors) - base

    # ---- forward -----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        names = [name for name in self.active_adapters if self._has(name)]
        if self._adapters_off() or self.merged or not names:
            return self.base_layer(x, *args, **kwargs)
        flat = [factor for name in names for factor in self.factors(name)]
        bias = getattr(self.get_base_layer(), "bias", None)
        build = functools.partial(self._build, tuple(names))
        out = recomputed_linear(x, build, flat, bias=bias, factor_grads=self.factor_grads(names))
        return out

    # ---- merge / unmerge ---------------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """``W ← f_k(W)`` for each adapter in turn; the first merge keeps a CPU copy of ``W`` for :meth:`unmerge`."""
        for name in self._adapters_to_merge(adapter_names, keep=self._has):
            weight = self.get_base_weight()
            if self._unmerged_weight is None:
                self._unmerged_weight = weight.detach().to("cpu", copy=True)
            base = self._unmerged_weight.to(weight.device)
            with torch.no_grad():
                factors = [f.detach() for f in self.factors(name)]
                merged = self.apply_adapter(weight, base, self.adapter_configs[name], *factors).to(weight.dtype)
            self._check_merged(merged, name, safe_merge)
            self.set_base_weight(merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Restore the weight saved by the first :meth:`merge` (bit for bit on float bases)."""
        if self._nothing_to_unmerge():
            return
        device = self.get_base_weight().device
        self.set_base_weight(self._unmerged_weight.to(device))
        self._unmerged_weight = None
        self.merged_adapters.clear()


def _kaiming_uniform(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """``nn.init.kaiming_uniform_(a=√5)`` of a ``rows x cols`` matrix (PEFT's LoRA ``A`` init), seeded."""
    bound = 1.0 / math.sqrt(cols)
    return (torch.rand(rows, cols, generator=generator) * 2 - 1) * bound


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
        a = _kaiming_uniform(config.r, self.in_features, generator)
        b = torch.zeros(self.out_features, config.r)
        if not config.init_weights:
            b = _kaiming_uniform(self.out_features, config.r, generator)
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
        delta = (b @ a) * config.scaling
        return weight + delta * (base != 0).to(delta.dtype)

    def factor_grads(self, names: Sequence[str]) -> Optional[FactorGrads]:
        configs = [self.adapter_configs[name] for name in names]
        if all(c.gradient == "exact" for c in configs):
            return None
        if any(c.gradient == "exact" for c in configs):
            raise ValueError(
                f"active LoRS adapters {list(names)} on {self.module_name} mix gradient='exact' and "
                f"'straight_through'; activate them one at a time or give them the same gradient mode"
            )
        return functools.partial(_straight_through, [c.scaling for c in configs])


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
