"""Sparse masks in a file of their own: one safetensors file, one tensor of flat positions per module.

Layout: tensor ``<module name>`` holds the sorted flat row-major positions (int32, int64 above 2^31 entries); the
metadata entry ``shapes`` maps each module name to its weight shape ``[out, in]`` as JSON, and ``format`` is
:data:`FORMAT`. Written atomically (temporary file, then one rename), so a crash never leaves half a file.

Used by RoSA's two-phase recipe (collect masks in a short run, start fresh runs from them), and usable by any method
whose mask is fixed after selection.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .delta import index_dtype
from .io import atomic_write

FORMAT = "sparse_peft_masks"


def write_masks(path: str | os.PathLike, masks: dict[str, tuple[torch.Tensor, tuple[int, int]]]) -> None:
    """Write ``{module name: (flat positions, weight shape)}`` to ``path`` (atomic)."""
    tensors = {
        name: torch.sort(pos.detach().long().cpu()).values.to(index_dtype(shape[0] * shape[1])).contiguous()
        for name, (pos, shape) in masks.items()
    }
    shapes = {name: list(shape) for name, (_, shape) in masks.items()}
    metadata = {"format": FORMAT, "shapes": json.dumps(shapes)}
    atomic_write(str(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_mask(path: str | os.PathLike, name: str, shape: tuple[int, int], k: int) -> torch.Tensor:
    """The positions saved for module ``name``, checked against the weight ``shape`` and the budget ``k``.

    Raises a ``ValueError`` naming the file, the module and the fix when the file lacks the module or was made for
    another shape or density; ``FileNotFoundError`` when ``path`` does not exist.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mask file {str(path)!r} does not exist; write it with sparse_peft.save_rosa_masks")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{str(path)!r} is not a sparse_peft mask file (no format={FORMAT!r} in its metadata)")
        if name not in handle.keys():
            raise ValueError(
                f"mask file {str(path)!r} has no mask for module {name!r}; it was saved for other target modules "
                f"(it holds {len(handle.keys())} modules). Use the same target_modules as the run that saved it."
            )
        positions = handle.get_tensor(name)
    saved_shape = tuple(json.loads(metadata.get("shapes", "{}")).get(name, ()))
    if saved_shape != tuple(shape):
        raise ValueError(
            f"mask for {name!r} in {str(path)!r} was made for a weight of shape {saved_shape}, but this model's is "
            f"{tuple(shape)}; load masks into the base model they were collected on"
        )
    if positions.numel() != k:
        raise ValueError(
            f"mask for {name!r} in {str(path)!r} holds {positions.numel()} entries but this adapter's density gives "
            f"k={k}; set density (and density_pattern) to the values the masks were collected with"
        )
    return positions.to(index_dtype(shape[0] * shape[1]))
