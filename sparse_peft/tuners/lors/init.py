"""LoRS's gradient-SVD initialization (LoRA-GA-like), from a few training batches."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Optional

import torch
from torch import nn

from .layer import LorsLinear


def lors_gradient_init(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    adapter_name: str = "default",
    gamma: float = 1.0,
    niter: int = 4,
    group: Optional[Any] = None,
) -> int:
    """Initialize every LoRS adapter ``adapter_name`` of ``model`` from the gradient of the loss; returns the count.

    For each LoRS layer, ``G`` is the mean over ``batches`` of ``∂L/∂W_m ⊙ M`` (the gradient of the masked weight
    on the entries that can move); then ``A = (top-r right singular vectors of G)ᵀ / gamma`` (randomized SVD,
    ``q = 4r``, ``niter`` power iterations, as the reference) and ``B = 0``, so the model's outputs are unchanged.
    The reference SVDs the unmasked gradient; masking follows the paper's intent that only ``M`` is trained.

    ``batches`` are dicts of model inputs; ``labels`` default to ``input_ids``. The adapter must be active.
    Memory: one float32 ``out x in`` gradient accumulator per LoRS layer while this runs (the reference's cost),
    freed on return. Under ``torch.distributed`` the accumulators are averaged over ``group`` so every rank gets the
    same initialization.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LorsLinear) and m._has(adapter_name)}
    if not layers:
        raise ValueError(f"lors_gradient_init: the model has no LoRS adapter named {adapter_name!r}")
    inactive = [name for name, m in layers.items() if adapter_name not in m.active_adapters]
    if inactive:
        raise ValueError(f"lors_gradient_init: adapter {adapter_name!r} is not active; call set_adapter first")
    sums: dict[str, torch.Tensor] = {}
    n_batches = _accumulate(model, layers, adapter_name, batches, sums)
    if n_batches == 0:
        raise ValueError("lors_gradient_init needs at least one batch")
    for name, layer in layers.items():
        gradient = _all_reduce_mean(sums.pop(name) / n_batches, group)
        gradient *= layer.get_base_weight() != 0
        _set_factors(layer, adapter_name, gradient, gamma, niter)
    return len(layers)


def _accumulate(
    model: nn.Module,
    layers: dict[str, LorsLinear],
    adapter_name: str,
    batches: Iterable[Mapping[str, torch.Tensor]],
    sums: dict[str, torch.Tensor],
) -> int:
    def hook_for(name: str):
        def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].detach()

            def on_grad(grad: torch.Tensor) -> None:
                g2, x2 = grad.reshape(-1, grad.shape[-1]).float(), x.reshape(-1, x.shape[-1]).float()
                product = g2.t() @ x2  # dense ∂L/∂W_m of this layer, accumulated in float32
                sums[name] = sums[name] + product if name in sums else product

            if output.requires_grad:
                output.register_hook(on_grad)

        return hook

    a_params = [layer.factors(adapter_name)[0] for layer in layers.values()]
    flags = [p.requires_grad for p in a_params]
    handles = [layer.register_forward_hook(hook_for(name)) for name, layer in layers.items()]
    device = next(model.parameters()).device
    count = 0
    try:
        for p in a_params:
            p.requires_grad_(True)  # so every layer output is in the graph
        for batch in batches:
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            inputs.setdefault("labels", inputs["input_ids"])
            model(**inputs).loss.backward()
            count += 1
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(a_params, flags, strict=True):
            p.requires_grad_(flag)
        model.zero_grad(set_to_none=True)
    return count


def _all_reduce_mean(tensor: torch.Tensor, group: Optional[Any]) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor, group=group)
        tensor /= torch.distributed.get_world_size(group)
    return tensor


@torch.no_grad()
def _set_factors(layer: LorsLinear, adapter_name: str, gradient: torch.Tensor, gamma: float, niter: int) -> None:
    a, b = layer.factors(adapter_name)
    rank = a.shape[0]
    q = min(4 * rank, *gradient.shape)
    devices = [gradient.device.index or 0] if gradient.is_cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(layer.adapter_configs[adapter_name].seed)
        _, _, v = torch.svd_lowrank(gradient, q=q, niter=niter)
    top = torch.zeros(rank, gradient.shape[1], dtype=v.dtype, device=v.device)
    top[: min(rank, v.shape[1])] = v[:, :rank].t()
    a.copy_((top / gamma).to(a.dtype))
    b.zero_()
