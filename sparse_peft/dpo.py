"""DPO with sparse adapters: keeping TRL's reference adapter an exact copy.

When ``DPOTrainer`` receives an already wrapped ``PeftModel`` (and no ``ref_model``), TRL adds an adapter named
``"ref"`` with the same config and copies only parameters whose name contains ``".default."``. sparse_peft layers keep
per-adapter tensors in ``ParameterDict`` / ``BufferDict`` containers, whose names *end* in ``.default``, and their masks
are buffers, so TRL copies nothing: the reference becomes a freshly initialised adapter with other positions, and the
first DPO loss is no longer ``ln 2``. :func:`sync_reference_adapter` copies every per-adapter tensor (trainable values,
factors, index buffers, frozen parts) from ``default`` to ``ref``. :class:`sparse_peft.SparsePeftCallback` applies it at
the start of training, so ``DPOTrainer(..., callbacks=[SparsePeftCallback()])`` is correct without further code.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import nn

REFERENCE_ADAPTER = "ref"


def _adapter_layers(model: nn.Module) -> Iterator[nn.Module]:
    for module in model.modules():
        if hasattr(module, "adapter_configs") and hasattr(module, "adapter_layer_names"):
            yield module


def _copy_entry(container: nn.Module, source: str, target: str) -> None:
    """``container[target] ← container[source]`` (same shape: in place; other shape, e.g. a frozen part: replaced)."""
    src = container[source]
    if isinstance(src, nn.Module):
        container[target].load_state_dict(src.state_dict())
        return
    dst = container[target] if target in container else None
    with torch.no_grad():
        if dst is not None and dst.shape == src.shape and dst.dtype == src.dtype:
            dst.copy_(src)
        elif isinstance(src, nn.Parameter):
            container[target] = nn.Parameter(src.detach().clone(), requires_grad=False)
        else:
            container[target] = src.detach().clone()


def sync_reference_adapter(model: nn.Module, source: str = "default", target: str = REFERENCE_ADAPTER) -> int:
    """Make adapter ``target`` an exact copy of adapter ``source`` in every sparse_peft layer; returns layers synced.

    Copies the tensors named by each layer's ``adapter_layer_names`` and ``other_param_names`` (values **and** index
    buffers) and the layer's per-adapter config, and mirrors which containers hold the adapter (a diff-pruning
    adapter that was projected keeps values and indices instead of its dense stage-1 tensors, while TRL's fresh
    ``ref`` starts in stage 1). The copy stays frozen (``requires_grad=False``). Layers without the target adapter are
    skipped, so calling this on a model without a reference adapter is a no-op.
    """
    synced = 0
    for layer in _adapter_layers(model):
        names = (*layer.adapter_layer_names, *layer.other_param_names)
        containers = [getattr(layer, n) for n in names if isinstance(getattr(layer, n, None), nn.Module)]
        if not any(target in c for c in containers) or not any(source in c for c in containers):
            continue
        for container in containers:
            if source in container:
                _copy_entry(container, source, target)
            elif target in container:
                del container[target]
        layer.adapter_configs[target] = copy.deepcopy(layer.adapter_configs[source])
        for container in containers:
            if target in container and isinstance(container[target], (nn.Parameter, nn.Module)):
                container[target].requires_grad_(False)
        cache = getattr(layer, "_pattern_cache", None)
        if isinstance(cache, dict):
            cache.pop(target, None)
        synced += 1
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict) and source in peft_config and target in peft_config:
        peft_config[target] = copy.deepcopy(peft_config[source])
    return synced
