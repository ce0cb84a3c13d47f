"""Atomic file writes: the package's one writer for anything a user keeps (adapters, masks, checkpoint side files,
benchmark tables). No PEFT imports here."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CACHE_ENV_VAR = "SPARSE_PEFT_CACHE"


def cache_root() -> Path:
    """The package's cache folder (the default model's safetensors copy, compiled kernels): ``$SPARSE_PEFT_CACHE`` or
    ``~/.cache/sparse_peft``."""
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sparse_peft"


def atomic_write(path: str, write: Callable[[str], Any]) -> None:
    """Write a file through a temporary name in the same folder, then rename it over ``path`` in one step.

    A crash or a full disk leaves either the old file or the new one, never a half-written file.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def install_dir(new: str, final: str) -> str | None:
    """Move the finished folder ``new`` to ``final``; a folder already at ``final`` is kept, renamed to
    ``<final>-previous-<unix time>`` first (its path is returned; None when there was none). Nothing is overwritten."""
    previous = None
    if os.path.exists(final):
        previous = f"{final}-previous-{int(time.time())}"
        os.rename(final, previous)
    os.rename(new, final)
    return previous
