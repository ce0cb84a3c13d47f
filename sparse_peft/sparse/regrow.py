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


# Optimizer state that is not per slot even when its length happens to equal k (SM3's row/column covers).
NON_SLOT_STATE_KEYS = ("step", "row_acc", "col_acc")


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
        if key in NON_SLOT_STATE_KEYS or not (
            isinstance(value, torch.Tensor) and value.shape == param.shape and value.dim() > 0
        ):
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


def plan_drop_and_grow(
    values: torch.Tensor,
    indices: torch.Tensor,
    candidates: torch.Tensor,
    scores: torch.Tensor,
    n: int,
    row_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose which slots move where (SpIEL's drop-and-grow); returns ``(slots, new_positions)``.

    * **Drop:** the ``n`` slots with the smallest ``|value|`` (the entries that moved least; ties by slot order).
    * **Grow:** among ``candidates`` that are not active in a kept slot, the ``n`` with the largest ``scores``
      (ties by candidate order). A dropped position that is regrown keeps its slot, value and moments.
    * **Row balance** (``row_length`` = the matrix's column count): growth happens within the rows that dropped, so
      every row keeps its count: row ``i`` grows the ``d_i`` best eligible candidates of row ``i``, ``d_i`` being its
      number of dropped slots. Without it the whole matrix is one group.
    * If fewer positions can grow in a group than it dropped, only that many of its slots change, smallest
      ``|value|`` first.

    Everything is deterministic, so identical inputs give identical plans on every DDP rank.
    """
    k = values.numel()
    n = min(n, k)
    empty = torch.zeros(0, dtype=torch.long, device=indices.device)
    if n <= 0 or candidates.numel() == 0:
        return empty, empty.to(indices.dtype)
    active = indices.long()
    drop = torch.sort(values.detach().abs().float(), stable=True).indices[:n]
    kept = torch.ones(k, dtype=torch.bool, device=indices.device)
    kept[drop] = False
    eligible = ~torch.isin(candidates.long(), active[kept])
    pool, pool_scores = candidates[eligible].long(), scores[eligible].float()
    pool = pool[torch.sort(pool_scores, descending=True, stable=True).indices]

    def group(positions: torch.Tensor) -> torch.Tensor:
        return positions // row_length if row_length else torch.zeros_like(positions)

    groups = int(max(group(active).max(), group(pool).max() if pool.numel() else 0)) + 1
    dropped_per_group = torch.bincount(group(active[drop]), minlength=groups)
    incoming = first_per_group(pool, group(pool), dropped_per_group)
    regrown = torch.isin(active[drop], incoming)  # outgoing and incoming: stays where it is
    moving_slots = drop[~regrown]  # still in ascending |value| order
    fresh = incoming[~torch.isin(incoming, active[drop])]
    fresh_per_group = torch.bincount(group(fresh), minlength=groups)
    moving_slots = first_per_group(moving_slots, group(active[moving_slots]), fresh_per_group)
    fresh = fresh[torch.sort(group(fresh), stable=True).indices]
    moving_slots = moving_slots[torch.sort(group(active[moving_slots]), stable=True).indices]
    return moving_slots, fresh.to(indices.dtype)


def first_per_group(items: torch.Tensor, groups: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The first ``counts[g]`` of ``items`` in each group ``g``, keeping their order (``groups[i]`` is item i's)."""
    if items.numel() == 0:
        return items
    by_group = torch.sort(groups, stable=True).indices
    sorted_groups = groups[by_group]
    starts = torch.cumsum(torch.bincount(sorted_groups, minlength=counts.numel()), 0) - torch.bincount(
        sorted_groups, minlength=counts.numel()
    )
    rank = torch.arange(items.numel(), device=items.device) - starts[sorted_groups]
    chosen = by_group[rank < counts[sorted_groups]]
    return items[torch.sort(chosen).values]


def reset_slots(
    param: torch.Tensor,
    slots: torch.Tensor,
    optimizer: torch.optim.Optimizer | None,
    reseed: dict[str, torch.Tensor] | None = None,
) -> None:
    """Zero ``param[slots]`` and its per-slot optimizer state, or set state key ``key`` to ``reseed[key]``."""
    source = torch.arange(param.numel(), device=param.device)
    source[slots] = -1
    states = slot_state(optimizer, param)
    remap_parameter(param, source, optimizer)
    for key, value in (reseed or {}).items():
        if key in states:
            with torch.no_grad():
                states[key][slots] = value.to(states[key].dtype)
