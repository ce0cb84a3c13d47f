"""``sparse-peft inspect ADAPTER_DIR``: what a saved sparse adapter holds, as a table and a heatmap.

Reads ``adapter_config.json`` and ``adapter_model.safetensors`` only; layer shapes come from the base model's config
(``base_model_name_or_path``), instantiated on the meta device, so nothing is loaded into memory and the base weights
need not be present. Per adapted module the table lists:

* ``stored``  float entries the adapter stores for it (values, factors, blocks, frozen parts);
* ``density`` ``stored / (out · in)``, the fraction of the matrix the adapter can change (for low-rank parts this is
  their parameter count relative to the matrix, not a mask);
* ``bytes``   bytes of all its tensors (floats and integer positions).

The heatmap shows density per (layer, module) and, for one matrix, where its entries sit: flat ``indices`` for
entry-sparse methods, otherwise the non-zero pattern of the adapter's delta computed by loading base + adapter.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .tuners.layer_base import StorageReport

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LAYER = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


@dataclass
class ModuleReport:
    """One adapted module of a saved adapter: its tensors as a
    :class:`~sparse_peft.tuners.layer_base.StorageReport` (the same accounting as ``layer.storage_report()``)."""

    module: str
    shape: tuple[int, int] | None
    storage: StorageReport
    flat_indices: str | None  # safetensors key of the active flat positions, when the method stores them

    @property
    def stored(self) -> int:
        return self.storage.entries

    @property
    def nbytes(self) -> int:
        return self.storage.bytes

    @property
    def density(self) -> float | None:
        if self.shape is None:
            return None
        return self.stored / (self.shape[0] * self.shape[1])

    @property
    def layer(self) -> int | None:
        match = _LAYER.search(f".{self.module}.")
        return int(match.group(1)) if match else None

    @property
    def short_name(self) -> str:
        return self.module.rsplit(".", 1)[-1]


def read_adapter(adapter_dir: str | Path) -> tuple[dict[str, Any], dict[str, ModuleReport]]:
    """``(adapter_config, {module: report})`` of a saved adapter folder."""
    folder = Path(adapter_dir)
    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for path in (config_file, weights_file):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: pass a folder written by save_pretrained")
    config = json.loads(config_file.read_text())
    prefix = str(config.get("peft_type", "")).lower() + "_"
    shapes = _module_shapes(config.get("base_model_name_or_path"))
    tensors: dict[str, dict[str, tuple[int, int, str]]] = defaultdict(dict)
    flat: dict[str, str] = {}
    with safe_open(str(weights_file), framework="pt") as handle:
        for key in handle.keys():
            tensor = handle.get_slice(key)
            module, attribute = _split_key(key, prefix)
            numel = _numel(tensor.get_shape())
            name, size = _DTYPES.get(tensor.get_dtype(), ("float32", 4))
            tensors[module][attribute] = (numel, numel * size, name)
            if attribute == "indices":
                flat[module] = key
    reports = {
        m: ModuleReport(m, shapes.get(_strip_wrapper(m)), StorageReport(tensors[m]), flat.get(m))
        for m in sorted(tensors)
    }
    return config, reports


def _split_key(key: str, prefix: str) -> tuple[str, str]:
    """``base_model.model.x.q_proj.<prefix>values`` -> (``base_model.model.x.q_proj``, ``values``)."""
    module, _, attribute = key.rpartition(".")
    if prefix != "_" and attribute.startswith(prefix):
        return module, attribute[len(prefix) :]
    return module, attribute


def _strip_wrapper(module: str) -> str:
    return module.removeprefix("base_model.model.")


def _numel(shape: list[int]) -> int:
    result = 1
    for size in shape:
        result *= size
    return result


#: safetensors dtype codes -> (torch dtype name, bytes per element)
_DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}  # fmt: skip


def _module_shapes(base: str | None) -> dict[str, tuple[int, int]]:
    """``{module name: (out, in)}`` of every linear layer of the base model, built on the meta device."""
    if not base or not Path(base).is_dir():
        return {}
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        base_config = AutoConfig.from_pretrained(base)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(base_config)
    except (OSError, ValueError):
        return {}
    return {name: tuple(m.weight.shape) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def format_table(config: dict[str, Any], reports: dict[str, ModuleReport]) -> str:
    """The per-module table plus totals, as printed by ``sparse-peft inspect``."""
    method = str(config.get("peft_type", "?")).removeprefix("SPARSE_PEFT_").lower()
    header = f"{'module':<44} {'method':<12} {'shape':>12} {'stored':>10} {'density':>8} {'bytes':>10}"
    lines = [header, "-" * len(header)]
    for report in reports.values():
        shape = "x".join(map(str, report.shape)) if report.shape else "?"
        density = f"{report.density:.2%}" if report.density is not None else "?"
        lines.append(
            f"{_strip_wrapper(report.module):<44} {method:<12} {shape:>12} {report.stored:>10,} {density:>8} "
            f"{report.nbytes:>10,}"
        )
    stored = sum(r.stored for r in reports.values())
    total_bytes = sum(r.nbytes for r in reports.values())
    covered = sum(r.shape[0] * r.shape[1] for r in reports.values() if r.shape)
    overall = f"{stored / covered:.2%}" if covered else "?"
    lines += ["-" * len(header), f"{'total':<44} {method:<12} {'':>12} {stored:>10,} {overall:>8} {total_bytes:>10,}"]
    version, base = config.get("sparse_peft_version", "?"), config.get("base_model_name_or_path")
    lines.append(f"adapter made by sparse_peft {version}; base {base}")
    return "\n".join(lines)


def density_grid(reports: dict[str, ModuleReport]) -> tuple[list[int], list[str], torch.Tensor]:
    """``(layers, module names, grid)`` with ``grid[i, j]`` = density of module ``j`` in layer ``i`` (NaN: absent)."""
    layers = sorted({r.layer for r in reports.values() if r.layer is not None})
    seen = dict.fromkeys(r.short_name for r in reports.values() if r.layer is not None)
    names = sorted(seen, key=lambda n: (_MODULE_ORDER.index(n) if n in _MODULE_ORDER else len(_MODULE_ORDER), n))
    grid = torch.full((len(layers), len(names)), float("nan"))
    for report in reports.values():
        if report.layer is not None and report.density is not None:
            grid[layers.index(report.layer), names.index(report.short_name)] = report.density
    return layers, names, grid


def matrix_mask(adapter_dir: str | Path, report: ModuleReport, config: dict[str, Any]) -> torch.Tensor | None:
    """Boolean ``(out, in)`` map of where ``report``'s module has adapter entries (None if it cannot be known)."""
    if report.shape is None:
        return None
    if report.flat_indices is not None:
        with safe_open(str(Path(adapter_dir) / WEIGHTS_NAME), framework="pt") as handle:
            positions = handle.get_tensor(report.flat_indices).long()
        mask = torch.zeros(report.shape[0] * report.shape[1], dtype=torch.bool)
        mask[positions] = True
        return mask.view(report.shape)
    return _delta_mask(adapter_dir, report, config)


def _delta_mask(adapter_dir: str | Path, report: ModuleReport, config: dict[str, Any]) -> torch.Tensor | None:
    """Non-zero pattern of the module's delta, from base + adapter loaded on CPU (methods without flat indices)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = config.get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        return None
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter_dir))
    layer = model.get_submodule(report.module)
    delta = layer.get_delta_weight("default")
    return delta != 0


def write_heatmap(adapter_dir: str | Path, output: str | Path, module: str | None = None) -> Path:
    """A PNG with the (layer x module) density grid and one matrix's mask; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config, reports = read_adapter(adapter_dir)
    layers, names, grid = density_grid(reports)
    chosen = _pick_module(reports, module)
    mask = matrix_mask(adapter_dir, chosen, config) if chosen is not None else None
    figure, axes = plt.subplots(1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [1, 1.6]})
    image = axes[0].imshow(grid.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    axes[0].set_xticks(range(len(names)), names, rotation=45, ha="right")
    axes[0].set_yticks(range(len(layers)), [str(i) for i in layers])
    axes[0].set_ylabel("layer")
    axes[0].set_title("stored entries / matrix size")
    figure.colorbar(image, ax=axes[0], format=matplotlib.ticker.PercentFormatter(1.0))
    if mask is not None:
        rows, cols = mask.shape
        cells = _downsample(mask).numpy()
        axes[1].imshow(cells, aspect="auto", cmap="magma", interpolation="nearest", extent=(0, cols, rows, 0))
        where = f"{int(mask.sum()):,} of {mask.numel():,}"
        axes[1].set_title(f"{_strip_wrapper(chosen.module)}: where entries sit ({where})")
        axes[1].set_xlabel("input feature")
        axes[1].set_ylabel("output feature")
    else:
        axes[1].set_axis_off()
        axes[1].set_title("mask unavailable (base model not found)")
    method = str(config.get("peft_type", "")).removeprefix("SPARSE_PEFT_").lower()
    figure.suptitle(f"sparse_peft adapter ({method}): {Path(adapter_dir).name}")
    return _save(figure, output)


def _save(figure: Any, output: str | Path) -> Path:
    """Write ``figure`` as a PNG at ``output`` (folders created) and close it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _pick_module(reports: dict[str, ModuleReport], module: str | None) -> ModuleReport | None:
    if module is None:
        candidates = [r for r in reports.values() if r.shape is not None]
        return candidates[0] if candidates else None
    for report in reports.values():
        if _strip_wrapper(report.module) == module or report.module == module:
            return report
    raise ValueError(f"module {module!r} is not in the adapter; pick one from the table")


def _downsample(mask: torch.Tensor, max_side: int = 512) -> torch.Tensor:
    """Shrink a large mask to at most ``max_side`` cells a side; each cell holds the fraction of its entries set."""
    rows, cols = mask.shape
    fr, fc = max(1, -(-rows // max_side)), max(1, -(-cols // max_side))
    padded = torch.nn.functional.pad(mask.float(), (0, (-cols) % fc, 0, (-rows) % fr))
    return torch.nn.functional.avg_pool2d(padded[None, None], (fr, fc))[0, 0]


@dataclass
class MaskMovement:
    """How one module's trainable mask changed between two saves of an adapter: ``kept`` active positions of the
    later save that were active in the earlier one, out of ``total`` (both saves hold ``k`` active entries)."""

    module: str
    kept: int
    total: int

    @property
    def moved(self) -> float:
        """Fraction of the later mask that is new: ``1 − |P_a ∩ P_b| / |P_b|``."""
        return 1.0 - self.kept / self.total if self.total else 0.0

    @property
    def layer(self) -> int | None:
        match = _LAYER.search(f".{self.module}.")
        return int(match.group(1)) if match else None


def mask_movement(earlier: str | Path, later: str | Path) -> dict[str, MaskMovement]:
    """Per module, how much of ``later``'s trainable mask (its flat ``indices``) is not in ``earlier``'s: two
    checkpoints of one entry-sparse run (LIFT refreshes, SpIEL regrowth). Raises when the adapters do not hold flat
    masks of the same modules."""
    config_a, reports_a = read_adapter(earlier)
    config_b, reports_b = read_adapter(later)
    if config_a.get("peft_type") != config_b.get("peft_type") or set(reports_a) != set(reports_b):
        raise ValueError(f"{earlier} and {later} are not two saves of one adapter (method or modules differ)")
    movement = {}
    with (
        safe_open(str(Path(earlier) / WEIGHTS_NAME), framework="pt") as a,
        safe_open(str(Path(later) / WEIGHTS_NAME), framework="pt") as b,
    ):
        for module, report in reports_b.items():
            key = report.flat_indices
            if key is None:
                raise ValueError(f"{module} stores no flat mask (indices): mask movement needs an entry-sparse method")
            before, after = a.get_tensor(key).long(), b.get_tensor(key).long()
            kept = int(torch.isin(after, before).sum())
            movement[module] = MaskMovement(module, kept, after.numel())
    return movement


def format_movement(movement: dict[str, MaskMovement]) -> str:
    """The table printed by ``sparse-peft inspect LATER --compare EARLIER``."""
    header = f"{'module':<44} {'entries':>10} {'kept':>10} {'moved':>8}"
    lines = [header, "-" * len(header)]
    for row in movement.values():
        lines.append(f"{_strip_wrapper(row.module):<44} {row.total:>10,} {row.kept:>10,} {row.moved:>8.2%}")
    total = sum(r.total for r in movement.values())
    kept = sum(r.kept for r in movement.values())
    overall = 1.0 - kept / total if total else 0.0
    lines += ["-" * len(header), f"{'total':<44} {total:>10,} {kept:>10,} {overall:>8.2%}"]
    return "\n".join(lines)


def write_movement_map(movement: dict[str, MaskMovement], output: str | Path, title: str) -> Path:
    """A PNG of the moved fraction per (layer, module): where the mask moved between the two saves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({m.layer for m in movement.values() if m.layer is not None})
    seen = dict.fromkeys(m.module.rsplit(".", 1)[-1] for m in movement.values() if m.layer is not None)
    names = sorted(seen, key=lambda n: (_MODULE_ORDER.index(n) if n in _MODULE_ORDER else len(_MODULE_ORDER), n))
    grid = torch.full((len(layers), len(names)), float("nan"))
    for row in movement.values():
        if row.layer is not None:
            grid[layers.index(row.layer), names.index(row.module.rsplit(".", 1)[-1])] = row.moved
    figure, axis = plt.subplots(figsize=(6.5, 5.5))
    image = axis.imshow(grid.numpy(), aspect="auto", cmap="magma", interpolation="nearest", vmin=0.0)
    axis.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axis.set_yticks(range(len(layers)), [str(i) for i in layers])
    axis.set_ylabel("layer")
    axis.set_title(title)
    figure.colorbar(image, ax=axis, format=matplotlib.ticker.PercentFormatter(1.0))
    return _save(figure, output)
