"""Trainer callbacks that drive what happens between optimizer steps.

Works unchanged with ``transformers.Trainer`` and TRL's ``SFTTrainer`` / ``DPOTrainer``: pass
``callbacks=[SparsePeftCallback()]`` (or ``trainer.add_callback(...)``). Each sparse layer exposes two hooks,
``on_step_begin`` (open statistics windows before the step's forward/backward passes) and ``on_step_end`` (mask
surgery after the optimizer step and ``zero_grad``), which the callback calls for every active adapter. The callback
passes accelerate's optimizer wrapper, whose ``.state`` is the inner optimizer's, so moments move with their slots.

Decisions are pure functions of the weights, of statistics that are all-reduced across processes, and of
``global_step``: DDP ranks make identical decisions. Open statistics windows are saved with each checkpoint as
tensors in a safetensors side file, ``checkpoint-N/sparse_peft_state.safetensors`` (written atomically by the main
process; its name is recorded in ``trainer_state.json`` through ``ExportableState``), and read back when training
resumes, whether or not ``restore_callback_states_from_checkpoint`` is set, so a resumed run repeats the
uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from .calibrate import calibrate, calibration_layers, first_batches
from .groups import keep_constant_rates, misplaced_parameters
from .sharding import check_sharded_training
from .sparse.io import atomic_write
from .sparse.regrow import unwrap_optimizer
from .tuners.layer_base import SparseLayerBase

logger = logging.getLogger(__name__)


@dataclass
class ScheduleContext:
    """What a layer's schedule needs to know about the run."""

    total_steps: int = 0
    group: Any = None  # process group for statistics all-reduces (None: single process)

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group) if self.group is not None else 1


def sparse_layers(model: nn.Module) -> Iterator[tuple[str, SparseLayerBase]]:
    """``(name, layer)`` for every sparse_peft layer (each answers the protocol of :class:`SparseLayerBase`)."""
    for name, module in model.named_modules():
        if isinstance(module, SparseLayerBase):
            yield name, module


def _scheduled(layer: SparseLayerBase) -> list[str]:
    if layer.disable_adapters or layer.merged:
        return []
    return [name for name in layer.active_adapters if name in layer.adapter_configs]


def begin_step(model: nn.Module, step: int, context: ScheduleContext | None = None) -> None:
    """Call before optimizer step ``step`` (1-based) in a custom training loop."""
    context = context or ScheduleContext()
    for _, layer in sparse_layers(model):
        for name in _scheduled(layer):
            layer.on_step_begin(name, step, context)


def before_optimizer_step(
    model: nn.Module, context: ScheduleContext | None = None, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Call once gradients are final (after clipping) and before ``optimizer.step()`` in a custom loop. Given the
    ``optimizer``, it also sets constant-rate groups (:func:`sparse_peft.param_groups`) back to their rate."""
    keep_constant_rates(optimizer)
    context = context or ScheduleContext()
    for _, layer in sparse_layers(model):
        for name in _scheduled(layer):
            layer.on_pre_optimizer_step(name, context)


def refresh_masks(
    model: nn.Module,
    global_step: int,
    optimizer: torch.optim.Optimizer | None = None,
    context: ScheduleContext | None = None,
) -> int:
    """Call after optimizer step ``global_step`` in a custom training loop: runs every mask change that is due
    (LIFT refreshes, SpIEL drop-and-regrow) and returns how many slots moved.

    Only active, unmerged, enabled adapters change: a frozen adapter does not train, so its mask stays.
    """
    context = context or ScheduleContext()
    return sum(
        layer.on_step_end(name, global_step, optimizer, context)
        for _, layer in sparse_layers(model)
        for name in _scheduled(layer)
    )


def _stats_group() -> Any:
    """A process group of its own for statistics collectives, so they never interleave with DDP's all-reduces."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return dist.new_group(backend=dist.get_backend())


class SparsePeftCallback(TrainerCallback, ExportableState):
    """Runs the sparse methods' schedules: LIFT's mask refresh and SpIEL's windows and drop-and-regrow."""

    def __init__(self, calibration_samples: int = 128, state_path: str | None = None) -> None:
        """``calibration_samples``: examples for the calibration pass at train start; ``state_path``: the side file
        of open windows to resume from (default: found in the checkpoint being resumed)."""
        self.calibration_samples = calibration_samples
        self.state_path = state_path
        self.state_file: str | None = None  # recorded in trainer_state.json: the side file of this checkpoint
        self._model: nn.Module | None = None
        self._context = ScheduleContext()

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        model = kwargs.get("model")
        self._model = model
        optimizer = kwargs.get("optimizer")
        inner = getattr(optimizer, "optimizer", optimizer)
        if model is not None and callable(getattr(inner, "bind", None)) and not getattr(inner, "bound", True):
            inner.bind(model)
        self._context = ScheduleContext(total_steps=state.max_steps, group=_stats_group())
        if model is not None:
            _float32_adapters_on_quantized_bases(model, optimizer)
            _warn_misplaced(model, optimizer)
            _check_sharding(model, optimizer, state)
        if model is not None and state.global_step == 0:
            self._calibrate(model, kwargs.get("train_dataloader"))
            _sync_reference(model)
        if model is not None and state.global_step > 0:
            self._resume(model, args, state)

    def _resume(self, model: nn.Module, args: TrainingArguments, state: TrainerState) -> None:
        """Read the open windows of the checkpoint being resumed (its side file), if it recorded any."""
        record = _saved_record(state)
        if getattr(self, "window_state", None) or record.get("window_state"):
            raise ValueError(
                f"the checkpoint of step {state.global_step} keeps its open statistics windows in the JSON form of "
                f"earlier sparse_peft releases, which this release does not read: resume it with the release that "
                f"wrote it, or restart from a checkpoint taken outside a statistics window"
            )
        name = self.state_file or record.get("state_file")
        if name:
            load_window_state(model, self.state_path or _find_state_file(args, state, name))
        self.state_file = None

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        """Write the open windows next to the checkpoint just saved (main process; every rank holds the same)."""
        if self._model is not None and args.should_save:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            save_window_state(self._model, os.path.join(folder, STATE_FILE))

    def _calibrate(self, model: nn.Module, dataloader: Any) -> None:
        """The calibration pass (:func:`sparse_peft.calibrate`) on the first ``calibration_samples`` training
        examples, for the active adapters' layers that still need one and can take it now (LoRS's gradient init,
        S²FT's data-driven units). Every rank calibrates on its own batches; the statistics are summed."""
        active = _active_adapter_names(model)
        pending = [name for name in active if calibration_layers(model, name, train_begin=True)]
        if not pending or dataloader is None:
            return
        batches = first_batches(dataloader, self.calibration_samples)
        if not batches or "input_ids" not in batches[0]:
            _warn(
                f"adapter(s) {pending} need a calibration pass, but this trainer's batches hold no input_ids "
                f"(e.g. DPO pairs): call sparse_peft.calibrate(model, batches) with a few tokenized batches before "
                f"training"
            )
            return
        seen = sum(len(batch["input_ids"]) for batch in batches)
        was_training = model.training
        model.train()
        for name in pending:
            done = calibrate(model, batches, name, self._context.group, train_begin=True)
            logger.info("calibrated adapter %r on %d examples: %s", name, seen, done)
        model.train(was_training)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        model = kwargs.get("model")
        if model is not None:
            begin_step(model, state.global_step + 1, self._context)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ):
        model = kwargs.get("model")
        if model is not None:
            before_optimizer_step(model, self._context, kwargs.get("optimizer"))

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        model = kwargs.get("model")
        if model is None:
            return
        moved = refresh_masks(model, state.global_step, kwargs.get("optimizer"), self._context)
        if moved:
            logger.info("step %d: sparse masks changed, %d slots moved", state.global_step, moved)

    def state(self) -> dict:
        """What ``trainer_state.json`` records: the side file's name when windows are open (the tensors go into the
        file itself, written by :meth:`on_save`)."""
        has_state = self._model is not None and any(_window_tensors(self._model))
        return {
            "args": {"calibration_samples": self.calibration_samples},
            "attributes": {"state_file": STATE_FILE if has_state else None},
        }


def _active_adapter_names(model: nn.Module) -> list[str]:
    names: list[str] = []
    for _, layer in sparse_layers(model):
        names += [name for name in _scheduled(layer) if name not in names]
    for module in model.modules():
        if callable(getattr(module, "calibration_mode", None)) and hasattr(module, "active_adapters"):
            names += [name for name in module.active_adapters if name not in names]
    return names


def _float32_adapters_on_quantized_bases(model: nn.Module, optimizer: Any = None) -> int:
    """Cast the trainable adapter parameters of layers on bitsandbytes bases back to float32, and any optimizer state
    already held for them (a resumed run's, which the optimizer cast to the parameters' dtype on load); returns how
    many parameters were cast.

    TRL's ``SFTTrainer`` and ``DPOTrainer`` cast every trainable parameter of a quantized model to bfloat16 (QLoRA's
    recipe for LoRA factors). Sparse values are updated a few entries at a time by amounts far below a bfloat16
    ULP of their magnitude, so in bfloat16 many updates vanish (TRL exempts DoRA's magnitude vector for the same
    reason), and the saved adapter would differ from one trained in float32. Called when training starts (same
    parameter objects, so the optimizer's groups stay valid)."""
    state = unwrap_optimizer(optimizer).state if optimizer is not None else {}
    cast = 0
    for _, layer in sparse_layers(model):
        if layer.quantization_backend is None:
            continue
        for param in layer.parameters():
            if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
                param.data = param.data.float()
                for key, value in state.get(param, {}).items():
                    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() > 0:
                        state[param][key] = value.float()
                cast += 1
    if cast:
        logger.info("kept %d adapter parameters on quantized bases in float32 (the trainer had cast them)", cast)
    return cast


def _warn_misplaced(model: nn.Module, optimizer: Any) -> None:
    """Warn when the trainer's optimizer trains parameters with other settings than their method asks for."""
    roles = misplaced_parameters(model, optimizer)
    if roles:
        _warn(
            f"the optimizer trains {', '.join(roles)} with the trainer's learning rate and schedule instead of their "
            f"own settings (e.g. diff pruning's gate_lr): call sparse_peft.use_param_groups(trainer) before "
            f"trainer.train(), or build the optimizer over sparse_peft.param_groups(model, lr=...)"
        )


def _check_sharding(model: nn.Module, optimizer: Any, state: TrainerState) -> None:
    """Refuse, before the first step, mask changes and train-start calibrations on a sharded model (FSDP, DeepSpeed
    ZeRO): :func:`sparse_peft.sharding.check_sharded_training`."""
    pending = []
    if state.global_step == 0:
        pending = [name for name in _active_adapter_names(model) if calibration_layers(model, name, train_begin=True)]
    check_sharded_training(model, optimizer, state.max_steps, pending)


def _warn(message: str) -> None:
    """A warning the user must see: in the log and as a ``UserWarning``."""
    logger.warning(message)
    warnings.warn(message, UserWarning, stacklevel=4)


def _sync_reference(model: nn.Module) -> None:
    """DPO on a pre-wrapped PeftModel: TRL's ``ref`` adapter must start as an exact copy of ``default``."""
    from .dpo import REFERENCE_ADAPTER, sync_reference_adapter

    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict) and REFERENCE_ADAPTER in peft_config and "default" in peft_config:
        synced = sync_reference_adapter(model)
        logger.info("copied adapter 'default' into DPO reference adapter %r in %d layers", REFERENCE_ADAPTER, synced)


#: The side file of open statistics windows in a checkpoint folder, and its format tag.
STATE_FILE = "sparse_peft_state.safetensors"
STATE_FORMAT = "sparse_peft_window_state"
_SEP = "::"


def _saved_record(state: TrainerState) -> dict:
    """This callback's attributes in a resumed checkpoint's ``trainer_state.json``.

    Trainer only re-creates stateful callbacks when ``restore_callback_states_from_checkpoint`` is set, but it always
    loads ``stateful_callbacks`` from the checkpoint; reading them here makes exact resume the default.
    """
    saved = (state.stateful_callbacks or {}).get(SparsePeftCallback.__name__)
    if isinstance(saved, list):
        saved = saved[-1] if saved else None
    if not isinstance(saved, dict):
        return {}
    return saved.get("attributes", {}) or {}


def _find_state_file(args: TrainingArguments, state: TrainerState, name: str) -> str:
    folders = [
        getattr(args, "resume_from_checkpoint", None),
        os.path.join(args.output_dir, f"checkpoint-{state.global_step}"),
    ]
    for folder in folders:
        if isinstance(folder, str) and os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise FileNotFoundError(
        f"the checkpoint of step {state.global_step} records open statistics windows in {name}, but none of "
        f"{[f for f in folders if isinstance(f, str)]} holds that file: pass SparsePeftCallback(state_path=...) "
        f"pointing at it (it lies next to the checkpoint's trainer_state.json)"
    )


def _window_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for name, layer in sparse_layers(model):
        for adapter in layer.adapter_configs:
            for key, tensor in layer.export_state(adapter).items():
                yield _SEP.join((name, adapter, key)), tensor


def collect_window_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every open window of ``model`` as tensors, keyed ``layer::adapter::name`` (CPU, contiguous copies)."""
    return {key: tensor.detach().cpu().contiguous().clone() for key, tensor in _window_tensors(model)}


def restore_window_state(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Put tensors from :func:`collect_window_state` back into the layers."""
    layers = dict(sparse_layers(model))
    grouped: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in saved.items():
        name, adapter, field_name = key.split(_SEP)
        grouped.setdefault((name, adapter), {})[field_name] = tensor
    for (name, adapter), tensors in grouped.items():
        layer = layers.get(name)
        if layer is None or adapter not in layer.adapter_configs:
            logger.warning("checkpoint has window statistics for unknown layer %s (adapter %s); ignored", name, adapter)
            continue
        layer.import_state(adapter, tensors)


def save_window_state(model: nn.Module, path: str) -> bool:
    """Write the open windows of ``model`` to ``path`` (safetensors, atomic); False (no file) when none is open."""
    from safetensors.torch import save_file

    tensors = collect_window_state(model)
    if not tensors:
        return False
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": STATE_FORMAT}))
    return True


def load_window_state(model: nn.Module, path: str) -> None:
    """Read a side file written by :func:`save_window_state` into the layers of ``model``."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        if (handle.metadata() or {}).get("format") != STATE_FORMAT:
            raise ValueError(f"{path} is not a sparse_peft window-state file (format {STATE_FORMAT!r})")
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    restore_window_state(model, tensors)
