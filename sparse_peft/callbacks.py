"""Trainer callbacks that drive what happens between optimizer steps.

Works unchanged with ``transformers.Trainer`` and TRL's ``SFTTrainer`` / ``DPOTrainer``: pass
``callbacks=[SparsePeftCallback()]`` (or ``trainer.add_callback(...)``). Mask surgery runs in ``on_step_end``, after
the optimizer step and ``zero_grad``, on the unwrapped PEFT model and accelerate's optimizer wrapper, whose
``.state`` is the inner optimizer's, so moments move with their slots.

Every decision is a pure function of the weights and ``global_step``, so DDP ranks (which hold identical weights)
make identical decisions, and a run resumed from a checkpoint repeats the uninterrupted run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger(__name__)


def refreshable_layers(model: nn.Module) -> Iterator[nn.Module]:
    """Layers of ``model`` whose masks can change during training (they define ``refresh_mask``)."""
    for module in model.modules():
        if callable(getattr(module, "refresh_mask", None)) and callable(getattr(module, "refresh_due", None)):
            yield module


def refresh_masks(model: nn.Module, global_step: int, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Refresh every adapter mask that is due after optimizer step ``global_step``; returns slots changed.

    Only active, unmerged, enabled adapters are refreshed: a frozen adapter does not train, so its mask stays.
    """
    changed = 0
    for layer in refreshable_layers(model):
        if layer.disable_adapters or layer.merged:
            continue
        for name in layer.active_adapters:
            if name in layer.values and layer.refresh_due(name, global_step):
                changed += layer.refresh_mask(name, optimizer)
    return changed


class SparsePeftCallback(TrainerCallback):
    """Runs the sparse methods' schedules: LIFT's periodic mask refresh (and later methods' regrowth)."""

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            return
        changed = refresh_masks(model, state.global_step, optimizer)
        if changed:
            logger.info("step %d: sparse masks refreshed, %d slots moved", state.global_step, changed)
