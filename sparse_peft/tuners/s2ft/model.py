"""The S²FT tuner: wraps target linear layers in :class:`S2FTLinear`, with the model's head layout."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional, Union

import torch
from torch import nn

from ..base import SparseTuner
from .layer import AttentionShape, S2FTLinear


class S2FTModel(SparseTuner):
    """Creates an S²FT model (``get_peft_model(model, S2ftConfig(...))``); default targets: ``v_proj``, ``o_proj``,
    ``up_proj``, ``down_proj``. The head layout (heads, KV heads, head_dim) is read from the model config."""

    prefix: str = S2FTLinear.prefix
    tuner_layer_cls = S2FTLinear
    method_name = "S2FT"

    def _attention_shape(self) -> Optional[AttentionShape]:
        config = getattr(self.model, "config", None)
        if config is not None and hasattr(config, "get_text_config"):
            config = config.get_text_config()
        heads = getattr(config, "num_attention_heads", None)
        if not heads:
            return None
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        if heads % kv:
            raise ValueError(f"S2FT: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
        return AttentionShape(heads, kv, head_dim)

    def _layer_kwargs(self) -> dict[str, Any]:
        return {"attention": self._attention_shape()}


def calibrate_s2ft(
    model: nn.Module,
    batches: Iterable[Union[torch.Tensor, dict]],
    adapter_name: str = "default",
    group: Any = None,
) -> int:
    """Choose (again) the S²FT units of ``adapter_name`` by activation or gradient statistics over ``batches``
    through the calibration pass (:func:`sparse_peft.calibrate`); returns the number of layers re-selected (random
    and weight selection need no calibration and return 0)."""
    from ...calibrate import calibrate

    layers = [m for m in model.modules() if isinstance(m, S2FTLinear) and adapter_name in m.adapter_configs]
    layers = [m for m in layers if m.adapter_configs[adapter_name].selection in ("activation", "gradient")]
    for layer in layers:
        layer.uncalibrated.add(adapter_name)
    return calibrate(model, batches, adapter_name, group).get(S2FTLinear.__name__, 0) if layers else 0
