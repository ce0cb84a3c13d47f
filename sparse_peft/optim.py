"""SM3 for sparse deltas: the memory-light optimizer behind SpIEL-MA."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .sparse.delta import to_rows_cols


class SparseSM3(torch.optim.Optimizer):
    """SM3-II (Anil et al., 2019) with row and column covers of each sparse delta, as SpIEL-MA uses it.

    For a delta on an ``m x n`` weight, ``row_acc`` (length m) and ``col_acc`` (length n) span the whole matrix but
    only active coordinates update them. For slot ``j`` at ``(r, c)`` with gradient ``g``:

    ``ν = min(row_acc[r], col_acc[c]) + g²``; ``row_acc[r] ← max(row_acc[r], ν)``; ``col_acc[c] ← max(col_acc[c], ν)``;
    ``Δ ← Δ − lr·(g / √(ν + eps))`` (through an EMA with ``momentum`` if > 0), and decoupled decay ``Δ ← Δ − lr·wd·Δ``.

    ``row_acc ⊗ col_acc`` then scores inactive positions for regrowth without any dense gradient. Memory: ``m + n``
    floats per matrix instead of Adam's ``2k``.

    Build it from a PEFT model (``SparseSM3(model, lr=...)``), or from parameters and :meth:`bind` it to the model
    (``SparsePeftCallback`` binds an unbound instance at the start of training, so
    ``optimizer_cls_and_kwargs=(SparseSM3, {...})`` works with ``Trainer``).
    """

    def __init__(
        self,
        params: nn.Module | Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 0.1,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        eps: float = 1e-30,
    ) -> None:
        model = params if isinstance(params, nn.Module) else None
        if model is not None:
            params = [p for p in model.parameters() if p.requires_grad]
        if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError(f"SparseSM3 needs lr > 0, 0 <= momentum < 1, weight_decay >= 0; got {lr}, {momentum}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eps": eps})
        self._owners: dict[int, tuple[nn.Module, str]] = {}
        if model is not None:
            self.bind(model)

    @property
    def bound(self) -> bool:
        return bool(self._owners)

    def bind(self, model: nn.Module) -> None:
        """Map each parameter to the sparse layer and adapter whose indices place it."""
        for module in model.modules():
            values = getattr(module, "values", None)
            if not isinstance(values, nn.ParameterDict) or not hasattr(module, "indices"):
                continue
            for adapter, param in values.items():
                self._owners[id(param)] = (module, adapter)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        owner = self._owners.get(id(p))
        if owner is None:
            raise TypeError(
                "SparseSM3 only trains sparse_peft deltas: a parameter is not bound to a sparse layer. Build the "
                "optimizer with SparseSM3(model) or call optimizer.bind(model), and train only the adapter's values."
            )
        layer, adapter = owner
        state = self.state[p]
        if not state:
            state["row_acc"] = torch.zeros(layer.out_features, dtype=torch.float32, device=p.device)
            state["col_acc"] = torch.zeros(layer.in_features, dtype=torch.float32, device=p.device)
            state["step"] = torch.zeros((), dtype=torch.float32)
            if group["momentum"] > 0:
                state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
        state["step"] += 1
        rows, cols = to_rows_cols(layer.indices[adapter], layer.in_features)
        g = p.grad.float()
        nu = torch.minimum(state["row_acc"][rows], state["col_acc"][cols]) + g.square()
        state["row_acc"].scatter_reduce_(0, rows, nu, reduce="amax")
        state["col_acc"].scatter_reduce_(0, cols, nu, reduce="amax")
        update = g / (nu + group["eps"]).sqrt()
        if group["momentum"] > 0:
            buf = state["momentum_buffer"]
            buf.mul_(group["momentum"]).add_(update, alpha=1 - group["momentum"])
            update = buf
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(update.to(p.dtype), alpha=-group["lr"])
