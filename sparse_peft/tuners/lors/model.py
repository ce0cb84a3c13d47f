"""The LoRS tuner: PEFT's entry point that wraps target linear layers in :class:`LorsLinear`."""

from __future__ import annotations

from ..base import SparseTuner
from .layer import LorsLinear


class LorsModel(SparseTuner):
    """Creates a LoRS model (``get_peft_model(model, LorsConfig(...))``); default targets: every linear layer except
    the LM head."""

    prefix: str = LorsLinear.prefix
    tuner_layer_cls = LorsLinear
    method_name = "LoRS"
