"""Swapping parameters inside a live optimizer (a method that changes *which* tensors it trains mid-run).

Diff pruning trains dense diffs and gate logits, then continues with a compact vector of surviving values. The old
tensors must leave the optimizer (param groups and state) so that they can be freed, and the new ones must join the
param group the old ones were in, so that learning-rate schedules keep applying to them. No PEFT imports here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .regrow import unwrap_optimizer


def replace_parameters(
    optimizer: torch.optim.Optimizer | None, old: Sequence[torch.Tensor], new: Sequence[torch.Tensor]
) -> bool:
    """Remove ``old`` from ``optimizer`` (every group holding any of them, and the state) and insert ``new`` where
    the first of them was (so ``new`` gets that group's settings and schedule).

    Returns False (and changes nothing) when none of ``old`` is in the optimizer, e.g. an inactive adapter. Fresh
    parameters start without state (Adam's moments are created at their first step).
    """
    if optimizer is None:
        return False
    inner = unwrap_optimizer(optimizer)
    old_ids = {id(p) for p in old}
    placed = False
    for group in inner.param_groups:
        params = group["params"]
        hits = [i for i, p in enumerate(params) if id(p) in old_ids]
        if not hits:
            continue
        kept = [p for p in params if id(p) not in old_ids]
        if not placed:
            before = sum(1 for p in params[: hits[0]] if id(p) not in old_ids)
            kept = kept[:before] + list(new) + kept[before:]
            placed = True
        group["params"] = kept
    if placed:
        for p in old:
            inner.state.pop(p, None)
    return placed
