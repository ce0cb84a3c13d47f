"""Measuring instruments of ``sparse-peft train`` and the benchmarks: step wall times, peak resident memory and
optimizer-state bytes. Nothing here changes what a run computes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback


@dataclass
class StepTimer(TrainerCallback):
    """Records the wall time of every optimizer step (callbacks included)."""

    times: list[float] = field(default_factory=list)
    _start: float = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def proc_status_bytes(field_name: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of this process in bytes (Linux), or None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> int | None:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux ``clear_refs``) and return the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return proc_status_bytes("VmRSS")


def peak_rss_since(reset_rss: int | None) -> int | None:
    """The peak RSS since :func:`reset_peak_rss` returned ``reset_rss`` (the kernel's mark can trail that read by a
    page, so never below it)."""
    peak = proc_status_bytes("VmHWM")
    if peak is not None and reset_rss is not None:
        peak = max(peak, reset_rss)
    return peak


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of every tensor the optimizer keeps per parameter (moments, accumulators, step counters)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return sum(
        value.numel() * value.element_size()
        for state in inner.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )
