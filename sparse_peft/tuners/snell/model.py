"""The SNELL tuner: wraps target linear layers in :class:`SnellLinear`."""

from __future__ import annotations

from ..base import SparseTuner
from .layer import SnellLinear


class SnellModel(SparseTuner):
    """Creates a SNELL model (``get_peft_model(model, SnellConfig(...))``); default targets: every linear layer
    except the LM head."""

    prefix: str = SnellLinear.prefix
    tuner_layer_cls = SnellLinear
    method_name = "SNELL"
