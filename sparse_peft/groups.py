"""Optimizer parameter groups for methods whose parameters train at different rates.

Some methods train part of their parameters with other optimizer settings than the rest: diff pruning's gate logits
(``log α``) at a large constant learning rate without weight decay (Guo et al.: ``w`` at 1e-5 with a decaying
schedule, ``α`` at 0.1, constant), RoSA's sparse values at their own rate. A layer declares these through
``optimizer_settings()``, a list of ``(parameter, settings)`` with ``settings`` a flat mapping of optimizer group
keys (``lr``, ``weight_decay``) and optionally :data:`CONSTANT_LR` (the group keeps this rate whatever the learning
rate schedule does) or :data:`OWN_DECAY` (the group follows a linear decay of its own, e.g. diff pruning's stage 3:
the paper fine-tunes the projected entries in a run of their own). :func:`param_groups` turns a model into groups,
:func:`use_param_groups` gives a transformers / TRL trainer the optimizer it would build itself over them, and
:func:`keep_constant_rates` (called by :class:`sparse_peft.SparsePeftCallback` and by
:func:`sparse_peft.before_optimizer_step` when given the optimizer) sets the rates of those groups right before each
optimizer step. A group added after the trainer's scheduler was built (stage 3's) is outside the scheduler's reach.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .sparse.regrow import unwrap_optimizer

#: Group key: the group's learning rate stays at this value (the LR schedule is undone before every step).
CONSTANT_LR = "sparse_peft_constant_lr"
#: Group key ``(peak, steps)``: before the group's ``n``-th optimizer step its rate is ``peak·max(0, 1 − (n−1)/steps)``
#: whatever the trainer's schedule does; ``n − 1`` is counted in the group (:data:`OWN_DECAY_DONE`), so it is saved
#: and restored with the optimizer's state.
OWN_DECAY = "sparse_peft_linear_decay"
OWN_DECAY_DONE = "sparse_peft_linear_decay_done"
#: Group key: what the group holds (for logs and for :func:`misplaced_parameters`).
ROLE = "sparse_peft_role"


def declared_settings(model: nn.Module) -> dict[int, tuple[torch.Tensor, dict[str, Any]]]:
    """``id(param) -> (param, settings)`` for every trainable parameter a layer gives settings of its own."""
    found: dict[int, tuple[torch.Tensor, dict[str, Any]]] = {}
    for module in model.modules():
        declare = getattr(module, "optimizer_settings", None)
        if not callable(declare):
            continue
        for param, settings in declare():
            if param.requires_grad:
                found[id(param)] = (param, dict(settings))
    return found


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    extra: Iterable[tuple[torch.Tensor, dict[str, Any]]] = (),
) -> list[dict[str, Any]]:
    """Parameter groups over the trainable parameters of ``model``: ``lr`` and ``weight_decay`` for all of them
    except those whose layer declares settings of their own (or that ``extra`` lists), which get a group per
    distinct setting. Order: the default group first, then the others in the order met; empty groups are left out.

    For a plain PyTorch loop::

        optimizer = torch.optim.AdamW(sparse_peft.param_groups(model, lr=5e-4))
        ...
        sparse_peft.before_optimizer_step(model, optimizer=optimizer)  # keeps constant-rate groups constant
        optimizer.step()
    """
    special = declared_settings(model)
    for param, settings in extra:
        if param.requires_grad:
            special[id(param)] = (param, dict(settings))
    groups: dict[tuple, dict[str, Any]] = {(): {"params": [], "lr": lr, "weight_decay": weight_decay}}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        settings = special.get(id(param), (param, {}))[1]
        key = tuple(sorted(settings.items()))
        group = groups.setdefault(key, {"params": [], "lr": lr, "weight_decay": weight_decay, **settings})
        group["params"].append(param)
    return [group for group in groups.values() if group["params"]]


def use_param_groups(trainer: Any, groups: list[dict[str, Any]] | None = None) -> None:
    """Give a transformers / TRL ``trainer`` (before ``train()``) the optimizer it would build itself (its class and
    settings from ``trainer.args``) over ``groups`` (default: :func:`param_groups` of the trainer's model at
    ``args.learning_rate`` and ``args.weight_decay``). The trainer's LR schedule then scales every group by the same
    factor, except the constant-rate ones, which :class:`sparse_peft.SparsePeftCallback` keeps constant."""
    from transformers import Trainer

    args = trainer.args
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, trainer.model)
    kwargs = {key: value for key, value in kwargs.items() if key not in ("lr", "weight_decay")}
    if groups is None:
        groups = param_groups(trainer.model, args.learning_rate, args.weight_decay)
    trainer.optimizer = optimizer_cls(groups, **kwargs)


def keep_constant_rates(optimizer: torch.optim.Optimizer | None) -> None:
    """Set every group marked :data:`CONSTANT_LR` back to its constant rate, and every group marked
    :data:`OWN_DECAY` to its own schedule's rate for the coming step (call once, right before ``step()``)."""
    if optimizer is None:
        return
    for group in unwrap_optimizer(optimizer).param_groups:
        if CONSTANT_LR in group:
            group["lr"] = group[CONSTANT_LR]
        elif OWN_DECAY in group:
            peak, steps = group[OWN_DECAY]
            done = group.get(OWN_DECAY_DONE, 0)
            group["lr"] = peak * max(0.0, 1.0 - done / steps)
            group[OWN_DECAY_DONE] = done + 1


def misplaced_parameters(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> list[str]:
    """Roles of declared parameters that ``optimizer`` trains with other settings than their layer asks for (e.g.
    the trainer's single group), so the caller can say how to fix it."""
    if optimizer is None:
        return []
    where = {id(p): group for group in unwrap_optimizer(optimizer).param_groups for p in group["params"]}
    roles = []
    for key, (_, settings) in declared_settings(model).items():
        group = where.get(key)
        if group is None:
            continue
        wanted = {k: v for k, v in settings.items() if k != ROLE}
        if any(_group_value(group, k) != v for k, v in wanted.items()):
            roles.append(str(settings.get(ROLE, "a parameter with its own optimizer settings")))
    return sorted(set(roles))


def _group_value(group: dict[str, Any], key: str) -> Any:
    """A group's setting; for ``lr`` the scheduler's base rate (``initial_lr``), not the current, scheduled one."""
    return group.get("initial_lr", group.get("lr")) if key == "lr" else group.get(key)
