"""The LIFT layer: a sparse delta on the principal weights, with mask refresh."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ...sparse.regrow import remap_parameter, source_map
from ...sparse.select import principal_score, principal_score_and_basis, topk_positions, warm_principal_score
from ..base import from_checkpoint
from ..sparse_delta import SparseDeltaLinear
from .config import LiftConfig


class LiftLinear(SparseDeltaLinear):
    """LIFT on one linear layer (Liu et al., ICML 2025).

    Forward: ``y = x Wᵀ + b + x ΔWᵀ``, ``ΔW = scatter(values, indices) + scatter(frozen_values, frozen_indices)``.

    Selection: ``indices = top-k |W'|`` (largest magnitudes), ``W' = U_r Σ_r V_rᵀ`` the rank-``filter_rank``
    truncated SVD of the current weight, ``k = (m+n)·rank`` or ``density·m·n``.

    The reference code's July-2025 refactor selects the *smallest* ``|W'|`` (its mask-type string lost the word
    "largest"); this implementation follows the paper and selects the largest.

    Refresh (:meth:`refresh_mask`): the mask is recomputed from ``W + ΔW``. Entries that stay keep their value and
    Adam moments, new entries start at zero, and entries that leave move their learned value into the frozen part,
    so the saved adapter stores the union of all masks used, as in-place training in the reference code does.
    With ``refresh_svd="warm"`` (the default) the refresh's rank-``filter_rank`` approximation is a subspace
    iteration warm-started from the *base* weight's top right singular vectors (see
    :func:`~sparse_peft.sparse.select.warm_principal_score`), kept per adapter (an ``n x 2·filter_rank`` float32
    tensor, not saved: it is a function of the base alone, recomputed on first use after a load or a resume, so a
    resumed run refreshes exactly as an uninterrupted one). The reference code runs a full SVD at every refresh.
    """

    prefix = "sparse_peft_lift_"
    _adapter_state = (*SparseDeltaLinear._adapter_state, "_principal_bases")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_principal_bases"] = {}  # filled by the first selection, which runs inside super().__init__
        super().__init__(*args, **kwargs)

    def budget(self, config: LiftConfig) -> int:
        if config.density is not None:
            return max(1, round(config.density * self.numel))
        return min((self.out_features + self.in_features) * config.r, self.numel)

    def update_layer(self, adapter_name: str, config: LiftConfig, **kwargs) -> None:
        max_rank = min(self.shape)
        if config.filter_rank > max_rank and not from_checkpoint(config):  # loading: the shape check names it
            raise ValueError(
                f"LiftConfig.filter_rank={config.filter_rank} is larger than the matrix {self.module_name} of shape "
                f"{self.shape} allows (at most {max_rank}); lower filter_rank or exclude this module"
            )
        super().update_layer(adapter_name, config, **kwargs)

    def select(
        self, config: LiftConfig, adapter_name: str, k: int, weight: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """``top-k |W'|`` of ``weight`` (default: the base weight, whose right basis is kept for warm refreshes)."""
        if weight is None:
            score = self._base_score(config, adapter_name)
        elif config.refresh_svd == "warm":
            score = warm_principal_score(
                weight, config.filter_rank, self._base_basis(config, adapter_name), niter=config.refresh_niter
            )
        else:
            randomized = config.refresh_svd == "randomized"
            score = principal_score(weight, config.filter_rank, randomized, niter=config.svd_niter, seed=config.seed)
        return topk_positions(score, k, seed=config.seed)

    def _base_score(self, config: LiftConfig, adapter_name: str) -> torch.Tensor:
        """``|W'|`` of the base weight by ``config.svd``; keeps the base's right basis for warm refreshes."""
        score, basis = principal_score_and_basis(
            self.base_weight_float(),
            config.filter_rank,
            randomized=config.svd == "randomized",
            niter=config.svd_niter,
            seed=config.seed,
        )
        self._principal_bases[adapter_name] = basis
        return score

    def _base_basis(self, config: LiftConfig, adapter_name: str) -> torch.Tensor:
        """The base weight's right basis (computed now if this adapter was loaded rather than selected)."""
        if adapter_name not in self._principal_bases:
            self._base_score(config, adapter_name)
        return self._principal_bases[adapter_name]

    def refresh_due(self, adapter_name: str, global_step: int) -> bool:
        """True when the mask of ``adapter_name`` is due for a refresh after optimizer step ``global_step``."""
        interval = self.adapter_configs[adapter_name].update_interval
        return bool(interval) and global_step > 0 and global_step % interval == 0

    def on_step_end(self, adapter_name: str, step: int, optimizer=None, context=None) -> int:
        """LIFT's schedule: refresh the mask after every ``update_interval``-th optimizer step."""
        return self.refresh_mask(adapter_name, optimizer) if self.refresh_due(adapter_name, step) else 0

    @torch.no_grad()
    def refresh_mask(self, adapter_name: str, optimizer: Optional[torch.optim.Optimizer] = None) -> int:
        """Recompute the principal-weight mask from the current weight ``W + ΔW``; returns how many slots changed.

        The dense ``W + ΔW`` and its SVD are transients of this one layer, freed on return.
        """
        if self.merged:
            raise RuntimeError(
                f"cannot refresh the LIFT mask of {self.module_name} while adapters are merged; unmerge first"
            )
        config = self.adapter_configs[adapter_name]
        values, indices = self.values[adapter_name], self.indices[adapter_name]
        current = self.base_weight_float() + self.get_delta_weight(adapter_name).float()
        new_positions = self.select(config, adapter_name, values.numel(), weight=current).to(indices.dtype)
        source = source_map(indices, new_positions)
        leaving = torch.ones(values.numel(), dtype=torch.bool, device=values.device)
        leaving[source[source >= 0]] = False
        self._retire(adapter_name, indices[leaving], values.detach()[leaving])
        remap_parameter(values, source, optimizer)
        indices.copy_(new_positions.to(indices.device))
        return int((source < 0).sum())

    def _retire(self, adapter_name: str, positions: torch.Tensor, learned: torch.Tensor) -> None:
        """Add retiring entries to the frozen part, summing entries that are already there."""
        if positions.numel() == 0:
            return
        frozen_pos = torch.cat([self.frozen_indices[adapter_name].long(), positions.long()])
        frozen_val = torch.cat([self.frozen_values[adapter_name].to(learned.dtype), learned])
        unique, inverse = torch.unique(frozen_pos, return_inverse=True)
        summed = torch.zeros(unique.numel(), dtype=learned.dtype, device=learned.device).index_add_(
            0, inverse, frozen_val
        )
        self.set_frozen(adapter_name, unique, summed)
