"""The calibration pass: data-driven selections and initialisations before the optimizer exists.

``sparse_peft.calibrate(model, batches)`` runs a few batches through the model (forward, and backward where a layer
needs gradients), collects every asking layer's statistics through one capture mechanism
(:func:`sparse_peft.sparse.stats.capture`: ``Σ gᵀx`` or activation sums of squares, float32, on the layer's device),
sums them over the process group (DDP: every rank decides from the same numbers), and hands each layer its
:class:`~sparse_peft.sparse.stats.Window`. What the methods do with it:

* **SMT**: scores the blocks of every target matrix from ``Σ ∂L/∂W`` and selects them, globally or per matrix, at
  exactly the budget: each matrix gets as many slots as it has selected blocks (no per-matrix cap), and the trainable
  count is the blocks used. (The in-training warm-up stays available through :class:`sparse_peft.SparsePeftCallback`.)
* **S²FT** (``selection="activation"`` / ``"gradient"``): chooses the heads and channels.
* **LoRS** (``init_lora_weights="gradient"``): ``A`` from the top right singular vectors of the masked mean gradient,
  ``B = 0``.

:class:`sparse_peft.SparsePeftCallback` runs the pass itself at the start of training on the first training
batches (``calibration_samples``, 128 by default as LoRS's reference) for the layers that set
``calibrates_at_train_begin`` (S²FT, LoRS: they change values, not shapes, so the optimizer built by the trainer
stays valid); SMT's exact allocation needs the pass before the optimizer exists, else it warms up in training.

A layer takes part through three methods: ``calibration_mode(adapter) -> "gradient" | "activation" | None``,
``finish_calibration(adapter, window)`` and optionally ``after_calibration(adapter)`` (model-wide decisions such as
SMT's global ranking, called once every layer has its window). Parameters are never stepped: gradients the pass
leaves on trainable parameters are cleared.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Union

import torch
from torch import nn

from .sparse.stats import capture

Batch = Union[torch.Tensor, Mapping[str, Any]]


def calibration_layers(
    model: nn.Module, adapter_name: str = "default", train_begin: bool = False
) -> dict[str, tuple[nn.Module, str]]:
    """``name -> (layer, mode)`` for every layer whose adapter ``adapter_name`` still asks for calibration
    (``train_begin``: only layers whose calibration may run once the optimizer exists, see
    :class:`sparse_peft.SparsePeftCallback`)."""
    found = {}
    for name, module in model.named_modules():
        if train_begin and not getattr(module, "calibrates_at_train_begin", False):
            continue
        ask = getattr(module, "calibration_mode", None)
        mode = ask(adapter_name) if callable(ask) else None
        if mode:
            found[name] = (module, mode)
    return found


#: Batch keys passed to the model (collators add others, e.g. TRL's completion masks, that forward does not take).
MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "position_ids", "token_type_ids")


def _inputs(batch: Batch, device: torch.device) -> dict[str, Any]:
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items() if k in MODEL_INPUTS}
    inputs.setdefault("labels", inputs["input_ids"])
    return inputs


def calibrate(
    model: nn.Module,
    batches: Iterable[Batch],
    adapter_name: str = "default",
    group: Any = None,
    train_begin: bool = False,
) -> dict[str, int]:
    """Run every pending calibration of adapter ``adapter_name`` on ``batches``; returns ``{layer class: count}``.

    ``batches``: ``input_ids`` tensors (used as labels too) or dicts of model inputs (``labels`` default to
    ``input_ids``). Call it after ``get_peft_model`` and before building the optimizer (SMT resizes its block
    storage). ``group``: process group for the statistics all-reduce (None: the default group when
    ``torch.distributed`` is initialised). ``train_begin``: only the calibrations that leave parameter shapes
    alone (what :class:`sparse_peft.SparsePeftCallback` runs when training starts).
    """
    layers = calibration_layers(model, adapter_name, train_begin)
    if not layers:
        return {}
    needs_grad = any(mode in ("gradient", "fisher") for _, mode in layers.values())
    device = next(model.parameters()).device
    count = 0
    try:
        with capture(layers) as windows:
            for batch in batches:
                inputs = _inputs(batch, device)
                if needs_grad:
                    with torch.enable_grad():
                        model(**inputs).loss.backward()
                else:
                    with torch.no_grad():
                        model(**inputs)
                count += 1
    finally:
        model.zero_grad(set_to_none=True)
    if count == 0:
        raise ValueError("sparse_peft.calibrate needs at least one batch")
    done: dict[str, int] = {}
    for name, (layer, _) in layers.items():
        layer.finish_calibration(adapter_name, windows[name].commit(group))
        done[type(layer).__name__] = done.get(type(layer).__name__, 0) + 1
    for layer, _ in layers.values():
        after = getattr(layer, "after_calibration", None)
        if callable(after):
            after(adapter_name)
    return done


def first_batches(dataloader: Iterable[Mapping[str, Any]], samples: int) -> list[Mapping[str, Any]]:
    """The first batches of ``dataloader`` holding at least ``samples`` examples (all of it if fewer)."""
    batches, seen = [], 0
    for batch in dataloader:
        batches.append(batch)
        seen += len(batch["input_ids"]) if "input_ids" in batch else 1
        if seen >= samples:
            break
    return batches
