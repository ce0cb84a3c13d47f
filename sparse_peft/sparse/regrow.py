"""Slot surgery: moving a sparse delta's entries without changing tensor identity or size.

A sparse delta keeps ``k`` slots (``values[j]`` at ``indices[j]``). When a mask changes, every slot ``j`` of the new
mask either continues an old slot (``source[j] = i``: its value and optimizer moments are carried over from slot
``i``) or is new (``source[j] = -1``: value and moments start at zero). Tensors are edited in place, so parameter
identity, optimizer param groups, DDP buckets and checkpoints stay valid; per-parameter scalars such as Adam's
``step`` are left alone (the LIFT and SpIEL reference optimizers do not reset bias correction either).
"""

from __future__ import annotations

import torch

# Per-element optimizer state that can be moved slot by slot; anything else that has the parameter's shape is unknown.
SLOT_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "acc_delta", "sum")


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The innermost optimizer under wrappers such as accelerate's ``AcceleratedOptimizer``."""
    while hasattr(optimizer, "optimizer") and optimizer.optimizer is not optimizer:
        optimizer = optimizer.optimizer
    return optimizer


def slot_state(optimizer: torch.optim.Optimizer | None, param: torch.Tensor) -> dict[str, torch.Tensor]:
    """The per-slot state tensors of ``param`` (same shape as ``param``); empty before the first optimizer step.

    Raises a ``TypeError`` naming the key when the optimizer keeps per-element state this module does not know how to
    move, instead of silently leaving it stale.
    """
    if optimizer is None:
        return {}
    state = unwrap_optimizer(optimizer).state.get(param, {})
    slots = {}
    for key, value in state.items():
        if not (isinstance(value, torch.Tensor) and value.shape == param.shape and value.dim() > 0):
            continue
        if key not in SLOT_STATE_KEYS:
            raise TypeError(
                f"optimizer {type(unwrap_optimizer(optimizer)).__name__} keeps per-element state {key!r} that "
                f"sparse_peft cannot move between mask slots; use torch.optim.AdamW/Adam/SGD, or a method "
                f"configuration whose mask does not change during training"
            )
        slots[key] = value
    return slots


def remap_slots(tensor: torch.Tensor, source: torch.Tensor) -> None:
    """In place: ``tensor[j] = tensor_old[source[j]]`` where ``source[j] >= 0``, else 0."""
    keep = source >= 0
    old = tensor.detach().clone()
    with torch.no_grad():
        tensor.zero_()
        tensor[keep] = old[source[keep]]


def remap_parameter(param: torch.Tensor, source: torch.Tensor, optimizer: torch.optim.Optimizer | None) -> int:
    """Move ``param``'s slots and their optimizer moments by ``source`` (see module docstring).

    Returns the number of optimizer-state tensors that were remapped.
    """
    states = slot_state(optimizer, param)
    remap_slots(param, source)
    for tensor in states.values():
        remap_slots(tensor, source)
    return len(states)


def source_map(old_positions: torch.Tensor, new_positions: torch.Tensor) -> torch.Tensor:
    """For each new flat position, the old slot that held it, or -1 (a vectorised set intersection).

    Both inputs hold unique positions; the result has ``new_positions``' length.
    """
    old = old_positions.long()
    new = new_positions.long()
    sorted_old, order = torch.sort(old)
    where = torch.searchsorted(sorted_old, new).clamp(max=max(old.numel() - 1, 0))
    hit = sorted_old[where] == new if old.numel() else torch.zeros_like(new, dtype=torch.bool)
    return torch.where(hit, order[where], torch.full_like(new, -1))
