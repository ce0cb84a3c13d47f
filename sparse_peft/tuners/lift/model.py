"""The LIFT tuner: PEFT's entry point that wraps target linear layers in :class:`LiftLinear`."""

from __future__ import annotations

from ..base import SparseTuner
from .layer import LiftLinear


class LiftModel(SparseTuner):
    """Creates a LIFT model from a transformers model (``get_peft_model(model, LiftConfig(...))``).

    Default targets: every linear layer except the LM head (``target_modules="all-linear"``).
    """

    prefix: str = LiftLinear.prefix
    tuner_layer_cls = LiftLinear
    method_name = "LIFT"
