"""The SMT tuner: wraps target linear layers in :class:`SmtLinear` and sizes their block slots."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..base import SparseTuner
from .layer import SmtLinear, allocate


class SmtModel(SparseTuner):
    """Creates an SMT model (``get_peft_model(model, SmtConfig(...))``); default targets: ``q_proj``, ``k_proj``,
    ``v_proj``. After injecting an adapter, every layer's block storage is sized (global budgets need all target
    matrices) and the layers share one :class:`~sparse_peft.tuners.smt.layer.BlockSelector`."""

    prefix: str = SmtLinear.prefix
    tuner_layer_cls = SmtLinear
    method_name = "SMT"

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        layers = [m for m in model.modules() if isinstance(m, SmtLinear) and adapter_name in m.adapter_configs]
        allocate(layers, adapter_name)
