"""The SPP tuner: PEFT's entry point that wraps target linear layers in :class:`SppLinear`."""

from __future__ import annotations

from ..base import SparseTuner
from .layer import SppLinear


class SppModel(SparseTuner):
    """Creates an SPP model (``get_peft_model(model, SppConfig(...))``); default targets: every linear layer except
    the LM head."""

    prefix: str = SppLinear.prefix
    tuner_layer_cls = SppLinear
    method_name = "SPP"
