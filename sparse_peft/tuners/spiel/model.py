"""The SpIEL tuner: wraps target linear layers in :class:`SpielLinear`."""

from __future__ import annotations

from ..base import SparseTuner
from .layer import SpielLinear


class SpielModel(SparseTuner):
    """Creates a SpIEL model (``get_peft_model(model, SpielConfig(...))``); default targets: every linear layer
    except the LM head."""

    prefix: str = SpielLinear.prefix
    tuner_layer_cls = SpielLinear
    method_name = "SpIEL"
