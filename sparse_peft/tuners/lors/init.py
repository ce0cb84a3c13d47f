"""LoRS's gradient-SVD initialization (LoRA-GA-like), from a few training batches."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Optional

import torch
from torch import nn

from .layer import LorsLinear


def lors_gradient_init(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    adapter_name: str = "default",
    gamma: Optional[float] = None,
    niter: Optional[int] = None,
    group: Optional[Any] = None,
) -> int:
    """Initialize every LoRS adapter ``adapter_name`` of ``model`` from the gradient of the loss (again, if it was
    already); returns the count. ``gamma`` / ``niter`` override the config's ``init_gamma`` / ``init_niter``.

    For each LoRS layer, ``Ḡ`` is the mean over ``batches`` of ``∂L/∂W_m ⊙ M`` (the gradient of the masked weight
    on the entries that can move); then ``A = (top-r right singular vectors of Ḡ)ᵀ / gamma`` (randomized SVD,
    ``q = 4r``, ``niter`` power iterations, as the reference) and ``B = 0``, so the model's outputs are unchanged.
    The reference SVDs the unmasked gradient; masking follows the paper's intent that only ``M`` is trained.

    Runs through the calibration pass (:func:`sparse_peft.calibrate`); the adapter must be active. Memory: one
    float32 ``out x in`` gradient sum per LoRS layer while it runs (the reference's cost), freed on return. Under
    ``torch.distributed`` the sums are reduced over ``group`` so every rank gets the same initialization.
    """
    from ...calibrate import calibrate

    layers = [m for m in model.modules() if isinstance(m, LorsLinear) and m._has(adapter_name)]
    if not layers:
        raise ValueError(f"lors_gradient_init: the model has no LoRS adapter named {adapter_name!r}")
    if any(adapter_name not in m.active_adapters for m in layers):
        raise ValueError(f"lors_gradient_init: adapter {adapter_name!r} is not active; call set_adapter first")
    for layer in layers:
        layer.request_gradient_init(adapter_name, gamma, niter)
    return calibrate(model, batches, adapter_name, group).get(LorsLinear.__name__, 0)
