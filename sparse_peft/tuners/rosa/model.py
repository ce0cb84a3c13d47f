"""The RoSA tuner, plus the helpers of its recipe: saving / loading masks and separate learning rates."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from ...sparse.masks_file import read_mask, write_masks
from ..base import SparseTuner
from .layer import RosaLinear


class RosaModel(SparseTuner):
    """Creates a RoSA model (``get_peft_model(model, RosaConfig(...))``); default targets: every linear layer except
    the LM head. Train with :class:`sparse_peft.SparsePeftCallback`, which runs the warm-up / collection / sparse
    schedule."""

    prefix: str = RosaLinear.prefix
    tuner_layer_cls = RosaLinear
    method_name = "RoSA"


def rosa_layers(model: nn.Module, adapter_name: str = "default") -> list[RosaLinear]:
    """Every :class:`RosaLinear` of ``model`` that holds ``adapter_name``."""
    return [m for m in model.modules() if isinstance(m, RosaLinear) and adapter_name in m.adapter_configs]


def save_rosa_masks(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> int:
    """Write the final masks of ``adapter_name`` to the safetensors file ``path`` (atomic); returns the module count.

    Phase one of the paper's recipe: train with ``schedule="wl{N}"`` for ``N + window_steps`` optimizer
    steps (the masks are selected at the end of the last one), call this, and start fresh runs with
    ``RosaConfig(schedule="default", mask_path=path)``. Raises ``ValueError`` while a mask is not selected yet.
    """
    layers = rosa_layers(model, adapter_name)
    if not layers:
        raise ValueError(f"the model has no RoSA layers with adapter {adapter_name!r}")
    masks = {}
    for layer in layers:
        if layer.values[adapter_name].numel() == 0:
            continue
        if not layer.is_mask_ready(adapter_name):
            raise ValueError(
                f"the RoSA mask of {layer.module_name} is not selected yet: train past the warm-up and "
                f"window_steps (with SparsePeftCallback or refresh_masks) before saving masks"
            )
        masks[layer.module_name] = (layer.indices[adapter_name], layer.shape)
    write_masks(path, masks)
    return len(masks)


def load_rosa_masks(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> int:
    """Use the masks in ``path`` for ``adapter_name`` (before training): no gradient collection happens, and the
    sparse values train from the first step after the warm-up. Same as ``RosaConfig(mask_path=path)``; returns the
    number of modules set."""
    layers = rosa_layers(model, adapter_name)
    if not layers:
        raise ValueError(f"the model has no RoSA layers with adapter {adapter_name!r}")
    count = 0
    for layer in layers:
        k = layer.values[adapter_name].numel()
        if k == 0:
            continue
        if layer.values[adapter_name].detach().abs().sum() > 0:
            raise ValueError(
                f"adapter {adapter_name!r} of {layer.module_name} has trained sparse values; load masks into a fresh "
                f"adapter (before training)"
            )
        layer.set_mask(adapter_name, read_mask(path, layer.module_name, layer.shape, k))
        count += 1
    return count


def rosa_param_groups(model: nn.Module, lr: float, sparse_lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Optimizer parameter groups with the paper's separate learning rates: ``lr`` for the LoRA factors (and any
    other trainable parameter, e.g. ``modules_to_save``), ``sparse_lr`` for the sparse values. Empty groups are left
    out; only parameters with ``requires_grad`` (the active adapters) are included.

    With transformers / TRL, pass the optimizer itself (the trainer then builds its LR schedule, which scales both
    groups by the same factor)::

        optimizer = torch.optim.AdamW(rosa_param_groups(model, lr=7e-4, sparse_lr=2e-4))
        trainer = SFTTrainer(..., optimizers=(optimizer, None), callbacks=[SparsePeftCallback()])

    (``optimizer_cls_and_kwargs`` cannot carry parameter groups: the trainer builds the groups itself.)
    """
    marker = f"{RosaLinear.prefix}values"
    lora, sparse = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (sparse if marker in name else lora).append(param)
    groups = [
        {"params": lora, "lr": lr, "weight_decay": weight_decay},
        {"params": sparse, "lr": sparse_lr, "weight_decay": weight_decay},
    ]
    return [g for g in groups if g["params"]]


def use_rosa_learning_rates(trainer: Any, sparse_lr: float) -> None:
    """Give a transformers / TRL ``trainer`` (before ``train()``) the optimizer it would build itself (same class and
    settings from its ``args``) over :func:`rosa_param_groups`: the LoRA factors at ``args.learning_rate``, the sparse
    values at ``sparse_lr``. The trainer's schedule then scales both groups by the same factor."""
    from ...groups import use_param_groups

    args = trainer.args
    use_param_groups(trainer, rosa_param_groups(trainer.model, args.learning_rate, sparse_lr, args.weight_decay))
