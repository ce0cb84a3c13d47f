"""The diff-pruning tuner: wraps target linear layers in :class:`DiffPruningLinear` and owns the global projection."""

from __future__ import annotations

from typing import Optional

import torch
from peft.config import PeftConfig
from torch import nn

from ..base import SparseTuner
from .layer import DiffPruningGroup, DiffPruningLinear


class DiffPruningModel(SparseTuner):
    """Creates a diff-pruning model (``get_peft_model(model, DiffPruningConfig(...))``); default targets: every
    linear layer except the LM head. :class:`sparse_peft.SparsePeftCallback` adds the L0 penalty's gradient and runs
    the projection at ``projection_step``; :meth:`project` runs it by hand."""

    prefix: str = DiffPruningLinear.prefix
    tuner_layer_cls = DiffPruningLinear
    method_name = "diff pruning"

    def _post_injection_hook(self, model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
        layers = [m for m in model.modules() if isinstance(m, DiffPruningLinear)]
        group = DiffPruningGroup(layers)
        for layer in layers:
            layer._group = group

    def _layers(self) -> list[DiffPruningLinear]:
        return [m for m in self.model.modules() if isinstance(m, DiffPruningLinear)]

    def project(self, adapter_name: Optional[str] = None, optimizer: Optional[torch.optim.Optimizer] = None) -> int:
        """Project ``adapter_name`` (default: the active one) to its sparse delta now; pass the optimizer so that
        the dense parameters leave it and the surviving values join it. Returns the number of kept entries."""
        name = adapter_name or self.active_adapters[0]
        layers = self._layers()
        return DiffPruningGroup(layers).project(name, optimizer) if layers else 0

    def l0_penalty(self, adapter_name: Optional[str] = None) -> torch.Tensor:
        """``λ·E[L0]`` summed over the layers still in stage 1 (for logging; its gradient is added by the hooks)."""
        name = adapter_name or self.active_adapters[0]
        terms = [layer.l0_penalty(name) for layer in self._layers() if name in layer.diff]
        return torch.stack(terms).sum() if terms else torch.zeros(())

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: PeftConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Layers still in stage 1 take the stage-3 layout of a projected checkpoint before the keys are mapped."""
        for name, module in model.named_modules():
            if isinstance(module, DiffPruningLinear):
                module.adopt_checkpoint_layout(name, adapter_name, state_dict)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: PeftConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        """PEFT's selection minus the always-empty frozen part: a projected adapter stores values and indices."""
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        return {k: v for k, v in selected.items() if not (f"{cls.prefix}frozen_" in k and v.numel() == 0)}
