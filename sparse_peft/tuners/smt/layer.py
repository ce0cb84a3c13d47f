"""The SMT layer: trainable dense blocks of a frozen matrix, chosen once from warm-up gradients."""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from ...sparse.regrow import unwrap_optimizer
from ...sparse.slices import (
    BlockLayout,
    block_extents,
    block_matmul,
    block_scores,
    blocks_to_dense,
    gather_blocks,
    grid_shape,
    scatter_blocks,
    tap_gradient,
)
from ...sparse.stats import Window, calibrating
from ..layer_base import AdapterStore, SparseLayerBase
from .config import SmtConfig


class SmtLinear(SparseLayerBase):
    """SMT on one linear layer (He et al., ICLR 2025, "Sparse Matrix Tuning").

    Forward: ``y = x Wᵀ + b + x ΔWᵀ`` with ``ΔW[r_i·b : r_i·b+h_i, c_i·b : c_i·b+w_i] = B_i[:h_i, :w_i]`` for the
    selected blocks ``i`` (``h_i, w_i < b`` only at the grid's edges).

    Stored per adapter: ``sparse_peft_smt_blocks`` (trainable, ``(capacity, b, b)``, fixed from creation on) and
    ``sparse_peft_smt_positions`` (persistent int32 buffer ``(capacity, 2)`` of block-grid coordinates
    ``(r_i, c_i)``; ``-1`` marks an unused slot, used slots come first in row-major order).

    Schedule (gradient-only warm-up, the default and only warm-up offered): during optimizer steps
    ``1..window_steps`` a :class:`~sparse_peft.sparse.slices.GradientTap` on the output adds each micro-batch's
    ``∂L/∂W = gᵀx`` to a float32 accumulator ``G`` (one dense ``(out, in)`` tensor per target matrix, as in the
    reference code, freed at selection); the base weight and the model's function do not change. After step
    ``window_steps`` a :class:`BlockSelector` scores the blocks of every target matrix and picks the top blocks,
    globally or per matrix. The reference code instead runs real full fine-tuning for the warm-up (updating ``W``);
    that variant is not implemented here.

    Training: :class:`~sparse_peft.sparse.slices.BlockMatmul` saves only the input column slices the selected
    blocks read and returns each block's gradient ``g[rows]ᵀ · x[cols]``; no dense weight gradient is formed.
    Merge writes the blocks into ``W``; unmerge writes the saved original blocks back (exact).
    """

    prefix: str = "sparse_peft_smt_"
    adapter_layer_names: tuple[str, ...] = ("sparse_peft_smt_blocks",)
    other_param_names: tuple[str, ...] = ("sparse_peft_smt_positions",)
    _adapter_state = (*SparseLayerBase._adapter_state, "selectors", "_grad_acc", "_groups", "_layouts", "_collecting")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SmtConfig, module_name: str = "") -> None:
        super().__init__(base_layer, module_name)
        self.sparse_peft_smt_blocks = nn.ParameterDict({})
        self.sparse_peft_smt_positions = BufferDict({}, persistent=True)
        self.selectors: dict[str, BlockSelector] = {}
        self._grad_acc: dict[str, Window] = {}  # Σ ∂L/∂W of the warm-up (or of the calibration pass)
        self._collecting: set[str] = set()
        self._groups: dict[str, Any] = {}
        self._layouts: dict[str, tuple[tuple, Optional[BlockLayout], int]] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    # ---- storage -------------------------------------------------------------------------------------------
    blocks = AdapterStore("blocks")
    positions = AdapterStore("positions")

    def grid(self, adapter_name: str) -> tuple[int, int]:
        return grid_shape(self.shape, self.adapter_configs[adapter_name].block_size)

    def grid_blocks(self, adapter_name: str) -> int:
        rows, cols = self.grid(adapter_name)
        return rows * cols

    def matrix_budget(self, config: SmtConfig) -> int:
        """Per-matrix budget (``selection="per_matrix"``), capped by the grid."""
        total = math.prod(grid_shape(self.shape, config.block_size))
        wanted = config.num_blocks if config.num_blocks is not None else max(1, round(config.density * total))
        return min(wanted, total)

    def update_layer(self, adapter_name: str, config: SmtConfig, **kwargs: Any) -> None:
        """Create ``adapter_name`` with nothing selected yet; global capacities are set by :func:`allocate`."""
        self.adapter_configs[adapter_name] = config
        capacity = self.matrix_budget(config) if config.selection == "per_matrix" else 1
        b = config.block_size
        device = self._weight_device()
        self.blocks[adapter_name] = nn.Parameter(torch.zeros(capacity, b, b, device=device))
        self.positions[adapter_name] = torch.full((capacity, 2), -1, dtype=torch.int32, device=device)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def allocate(self, adapter_name: str, capacity: int) -> None:
        """Give ``adapter_name`` ``capacity`` empty slots (called once, before any optimizer exists)."""
        old = self.blocks[adapter_name]
        if old.shape[0] == capacity:
            return
        b = old.shape[-1]
        self.blocks[adapter_name] = nn.Parameter(
            torch.zeros(capacity, b, b, dtype=old.dtype, device=old.device), requires_grad=old.requires_grad
        )
        pos = self.positions[adapter_name]
        self.positions[adapter_name] = torch.full((capacity, 2), -1, dtype=pos.dtype, device=pos.device)

    def layout(self, adapter_name: str) -> tuple[Optional[BlockLayout], int]:
        """The selected blocks' layout and count (``None, 0`` before selection), cached per positions version."""
        pos = self.positions[adapter_name]
        key = (pos, pos._version)
        cached = self._layouts.get(adapter_name)
        if cached is not None and cached[0][0] is pos and cached[0][1] == pos._version:
            return cached[1], cached[2]
        used = int((pos[:, 0] >= 0).sum())
        built = (
            BlockLayout.build(pos[:used], self.shape, self.adapter_configs[adapter_name].block_size) if used else None
        )
        self._layouts[adapter_name] = (key, built, used)
        return built, used

    def selected(self, adapter_name: str) -> bool:
        """True when this layer holds selected blocks (a matrix can get none under a global budget)."""
        return bool((self.positions[adapter_name][:, 0] >= 0).any())

    def selector(self, adapter_name: str) -> BlockSelector:
        return self.selectors.setdefault(adapter_name, BlockSelector(adapter_name, [self]))

    # ---- warm-up statistics and selection -------------------------------------------------------------------
    def on_step_begin(self, adapter_name: str, step: int, context: Any = None) -> None:
        config = self.adapter_configs[adapter_name]
        if step <= config.window_steps and not self.selector(adapter_name).done():
            self._collecting.add(adapter_name)
            self._groups[adapter_name] = getattr(context, "group", None)
        else:
            self._collecting.discard(adapter_name)

    def on_pre_optimizer_step(self, adapter_name: str, context: Any = None) -> None:
        """Nothing to do: block scores are scale-invariant, so clipping does not change the selection."""

    def on_step_end(self, adapter_name: str, step: int, optimizer: Any = None, context: Any = None) -> int:
        """After step ``window_steps`` select the blocks (once, for all matrices); returns how many were chosen."""
        config = self.adapter_configs[adapter_name]
        if step < config.window_steps or self.selector(adapter_name).done():
            return 0
        self._collecting.discard(adapter_name)
        return self.selector(adapter_name).select(getattr(context, "group", None), optimizer=optimizer)

    # ---- the calibration pass (sparse_peft.calibrate): selection before the optimizer exists ---------------------
    def calibration_mode(self, adapter_name: str) -> Optional[str]:
        """``"gradient"`` until the blocks are selected."""
        return None if self.selector(adapter_name).done() else "gradient"

    def finish_calibration(self, adapter_name: str, window: Window) -> None:
        """Keep the (all-reduced) ``Σ ∂L/∂W`` of the calibration batches for :meth:`after_calibration`."""
        self._grad_acc[adapter_name] = window

    def after_calibration(self, adapter_name: str) -> None:
        """Select the blocks of every matrix at exactly the budget and size each matrix's slots to its blocks (the
        first layer to get here does it for all; no optimizer exists yet, so the block tensors can be replaced)."""
        self.selector(adapter_name).select(exact=True)

    def _accumulate(self, adapter_name: str, grad_out: torch.Tensor, x: torch.Tensor) -> None:
        self._grad_acc.setdefault(adapter_name, Window("gradient")).add_gradient(grad_out, x)

    @torch.no_grad()
    def block_score_grid(self, adapter_name: str, group: Any = None) -> torch.Tensor:
        """Scores of every block cell from the accumulated gradient (summed over processes); frees ``G``."""
        config = self.adapter_configs[adapter_name]
        window = self._grad_acc.pop(adapter_name, None) or Window("gradient")
        if window.gradient is None:  # every rank takes part in the all-reduce, data or not
            window.gradient = torch.zeros(self.shape, dtype=torch.float32, device=self._weight_device())
        return block_scores(window.commit(group).gradient, config.block_size, config.block_score)

    @torch.no_grad()
    def assign(self, adapter_name: str, coords: torch.Tensor) -> None:
        """Train the blocks at grid ``coords`` (``(k, 2)``, k ≤ capacity): zero (or random) values, in place."""
        blocks, pos = self.blocks[adapter_name], self.positions[adapter_name]
        if coords.shape[0] > pos.shape[0]:
            raise ValueError(f"{self.module_name}: {coords.shape[0]} blocks exceed the capacity {pos.shape[0]}")
        gc = self.grid(adapter_name)[1]
        coords = coords.long().cpu()
        coords = coords[torch.argsort(coords[:, 0] * gc + coords[:, 1])]
        pos.fill_(-1)
        pos[: coords.shape[0]] = coords.to(pos)
        blocks.zero_()
        config = self.adapter_configs[adapter_name]
        if not config.init_weights and coords.shape[0]:
            generator = torch.Generator().manual_seed(self.module_seed(config.seed) + 1)
            noise = 0.02 * torch.randn(blocks.shape, generator=generator)
            heights, widths = block_extents(coords, self.shape, config.block_size)
            for i, (h, w) in enumerate(zip(heights.tolist(), widths.tolist(), strict=True)):
                blocks[i, :h, :w] = noise[i, :h, :w].to(blocks)

    # ---- forward -------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result, final = self._base_forward(x, *args, **kwargs)
        if final:
            return result
        for name in self._active_in(self.blocks):
            blocks = self.blocks[name]
            if self.training and torch.is_grad_enabled() and not calibrating():
                if name in self._collecting:
                    result = tap_gradient(result, x, blocks, partial(self._accumulate, name))
                elif not self.selector(name).done():
                    raise RuntimeError(self._unselected_message(name))
            layout, used = self.layout(name)
            if layout is None:
                continue
            delta = block_matmul(x, blocks if used == blocks.shape[0] else blocks[:used], layout)
            result = result + delta.to(result.dtype)
        return result

    def _unselected_message(self, adapter_name: str) -> str:
        steps = self.adapter_configs[adapter_name].window_steps
        return (
            f"SMT adapter {adapter_name!r} has not selected its blocks yet, so there is nothing to train. Either call "
            f"sparse_peft.calibrate(model, batches) before building the optimizer (selection at exactly the "
            f"budget), or train with transformers/TRL and callbacks=[sparse_peft.SparsePeftCallback()] (a "
            f"{steps}-step gradient warm-up inside training), or in a custom loop call sparse_peft.begin_step(model, "
            f"step) before and sparse_peft.refresh_masks(model, step, optimizer) after every optimizer step"
        )

    # ---- merge / unmerge -----------------------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Dense ``ΔW`` of one adapter (merging and inspection only)."""
        layout, used = self.layout(adapter_name)
        if layout is None:
            return torch.zeros(self.shape, device=self._weight_device())
        return blocks_to_dense(self.blocks[adapter_name].detach()[:used], layout)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """``W ← W + ΔW`` block by block; the replaced blocks are kept so :meth:`unmerge` restores ``W`` exactly."""
        for name in self._adapters_to_merge(adapter_names):
            if name not in self.blocks:
                continue
            layout, used = self.layout(name)
            if layout is None:
                self.merged_adapters.append(name)
                continue
            weight = self.get_base_weight()
            merged = scatter_blocks(weight, self.blocks[name].detach()[:used], layout, add=True)
            self._commit_merge(name, merged, safe_merge, (layout, gather_blocks(weight, layout)))

    def unmerge(self) -> None:
        for _, (layout, originals) in self._saved_merges():
            self.set_base_weight(scatter_blocks(self.get_base_weight(), originals, layout, add=False))

    # ---- loading and resume --------------------------------------------------------------------------------
    def prepare_load(self, module_key: str, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
        """Check the checkpoint's block coordinates fit this layer's grid and its slot count matches."""
        if adapter_name not in self.blocks:
            return
        key = f"{module_key}.{self.prefix}positions.{adapter_name}".lstrip(".")
        saved = state_dict.get(key)
        if saved is None:
            raise ValueError(f"the adapter checkpoint has no block positions for {module_key}; re-save the adapter")
        gr, gc = self.grid(adapter_name)
        used = saved[saved[:, 0] >= 0]
        if saved.shape != self.positions[adapter_name].shape or (
            used.numel() and (int(used[:, 0].max()) >= gr or int(used[:, 1].max()) >= gc)
        ):
            raise ValueError(
                f"adapter blocks for {module_key} ({tuple(saved.shape)}) do not fit this layer of shape {self.shape} "
                f"with block_size {self.adapter_configs[adapter_name].block_size} and "
                f"{self.positions[adapter_name].shape[0]} slots: load the adapter into the base model (and config) "
                f"it was trained with"
            )

    def export_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The open warm-up accumulator ``Σ ∂L/∂W`` (float32, ``out x in``) and its batch count."""
        window = self._grad_acc.get(adapter_name)
        if window is None or window.gradient is None:
            return {}
        return {"gradient": window.gradient.detach(), "batches": torch.tensor(window.batches)}

    def import_state(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
        gradient = tensors["gradient"].to(device=self._weight_device(), dtype=torch.float32).clone()
        self._grad_acc[adapter_name] = Window("gradient", gradient=gradient, batches=int(tensors["batches"]))


class BlockSelector:
    """The model-level, one-shot block selection of one adapter over all its :class:`SmtLinear` layers.

    Every layer keeps a reference; the first layer whose ``on_step_end`` reaches the end of the warm-up runs it
    for all of them, in the fixed layer order (so DDP collectives line up). Scores are all-reduced over the
    statistics group first; ties are broken by a seeded random order: every rank picks the same blocks.
    """

    def __init__(self, adapter_name: str, layers: list[SmtLinear]) -> None:
        self.adapter_name = adapter_name
        self.layers = layers
        self._done = False

    def done(self) -> bool:
        """Whether the selection has run (here, or before saving the checkpoint these layers were loaded from)."""
        if not self._done:
            self._done = any(layer.selected(self.adapter_name) for layer in self.layers)
        return self._done

    def budget(self) -> int:
        config = self.layers[0].adapter_configs[self.adapter_name]
        total = sum(layer.grid_blocks(self.adapter_name) for layer in self.layers)
        return config.num_blocks if config.num_blocks is not None else max(1, round(config.density * total))

    @torch.no_grad()
    def select(self, group: Any = None, optimizer: Any = None, exact: bool = False) -> int:
        """Score every block and train the top ones; returns how many were chosen.

        ``exact`` (the calibration pass, before any optimizer exists): global selection takes the top ``n`` blocks
        over all matrices with no per-matrix cap (unless ``max_blocks_per_matrix`` is set), and every matrix's
        storage is resized to the blocks it got, so the trainable count is the budget. Otherwise (in-training
        warm-up) the blocks go into the slots allocated up front, and the blocks' optimizer state (AdamW's zero-
        gradient warm-up steps) is dropped, so a block's first real step is a fresh Adam step.
        """
        name = self.adapter_name
        if self.done():
            return 0
        self._done = True
        layers = self.layers
        config = layers[0].adapter_configs[name]
        scores = [layer.block_score_grid(name, group).cpu() for layer in layers]
        if config.selection == "per_matrix":
            budgets = [layer.matrix_budget(config) for layer in layers]
            chosen = [_top_cells(score, k, config.seed) for score, k in zip(scores, budgets, strict=True)]
        else:
            if exact:
                cap = config.max_blocks_per_matrix or max(s.numel() for s in scores)
                capacities = [min(cap, s.numel()) for s in scores]
            else:
                capacities = [layer.positions[name].shape[0] for layer in layers]
            chosen = _global_top(scores, capacities, self.budget(), config.seed)
        inner = unwrap_optimizer(optimizer) if optimizer is not None else None
        for layer, coords in zip(layers, chosen, strict=True):
            if exact:
                layer.allocate(name, coords.shape[0])
                config.block_counts[layer.module_name] = int(coords.shape[0])
            layer.assign(name, coords)
            if inner is not None:
                inner.state.pop(layer.blocks[name], None)
        return sum(c.shape[0] for c in chosen)


def _ranked(flat: torch.Tensor, seed: int) -> torch.Tensor:
    """Indices of ``flat`` from the largest score down, ties in a seeded random order."""
    order = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(seed))
    return order[torch.sort(flat[order], descending=True, stable=True).indices]


def _top_cells(score: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    cols = score.shape[1]
    top = _ranked(score.reshape(-1).float(), seed)[:k]
    return torch.stack([top // cols, top % cols], dim=1)


def _global_top(scores: list[torch.Tensor], capacities: list[int], n: int, seed: int) -> list[torch.Tensor]:
    """Top ``n`` cells over all matrices, taking them in score order and skipping matrices whose slots are full."""
    owners = torch.cat([torch.full((s.numel(),), i) for i, s in enumerate(scores)])
    local = torch.cat([torch.arange(s.numel()) for s in scores])
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    counts = [0] * len(scores)
    picked: list[list[int]] = [[] for _ in scores]
    taken = 0
    for idx in _ranked(flat, seed).tolist():
        owner = int(owners[idx])
        if counts[owner] < capacities[owner]:
            counts[owner] += 1
            picked[owner].append(int(local[idx]))
            taken += 1
            if taken == n:
                break
    out = []
    for score, cells in zip(scores, picked, strict=True):
        cells_t = torch.tensor(cells, dtype=torch.long)
        out.append(torch.stack([cells_t // score.shape[1], cells_t % score.shape[1]], dim=1))
    return out


def allocate(layers: list[SmtLinear], adapter_name: str) -> BlockSelector:
    """Size every layer's slots for ``adapter_name`` and attach one shared :class:`BlockSelector`.

    Per matrix: capacity = the per-matrix budget (already allocated). Global: ``max_blocks_per_matrix`` or ``⌈2n/M⌉``,
    raised until the capacities hold the budget ``n``. An adapter calibrated before (``config.block_counts``) gets
    exactly its saved counts. Runs inside ``get_peft_model`` / ``add_adapter`` /
    ``from_pretrained``, i.e. before an optimizer exists, and gives the same shapes every time (loading relies on it).
    """
    selector = BlockSelector(adapter_name, layers)
    if not layers:
        return selector
    config = layers[0].adapter_configs[adapter_name]
    if config.block_counts:  # sizes chosen by a calibration pass (loading a calibrated adapter)
        for layer in layers:
            layer.allocate(adapter_name, config.block_counts.get(layer.module_name, 0))
    elif config.selection == "global":
        grids = [layer.grid_blocks(adapter_name) for layer in layers]
        n = selector.budget()
        if n > sum(grids):
            raise ValueError(
                f"SmtConfig.num_blocks={n} exceeds the {sum(grids)} blocks of size {config.block_size} in the "
                f"{len(layers)} target matrices; lower num_blocks or block_size"
            )
        cap = config.max_blocks_per_matrix or math.ceil(2 * n / len(layers))
        if config.max_blocks_per_matrix and sum(min(cap, g) for g in grids) < n:
            raise ValueError(
                f"SmtConfig.max_blocks_per_matrix={cap} leaves room for only {sum(min(cap, g) for g in grids)} of "
                f"the {n} blocks to select; raise max_blocks_per_matrix or lower num_blocks"
            )
        while sum(min(cap, g) for g in grids) < n:
            cap += 1
        for layer, g in zip(layers, grids, strict=True):
            layer.allocate(adapter_name, min(cap, g))
    for layer in layers:
        layer.selectors[adapter_name] = selector
    return selector
