"""The diff-pruning layer: an L0-gated dense diff that is projected to a fixed sparse delta mid-training."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from ...groups import CONSTANT_LR, OWN_DECAY, OWN_DECAY_DONE, ROLE
from ...sparse.delta import index_dtype
from ...sparse.hard_concrete import deterministic_gate, expected_l0, sample_gate
from ...sparse.regrow import unwrap_optimizer
from ...sparse.swap import replace_parameters
from ..layer_base import AdapterStore
from ..sparse_delta import SparseDeltaLinear
from .config import DiffPruningConfig


class DiffPruningLinear(SparseDeltaLinear):
    """Diff pruning on one linear layer (Guo, Rush and Kim, ACL 2021).

    Stage 1 (gated dense diff): ``y = x Wᵀ + b + x (z ⊙ w)ᵀ``, ``z = clamp(σ((log u − log(1−u) + log α)/β)(r−l) + l,
    0, 1)`` sampled in training mode and ``z̄ = clamp(σ(log α)(r−l) + l, 0, 1)`` otherwise; with ``structured`` the gate
    is ``z·z_g`` (one extra gate per matrix). Penalty: ``λ·Σ σ(log α − β log(−l/r))`` (times ``σ(log α_g − β
    log(−l/r))`` when structured, the paper's product form; the reference code adds the group term instead).
    Stored: ``<prefix>diff`` (``w``, dense, init 0) and ``<prefix>log_alpha`` (dense, init ``log_alpha_init``),
    plus ``<prefix>group_log_alpha`` (a scalar) when structured. Stage 1 is dense by design, as in the paper (the
    optimizer holds ``w``, ``log α`` and their moments; autograd keeps a few ``out x in`` tensors per layer).

    Stage 3 (after the projection): ``y = x Wᵀ + b + x ΔWᵀ``, ``ΔW = scatter(values, indices)`` on the shared
    sparse-delta engine; stored: ``<prefix>values`` and ``<prefix>indices`` only.

    The reference projects the last *sampled* ``z·w``; we project the deterministic ``z̄·w`` (the paper's intent:
    what the model computes at test time).
    """

    prefix = "sparse_peft_diff_pruning_"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._group: Optional[DiffPruningGroup] = None
        super().__init__(*args, **kwargs)

    # ---- storage -------------------------------------------------------------------------------------------
    diff = AdapterStore("diff")
    log_alpha = AdapterStore("log_alpha")
    group_log_alpha = AdapterStore("group_log_alpha")

    def _ensure_stage1_storage(self) -> None:
        for name in ("diff", "log_alpha", "group_log_alpha"):
            if not hasattr(self, f"{self.prefix}{name}"):
                setattr(self, f"{self.prefix}{name}", nn.ParameterDict({}))

    def stage(self, adapter_name: str) -> int:
        """1 while the gated dense diff trains, 3 once it has been projected to a sparse delta."""
        return 1 if adapter_name in self.diff else 3

    def group(self) -> DiffPruningGroup:
        if self._group is None:
            self._group = DiffPruningGroup([self])
        return self._group

    # ---- adapter lifecycle ---------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: DiffPruningConfig, **kwargs: Any) -> None:
        """Stage 1 for a new adapter; stage 3 (placeholder values and indices that the checkpoint overwrites) when
        ``config.projected_counts`` names this module, i.e. when loading an adapter saved after the projection."""
        self._ensure_stage1_storage()
        self.adapter_configs[adapter_name] = config
        count = config.projected_counts.get(self.module_name)
        device = self._weight_device()
        if count is not None:
            self._allocate_sparse(adapter_name, torch.arange(count), torch.zeros(count))
        else:
            generator = torch.Generator().manual_seed(self.module_seed(config.seed) + 1)
            diff = (
                torch.zeros(self.shape) if config.init_weights else 0.02 * torch.randn(self.shape, generator=generator)
            )
            self.diff[adapter_name] = nn.Parameter(diff.to(device))
            self.log_alpha[adapter_name] = nn.Parameter(
                torch.full(self.shape, float(config.log_alpha_init), device=device)
            )
            if config.structured:
                self.group_log_alpha[adapter_name] = nn.Parameter(
                    torch.tensor(float(config.log_alpha_init), device=device)
                )
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _allocate_sparse(
        self, adapter_name: str, positions: torch.Tensor, values: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> None:
        device = self._weight_device()
        self.values[adapter_name] = nn.Parameter(values.detach().to(device=device, dtype=dtype))
        self.indices[adapter_name] = positions.to(device=device, dtype=index_dtype(self.numel))
        self.frozen_values[adapter_name] = torch.zeros(0, device=device)
        self.frozen_indices[adapter_name] = torch.zeros(0, dtype=index_dtype(self.numel), device=device)
        self._pattern_cache.pop(adapter_name, None)

    def optimizer_settings(self) -> list[tuple[nn.Parameter, dict[str, Any]]]:
        """Stage-1 gate logits train at ``gate_lr``, constant, without weight decay (see :mod:`sparse_peft.groups`)."""
        settings = []
        for name in self.log_alpha:
            gate_lr = self.adapter_configs[name].gate_lr
            if gate_lr is None:
                continue
            group = {"lr": gate_lr, "weight_decay": 0.0, CONSTANT_LR: gate_lr, ROLE: "diff pruning gate logits"}
            settings.append((self.log_alpha[name], group))
            if name in self.group_log_alpha:
                settings.append((self.group_log_alpha[name], group))
        return settings

    # ---- stage 1: gates, diff, penalty ---------------------------------------------------------------------
    def gate(self, adapter_name: str, sample: bool) -> torch.Tensor:
        """``z`` (sampled) or ``z̄`` (deterministic) of shape ``(out, in)``, including the group gate."""
        config: DiffPruningConfig = self.adapter_configs[adapter_name]
        left, right, beta = config.gate_left, config.gate_right, config.gate_temperature
        logits = [self.log_alpha[adapter_name]]
        if adapter_name in self.group_log_alpha:
            logits.append(self.group_log_alpha[adapter_name])
        gates = [sample_gate(a, left, right, beta) if sample else deterministic_gate(a, left, right) for a in logits]
        return gates[0] * gates[1] if len(gates) == 2 else gates[0]

    def gated_diff(self, adapter_name: str, sample: bool = False) -> torch.Tensor:
        """``z ⊙ w`` (``(out, in)``); deterministic unless ``sample``."""
        return self.gate(adapter_name, sample) * self.diff[adapter_name]

    def l0_penalty(self, adapter_name: str) -> torch.Tensor:
        """``λ`` times the expected number of non-zero gates of this layer (differentiable in the logits)."""
        config: DiffPruningConfig = self.adapter_configs[adapter_name]
        args = (config.gate_left, config.gate_right, config.gate_temperature)
        count = expected_l0(self.log_alpha[adapter_name], *args).sum()
        if adapter_name in self.group_log_alpha:
            count = count * expected_l0(self.group_log_alpha[adapter_name], *args)
        return config.l0_lambda * count

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        if self.stage(adapter_name) == 1:
            with torch.no_grad():
                return self.gated_diff(adapter_name)
        return super().get_delta_weight(adapter_name)

    # ---- forward -------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = super().forward(x, *args, **kwargs)  # base output, plus the stage-3 adapters' sparse deltas
        if self.disable_adapters or self.merged:
            return result
        for name in self.active_adapters:
            if name in self.diff:
                delta = self.gated_diff(name, sample=self.training)  # dense transient of this layer (stage 1)
                result = result + F.linear(x.to(delta.dtype), delta).to(result.dtype)
        return result

    # ---- schedule hooks ------------------------------------------------------------------------------------
    def on_step_begin(self, adapter_name: str, step: int, context: Any = None) -> None:
        config: DiffPruningConfig = self.adapter_configs[adapter_name]
        world = getattr(context, "world_size", 1) if context is not None else 1
        total = getattr(context, "total_steps", 0) or 0
        due = config.projection_step is not None and (not total or config.projection_step < total)
        if self.stage(adapter_name) == 1 and world > 1 and due:
            raise RuntimeError(
                f"diff pruning cannot switch from the dense stage to the sparse stage inside a distributed run "
                f"(world size {world}): the DDP wrapper keeps the replaced parameters. Train stage 1 with "
                f"max_steps={config.projection_step} (the projection runs after the last step, identically on every "
                f"rank), save the adapter, and start stage 3 from it with PeftModel.from_pretrained(..., "
                f"is_trainable=True)."
            )

    def on_pre_optimizer_step(self, adapter_name: str, context: Any = None) -> None:
        """Add ``∂(λ·L0)/∂log α`` to the gate logits' gradients, once per optimizer step.

        Done here rather than through the model's loss so that it reaches every trainer: TRL's ``SFTTrainer``
        computes its loss from token log-probabilities and never reads ``outputs.loss``. Once per step also makes
        it independent of gradient accumulation and loss normalisation. The penalty gradient is deterministic, so
        every DDP rank adds the same amount to its (already all-reduced) gradient. Unlike the reference, it is
        added after gradient clipping.
        """
        config: DiffPruningConfig = self.adapter_configs[adapter_name]
        if self.stage(adapter_name) != 1 or not config.l0_lambda:
            return
        params = [self.log_alpha[adapter_name]]
        if adapter_name in self.group_log_alpha:
            params.append(self.group_log_alpha[adapter_name])
        if not params[0].requires_grad:
            return
        with torch.enable_grad():
            grads = torch.autograd.grad(self.l0_penalty(adapter_name), params)
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad.detach() if param.grad is None else param.grad.add_(grad.to(param.grad.dtype))

    def on_step_end(self, adapter_name: str, step: int, optimizer: Any = None, context: Any = None) -> int:
        """Project (stage 2) after optimizer step ``projection_step``; returns how many entries survived."""
        config: DiffPruningConfig = self.adapter_configs[adapter_name]
        if self.stage(adapter_name) == 1 and config.projection_step is not None and step >= config.projection_step:
            total = getattr(context, "total_steps", 0) or 0
            return self.group().project(adapter_name, optimizer, remaining_steps=max(0, total - step))
        return 0

    # ---- stage 2 -> 3 ----------------------------------------------------------------------------------------
    def finish_projection(
        self, adapter_name: str, positions: torch.Tensor, optimizer: Optional[torch.optim.Optimizer] = None
    ) -> None:
        """Turn stage 1 into the stage-3 sparse delta at ``positions`` (flat, sorted) and drop ``w`` and ``log α``
        from the layer and from ``optimizer`` (param groups and state), so that they are freed."""
        config: DiffPruningConfig = self.adapter_configs[adapter_name]
        with torch.no_grad():
            source = self.gated_diff(adapter_name) if config.finetune_init == "gated" else self.diff[adapter_name]
            init = source.reshape(-1)[positions.to(source.device).long()].clone()
            del source
        old = [self.diff.pop(adapter_name), self.log_alpha.pop(adapter_name)]
        if adapter_name in self.group_log_alpha:
            old.append(self.group_log_alpha.pop(adapter_name))
        self._allocate_sparse(adapter_name, positions, init, dtype=old[0].dtype)
        new = self.values[adapter_name]
        new.requires_grad_(old[0].requires_grad)
        replace_parameters(optimizer, old, [new])
        for param in old:
            param.grad = None
        config.projected_counts[self.module_name] = int(positions.numel())

    # ---- merge / unmerge -------------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Stage-3 adapters merge their entries (the engine's merge); stage-1 adapters merge ``z̄ ⊙ w`` densely,
        keeping a copy of the weight so that :meth:`unmerge` is exact."""
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.diff:
                super().merge(safe_merge, [name])
                continue
            if self.quantization_backend is not None:
                self._warn_lossy_merge()
            weight = self.get_base_weight()
            self._commit_merge(name, weight + self.get_delta_weight(name).to(weight.dtype), safe_merge, weight.clone())

    def _restore_merged(self, name: str, original: torch.Tensor) -> None:
        if original.shape == self.shape and name not in self.values:  # a stage-1 merge kept the whole weight
            self.set_base_weight(original)
        else:
            super()._restore_merged(name, original)

    # ---- loading ---------------------------------------------------------------------------------------------
    def adopt_checkpoint_layout(self, module_key: str, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
        """A checkpoint saved after the projection, loaded into a layer still in stage 1 (``Trainer`` resuming a
        run past ``projection_step`` rebuilds the model in stage 1): switch to stage 3 with the checkpoint's size.
        ``state_dict`` has checkpoint keys (no adapter name)."""
        if adapter_name not in self.diff:
            return
        key = f"{module_key}.{self.prefix}values"
        saved = state_dict.get(key, state_dict.get(f"base_model.model.{key}"))
        if saved is None:
            return
        for store in (self.diff, self.log_alpha, self.group_log_alpha):
            if adapter_name in store:
                del store[adapter_name]
        self._allocate_sparse(adapter_name, torch.arange(saved.numel()), torch.zeros(saved.numel()))
        self.adapter_configs[adapter_name].projected_counts[self.module_name] = saved.numel()

    def prepare_load(self, module_key: str, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
        """The saved adapter omits the empty frozen part of the engine; put it back so that nothing is missing."""
        if adapter_name in self.values:
            for name, dtype in (("frozen_values", self.values[adapter_name].dtype), ("frozen_indices", None)):
                key = f"{module_key}.{self.prefix}{name}.{adapter_name}".lstrip(".")
                if key not in state_dict:
                    dtype = dtype or self.indices[adapter_name].dtype
                    state_dict[key] = torch.zeros(0, dtype=dtype)
        super().prepare_load(module_key, adapter_name, state_dict)


_P = DiffPruningLinear.prefix
# SparseDeltaLinear.__init_subclass__ names only the stage-3 containers; the stage-1 ones are trainable too.
DiffPruningLinear.adapter_layer_names = (f"{_P}values", f"{_P}diff", f"{_P}log_alpha", f"{_P}group_log_alpha")


def global_magnitude_mask(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly ``k`` entries: all above one threshold ``τ`` (the ``k``-th largest magnitude), then
    entries equal to ``τ`` in flat order. Deterministic for given inputs (identical on every DDP rank)."""
    n = magnitudes.numel()
    if not 0 < k <= n:
        raise ValueError(f"cannot keep k={k} of {n} entries")
    tau = torch.kthvalue(magnitudes, n - k + 1).values
    keep = magnitudes > tau
    missing = k - int(keep.sum())
    if missing > 0:
        keep[(magnitudes == tau).nonzero().flatten()[:missing]] = True
    return keep


class DiffPruningGroup:
    """All diff-pruning layers of one model: the projection uses one threshold over all of them."""

    def __init__(self, layers: list[DiffPruningLinear]) -> None:
        self.layers = layers

    @torch.no_grad()
    def project(
        self, adapter_name: str, optimizer: Optional[torch.optim.Optimizer] = None, remaining_steps: int = 0
    ) -> int:
        """Stage 2: keep the ``round(density·N)`` largest ``|z̄ ⊙ w|`` over all layers still in stage 1,
        switch every layer to stage 3 and update ``optimizer``; returns the number of kept entries.

        The gated diffs are DDP-synchronised parameters and the threshold is a deterministic function of them, so
        every rank projects identically. Transient: one float32 vector of all targeted magnitudes.
        """
        layers = [layer for layer in self.layers if adapter_name in layer.diff]
        if not layers:
            return 0
        config: DiffPruningConfig = layers[0].adapter_configs[adapter_name]
        device = layers[0].diff[adapter_name].device
        magnitudes = torch.cat(
            [layer.gated_diff(adapter_name).abs().float().reshape(-1).to(device) for layer in layers]
        )
        k = min(max(1, round(config.density * magnitudes.numel())), magnitudes.numel())
        keep = global_magnitude_mask(magnitudes, k)
        del magnitudes
        start = 0
        for layer in layers:
            part = keep[start : start + layer.numel]
            start += layer.numel
            layer.finish_projection(adapter_name, part.nonzero().flatten(), optimizer)
        values = [layer.values[adapter_name] for layer in layers]
        own_stage3_schedule(optimizer, values, config.finetune_lr_scale, remaining_steps)
        return k


def own_stage3_schedule(
    optimizer: Optional[torch.optim.Optimizer], values: list[torch.Tensor], scale: Optional[float], steps: int
) -> None:
    """Give stage 3 a schedule of its own: the optimizer group holding the new ``values`` (the diff's group) trains
    at ``scale`` times the rate it started from (``initial_lr`` under a scheduler), decaying linearly to 0 over the
    ``steps`` left (constant when the run's length is unknown), whatever the trainer's schedule does
    (:func:`sparse_peft.groups.keep_constant_rates` sets it before every step). A group that also trains other
    parameters keeps the trainer's schedule, with a warning: give those parameters groups of their own
    (:func:`sparse_peft.param_groups`)."""
    if optimizer is None or scale is None:
        return
    ids = {id(v) for v in values}
    for group in unwrap_optimizer(optimizer).param_groups:
        held = [p for p in group["params"] if id(p) in ids]
        if not held:
            continue
        if len(held) != len(group["params"]):
            warnings.warn(
                f"diff pruning stage 3 keeps the trainer's learning-rate schedule: its values share an optimizer "
                f"group with {len(group['params']) - len(held)} other parameters; build the optimizer over "
                f"sparse_peft.param_groups(model, lr) (or sparse_peft.use_param_groups(trainer)) for stage 3's own "
                f"rate, or set finetune_lr_scale=None",
                UserWarning,
                stacklevel=3,
            )
            continue
        peak = scale * group.get("initial_lr", group["lr"])
        group.pop(CONSTANT_LR, None)
        group.update({"lr": peak, ROLE: "diff pruning stage-3 values"})
        group.update({OWN_DECAY: (peak, steps), OWN_DECAY_DONE: 0} if steps > 0 else {CONSTANT_LR: peak})
