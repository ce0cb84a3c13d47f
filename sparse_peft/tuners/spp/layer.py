"""The SPP layer: a pruned weight rescaled entry-wise by a grouped rank-one factor."""

from __future__ import annotations

import torch

from ..recompute_layer import WeightRecomputeLayer, kaiming_uniform
from .config import SppConfig


class SppLinear(WeightRecomputeLayer):
    """SPP on one linear layer (Lu et al., ICML 2024, "SPP: Sparsity-Preserved Parameter-Efficient Fine-Tuning").

    Forward: ``y = x·W'ᵀ + b`` with ``W' = W̃ ⊙ (1 + s·β·α̂)``, where ``α`` is ``G x in`` (Kaiming-uniform),
    ``β`` is ``out`` (zero at start, so ``W' = W̃``) and ``α̂ = repeat_interleave(α, out/G, dim 0)``: output row
    ``i`` uses ``α[⌊i·G/out⌋]``. Stores ``α`` and ``β`` (``G·in + out`` numbers per matrix). Saved for backward:
    ``x``, ``α``, ``β``; ``W'`` is rebuilt in backward (the reference checkpoints the layer instead), and the factor
    gradients are exact. Several active adapters multiply: ``W̃ ⊙ Π_k (1 + s_k·β_k·α̂_k)``, which is what merging
    them one after another gives.

    Merge: ``W̃ ← W̃ ⊙ (1 + s·β·α̂)``, so zeros stay zero (unstructured, 2:4, 4:8) with no mask at all. Unmerge
    restores a copy of ``W̃`` kept at merge time (the reference's unmerge is broken, and dividing by
    ``1 + s·β·α̂`` would neither be exact nor safe where it is 0). The reference's LoRS reimplementation of SPP
    leaves ``s`` out of the merge; we merge what the forward computes.
    """

    prefix = "sparse_peft_spp_"
    factor_names = ("alpha", "beta")

    def update_layer(self, adapter_name: str, config: SppConfig, **kwargs) -> None:
        if self.out_features % config.groups:
            divisors = [g for g in range(1, min(self.out_features, 64) + 1) if self.out_features % g == 0]
            raise ValueError(
                f"SppConfig.groups={config.groups} does not divide out_features={self.out_features} of "
                f"{self.module_name or 'a target layer'}; pick groups from {divisors} or exclude this module"
            )
        super().update_layer(adapter_name, config, **kwargs)

    def init_factors(self, config: SppConfig) -> dict[str, torch.Tensor]:
        generator = self._generator(config)
        alpha = kaiming_uniform(config.groups, self.in_features, generator)
        beta = torch.zeros(self.out_features)
        if not config.init_weights:
            beta = torch.randn(self.out_features, generator=generator)
        return {"alpha": alpha, "beta": beta}

    def apply_adapter(
        self, weight: torch.Tensor, base: torch.Tensor, config: SppConfig, alpha: torch.Tensor, beta: torch.Tensor
    ) -> torch.Tensor:
        groups, rows = config.groups, self.out_features // config.groups
        factor = 1 + config.scaling * beta.view(groups, rows, 1) * alpha.view(groups, 1, -1)
        return (weight.reshape(groups, rows, -1) * factor).reshape(self.out_features, -1)
