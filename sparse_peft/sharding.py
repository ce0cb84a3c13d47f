"""Training on a sharded model (FSDP, DeepSpeed ZeRO): what works, and a clear refusal for what does not.

Under FSDP2 (``fully_shard``, accelerate's ``fsdp_version: 2``) every parameter of a wrapped unit, the adapters'
values included, is a ``DTensor`` of which each rank holds one shard outside the unit's forward and backward; integer
index buffers are not sharded (every rank keeps the whole buffer). Static-mask training needs nothing else: the
forward runs inside the unit, on the gathered weights, and the optimizer steps each rank's shard.

Mask changes come in two kinds. A *first choice* of the mask before the values have trained (RoSA's selection from
gradient statistics or a seeded random mask, SMT's warm-up selection with zero-initialised blocks) writes only the
index buffers, from statistics that are all-reduced (so every rank writes the same), and resets the values and their
optimizer state elementwise: that is local to each shard and runs under FSDP2. *Mask surgery* on trained values (a
LIFT refresh, SpIEL's drop-and-regrow, diff pruning's projection) and the train-start calibrations (LoRS's gradient
init, S²FT's data-driven units, SpIEL's calibrated initial mask) read and rewrite whole value tensors, or the base
weight, while a rank holds only a shard of them: refused. FSDP1 hands out flat local shards of the parameters, and
DeepSpeed's ZeRO optimizers keep their own fp32 master copy and optimizer state as flat partitions (an in-place edit
of a parameter is overwritten at the next step; the moments cannot be found per parameter; ZeRO-3 also partitions
the parameters themselves): under those, every mask change is refused.

:func:`check_sharded_training` (called by :class:`sparse_peft.SparsePeftCallback` when training begins; call it
yourself in a custom loop) raises :class:`ShardedTrainingError` naming the wrapper, what would move, and the
alternatives, before any step runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Optional

from torch import nn

from .tuners.layer_base import SparseLayerBase


@dataclass(frozen=True)
class MaskChange:
    """A mask change one layer's adapter makes during a run.

    ``shard_local``: the change writes only replicated index buffers (from all-reduced statistics or a seed) and
    resets values and optimizer state elementwise, so it runs on FSDP2's local shards.
    """

    reason: str
    shard_local: bool = False


@dataclass(frozen=True)
class Sharding:
    """What shards a model: ``kind`` (``"fsdp2"``, ``"fsdp1"``, ``"dtensor"``, ``"zero3"``, ``"deepspeed"``) and a
    description for messages."""

    kind: str
    description: str

    @property
    def shard_local_changes(self) -> bool:
        """Whether shard-local mask changes (:attr:`MaskChange.shard_local`) run under this sharding (FSDP2 only:
        its units gather whole weights for the forward, so the statistics behind a choice are the unsharded ones)."""
        return self.kind == "fsdp2"


#: ``(layer, adapter, total_steps) -> the mask change in this run, or None when the mask is static``.
MaskRule = Callable[[Any, str, int], Optional[MaskChange]]

#: The ways a layer's schedule hooks can be overridden; a layer that overrides none of them has a static mask.
_HOOKS = ("on_step_begin", "on_pre_optimizer_step", "on_step_end")


class ShardedTrainingError(RuntimeError):
    """Training asks for mask changes (or a train-start calibration) on a model whose parameters are sharded."""


def _deepspeed_optimizer(optimizer: Any) -> Optional[str]:
    """The class name of a DeepSpeed optimizer inside ``optimizer``'s wrappers (accelerate's, DeepSpeed's), or None."""
    seen: set[int] = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        if type(optimizer).__module__.startswith("deepspeed."):
            return type(optimizer).__name__
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def sharded_by(model: nn.Module, optimizer: Any = None) -> Optional[Sharding]:
    """What shards ``model``'s parameters or optimizer state, or None (one process, DDP).

    Recognised: FSDP2 (``fully_shard``), FSDP1 (``FullyShardedDataParallel``), other ``DTensor`` parameters (tensor
    parallelism), DeepSpeed ZeRO-3 (partitioned parameters carry ``ds_id``) and DeepSpeed's ZeRO / mixed-precision
    optimizers (master weights and state kept by DeepSpeed, found through ``optimizer``'s wrappers).
    """
    fsdp2: Optional[type] = None
    fsdp1: Optional[type] = None
    dtensor: Optional[type] = None
    try:
        from torch.distributed.fsdp import FSDPModule as fsdp2
        from torch.distributed.fsdp import FullyShardedDataParallel as fsdp1
        from torch.distributed.tensor import DTensor as dtensor
    except ImportError:  # torch built without distributed support: nothing can be sharded
        pass
    for module in model.modules():
        if fsdp2 is not None and isinstance(module, fsdp2):
            return Sharding("fsdp2", "FSDP2 (fully_shard)")
        if fsdp1 is not None and isinstance(module, fsdp1):
            return Sharding("fsdp1", "FSDP1 (FullyShardedDataParallel)")
    for param in model.parameters():
        if hasattr(param, "ds_id"):
            return Sharding("zero3", "DeepSpeed ZeRO-3 (partitioned parameters)")
        if dtensor is not None and isinstance(param, dtensor):
            return Sharding("dtensor", "DTensor-sharded parameters")
    name = _deepspeed_optimizer(optimizer)
    if name is not None:
        return Sharding("deepspeed", f"DeepSpeed ({name}: master weights and optimizer state kept by DeepSpeed)")
    return None


# ---- per method: does the mask change during this run? -----------------------------------------------------------
def _lift(layer: Any, name: str, total: int) -> Optional[MaskChange]:
    interval = layer.adapter_configs[name].update_interval
    if interval and (not total or interval <= total):
        return MaskChange(f"LIFT refreshes its mask every {interval} steps (update_interval={interval})")
    return None


def _spiel(layer: Any, name: str, total: int) -> Optional[MaskChange]:
    steps = layer.adapter_configs[name].reselection_steps
    return MaskChange(f"SpIEL drops and regrows entries every {steps} steps (reselection_steps={steps})")


def _rosa(layer: Any, name: str, total: int) -> Optional[MaskChange]:
    config = layer.adapter_configs[name]
    if config.schedule == "lora_only" or layer.values[name].numel() == 0 or layer.is_mask_ready(name):
        return None
    if config.mask_score == "magnitude":  # |W| of the base weight, read outside the forward: a shard under FSDP2
        return MaskChange("RoSA chooses its mask from the base weight during training (mask_score='magnitude')")
    return MaskChange(f"RoSA chooses its mask during training (schedule={config.schedule!r})", shard_local=True)


def _smt(layer: Any, name: str, total: int) -> Optional[MaskChange]:
    if layer.selector(name).done():
        return None
    config = layer.adapter_configs[name]
    if not config.init_weights:  # random initial blocks are written slice by slice into the (sharded) parameter
        return MaskChange("SMT selects its blocks in training and fills them with random values (init_weights=False)")
    return MaskChange(f"SMT selects its blocks after a {config.window_steps}-step warm-up", shard_local=True)


def _diff_pruning(layer: Any, name: str, total: int) -> Optional[MaskChange]:
    step = layer.adapter_configs[name].projection_step
    if layer.stage(name) == 1 and step is not None and (not total or step <= total):
        return MaskChange(f"diff pruning projects its dense diff to a sparse delta after step {step} (projection_step)")
    return None


def mask_rules() -> dict[type, MaskRule]:
    """Per layer class with a training schedule: the rule telling whether its mask changes in a run."""
    from .tuners.diff_pruning.layer import DiffPruningLinear
    from .tuners.lift.layer import LiftLinear
    from .tuners.rosa.layer import RosaLinear
    from .tuners.smt.layer import SmtLinear
    from .tuners.spiel.layer import SpielLinear

    return {
        LiftLinear: _lift,
        SpielLinear: _spiel,
        RosaLinear: _rosa,
        SmtLinear: _smt,
        DiffPruningLinear: _diff_pruning,
    }


def _has_schedule(layer: SparseLayerBase) -> bool:
    return any(getattr(type(layer), hook) is not getattr(SparseLayerBase, hook) for hook in _HOOKS)


def moving_masks(
    model: nn.Module, total_steps: int = 0, adapters: Optional[Iterable[str]] = None
) -> dict[str, MaskChange]:
    """``layer name -> its mask change`` for every layer whose active adapters' masks would change within
    ``total_steps`` optimizer steps (0: unknown, any scheduled change counts; ``adapters``: only these). A layer class
    with schedule hooks and no rule in :func:`mask_rules` counts as changing, not shard-local (it cannot be
    checked)."""
    rules = mask_rules()
    wanted = set(adapters) if adapters is not None else None
    found: dict[str, MaskChange] = {}
    for layer_name, layer in model.named_modules():
        if not isinstance(layer, SparseLayerBase) or layer.disable_adapters or layer.merged:
            continue
        names = [n for n in layer.active_adapters if n in layer.adapter_configs and (wanted is None or n in wanted)]
        rule = next((r for cls, r in rules.items() if isinstance(layer, cls)), None)
        for name in names:
            if rule is not None:
                change = rule(layer, name, total_steps)
            elif _has_schedule(layer):
                change = MaskChange(f"{type(layer).__name__} has a training schedule that sparse_peft cannot check")
            else:
                change = None
            if change is not None and (layer_name not in found or not change.shard_local):
                found[layer_name] = change  # several adapters: the one no sharding can take wins
    return found


def _summary(by_layer: dict[str, MaskChange]) -> str:
    """One line per distinct reason, with how many layers it concerns and the first of them."""
    grouped: dict[str, list[str]] = {}
    for layer, change in by_layer.items():
        grouped.setdefault(change.reason, []).append(layer)
    return "; ".join(f"{reason} ({len(ls)} layer(s), e.g. {ls[0]})" for reason, ls in grouped.items())


ALTERNATIVES = (
    "Either train with DDP (accelerate launch --multi_gpu without FSDP / DeepSpeed), which runs every schedule with "
    "identical masks on all ranks; or keep the masks static under sharding: LIFT with update_interval=None; RoSA "
    "and SMT with the mask chosen before training (sparse_peft.calibrate(trainer.model, batches) before "
    "trainer.train(), or RoSA's mask_path=...); LoRS's gradient init and S²FT's data-driven units also through "
    "sparse_peft.calibrate(trainer.model, batches) before trainer.train(); diff pruning with projection_step=None "
    "(stage 1), its projection and stage 3 under DDP or in one process. SNELL, S²FT, SPP and LoRS masks never "
    "change during training."
)


def check_sharded_training(
    model: nn.Module,
    optimizer: Any = None,
    total_steps: int = 0,
    pending_calibration: Iterable[str] = (),
    adapters: Optional[Iterable[str]] = None,
) -> None:
    """Raise :class:`ShardedTrainingError` when ``model`` (or ``optimizer``) is sharded and, within ``total_steps``
    steps, a mask would change in a way the sharding cannot take (FSDP2 takes the shard-local first choices of a
    mask, nothing else does), or a calibration would run on the sharded model (``pending_calibration``: the
    adapters whose layers still ask for one). Does nothing on an unsharded model (one process, DDP)."""
    sharding = sharded_by(model, optimizer)
    if sharding is None:
        return
    pending = sorted(set(pending_calibration))
    moving = {
        layer: change
        for layer, change in moving_masks(model, total_steps, adapters).items()
        if not (change.shard_local and sharding.shard_local_changes)
    }
    if not moving and not pending:
        return
    problems = []
    if moving:
        problems.append(f"masks would change during training: {_summary(moving)}")
    if pending:
        problems.append(
            f"adapter(s) {pending} still need their calibration pass (LoRS's gradient init, S²FT's data-driven "
            f"units, SpIEL's calibrated initial mask), which rewrites parameters and index buffers"
        )
    raise ShardedTrainingError(
        f"sparse_peft cannot change sparse masks on a sharded model ({sharding.description}): "
        f"{' and '.join(problems)}. Mask surgery reads and rewrites whole value tensors, index buffers and optimizer "
        f"moments in place, but each rank holds only a shard of the values and of their optimizer state. "
        f"{ALTERNATIVES}"
    )
