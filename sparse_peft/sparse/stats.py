"""Calibration statistics of linear layers: one way to capture ``(∂L/∂y, x)`` and activations, one float32 window,
one all-reduce commit. No PEFT imports here.

A calibration pass (:func:`sparse_peft.calibrate`) runs a few batches through the model before the optimizer
exists. For every layer that asks for it, :func:`capture` attaches a forward hook that

* in ``"gradient"`` mode puts a :class:`~sparse_peft.sparse.slices.GradientTap` on the layer's output, so backward
  hands the window the micro-batch's output gradient ``g`` (``(T, out)``) and input ``x`` (``(T, in)``), and the
  window adds ``G_b = gᵀx`` (the micro-batch's gradient of ``W``, float32, ``(out, in)``, on the layer's device);
  the base weight never needs ``requires_grad``;
* in ``"fisher"`` mode does the same but adds each example's squared gradient ``Σ_i G_i²`` (``G_i = g_iᵀx_i`` over
  example ``i``'s tokens): the empirical diagonal Fisher of RoSA's paper, from per-sample gradients, not from
  squared batch means;
* in ``"activation"`` mode adds the column sums of squares of ``x`` and of ``y`` (no backward needed).

:meth:`Window.commit` sums the window over a process group, so every DDP rank decides from the same numbers.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from .slices import tap_gradient

MODES = ("gradient", "fisher", "activation")
_ACTIVE: ContextVar[bool] = ContextVar("sparse_peft_calibrating", default=False)


def calibrating() -> bool:
    """True inside :func:`capture` (layers then skip their "not calibrated yet" checks)."""
    return _ACTIVE.get()


@dataclass
class Window:
    """Statistics of one layer over the calibration batches (all float32).

    ``gradient``: ``Σ_b gᵀx`` (``(out, in)``; modes gradient); ``gradient_sq``: ``Σ_i G_i²`` over examples
    (mode fisher); ``input_sq`` / ``output_sq``: ``Σ_t x_t²`` (``(in,)``, every mode) and ``Σ_t y_t²`` (``(out,)``,
    activation modes);
    ``batches``: micro-batches seen; ``samples``: examples seen; ``tokens``: rows of ``x`` seen.
    """

    mode: str
    gradient: Optional[torch.Tensor] = None
    gradient_sq: Optional[torch.Tensor] = None
    samples: int = 0
    input_sq: Optional[torch.Tensor] = None
    output_sq: Optional[torch.Tensor] = None
    batches: int = 0
    tokens: int = 0
    committed: bool = field(default=False, repr=False)

    @torch.no_grad()
    def add_gradient(self, grad_out: torch.Tensor, x: torch.Tensor, samples: int = 1) -> None:
        """Add one micro-batch: ``grad_out`` ``(T, out)`` and ``x`` ``(T, in)``, ``T = samples · tokens each`` (and
        ``Σ_t x_t²`` to ``input_sq``, for scores normalized by the input features)."""
        if self.mode == "fisher":
            squares = per_sample_squares(grad_out, x, samples)
            self.gradient_sq = squares if self.gradient_sq is None else self.gradient_sq.add_(squares)
        else:
            product = grad_out.t().float() @ x.float()
            self.gradient = product if self.gradient is None else self.gradient.add_(product)
        x_sq = x.float().square().sum(0)
        self.input_sq = x_sq if self.input_sq is None else self.input_sq.add_(x_sq)
        self.batches += 1
        self.samples += samples
        self.tokens += x.shape[0]

    @torch.no_grad()
    def add_activation(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x_sq, y_sq = x.float().square().sum(0), y.float().square().sum(0)
        self.input_sq = x_sq if self.input_sq is None else self.input_sq.add_(x_sq)
        self.output_sq = y_sq if self.output_sq is None else self.output_sq.add_(y_sq)
        self.batches += 1
        self.tokens += x.shape[0]

    def commit(self, group: Any = None) -> Window:
        """Sum over the processes of ``group`` (a no-op on one process); once."""
        if self.committed:
            return self
        self.committed = True
        if not (dist.is_available() and dist.is_initialized()):
            return self
        for name in ("gradient", "gradient_sq", "input_sq", "output_sq"):
            tensor = getattr(self, name)
            if tensor is not None:
                dist.all_reduce(tensor, group=group)
        counts = torch.tensor([self.batches, self.samples, self.tokens], dtype=torch.float64)
        dist.all_reduce(counts, group=group)
        self.batches, self.samples, self.tokens = (int(c) for c in counts)
        return self


@torch.no_grad()
def per_sample_squares(grad_out: torch.Tensor, x: torch.Tensor, samples: int) -> torch.Tensor:
    """``Σ_i (g_iᵀ x_i)²`` (float32, ``(out, in)``) for ``samples`` examples of equal length stacked in the rows of
    ``grad_out`` ``(T, out)`` and ``x`` ``(T, in)``; one example's transient ``(out, in)`` product at a time."""
    if samples < 1 or grad_out.shape[0] % samples:
        raise ValueError(f"{grad_out.shape[0]} rows do not split into {samples} examples of equal length")
    total: Optional[torch.Tensor] = None
    for g_i, x_i in zip(grad_out.chunk(samples), x.chunk(samples), strict=True):
        square = (g_i.t().float() @ x_i.float()).square_()
        total = square if total is None else total.add_(square)
    return total  # type: ignore[return-value]


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _add_gradient(window: Window, grad_out: torch.Tensor, x: torch.Tensor, samples: int) -> None:
    window.add_gradient(grad_out, x, samples)


@contextlib.contextmanager
def capture(layers: Mapping[str, tuple[nn.Module, str]]) -> Iterator[dict[str, Window]]:
    """Collect a :class:`Window` per entry of ``layers`` (``key -> (module, mode)``) while the block runs.

    The hooks see each module's first positional input and its output; they are removed on exit, also on error.
    """
    windows = {key: Window(mode) for key, (_, mode) in layers.items()}
    anchor = torch.zeros(0, requires_grad=True)  # makes tapped outputs require grad when nothing upstream does
    handles = []

    def hook_for(window: Window):
        def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> Optional[torch.Tensor]:
            x = args[0]
            if window.mode == "activation":
                window.add_activation(_flat(x.detach()), _flat(output.detach()))
                return None
            if not torch.is_grad_enabled():
                return None
            samples = x.shape[0] if x.dim() > 2 else 1  # (batch, length, features): one example per batch row
            observer = functools.partial(_add_gradient, window, samples=samples)
            return tap_gradient(output, x.detach(), anchor, observer)

        return hook

    token = _ACTIVE.set(True)
    try:
        for key, (module, mode) in layers.items():
            if mode not in MODES:
                raise ValueError(f"calibration mode of {key} must be one of {MODES}, got {mode!r}")
            handles.append(module.register_forward_hook(hook_for(windows[key])))
        yield windows
    finally:
        _ACTIVE.reset(token)
        for handle in handles:
            handle.remove()
