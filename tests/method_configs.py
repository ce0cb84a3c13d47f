"""Small configs of every method for the tiny test models (one place, shared by the cross-method tests)."""

from __future__ import annotations

from typing import Any

import sparse_peft

#: Per method: config kwargs that give a working adapter on ``tiny_llama`` / ``tiny_chat_model`` within a few steps.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "lift": {"r": 2, "filter_rank": 4, "update_interval": 2},
    "spiel": {"density": 0.05, "reselection_steps": 3, "window_steps": 1},
    "rosa": {"r": 2, "lora_alpha": 4, "density": 0.05, "schedule": "wl1", "window_steps": 1},
    "smt": {"block_size": 16, "num_blocks": 4, "window_steps": 1},
    "s2ft": {"v_ratio": 0.5, "o_ratio": 0.5},
    "spp": {"groups": 4},
    "lors": {"r": 2, "lora_alpha": 2},
    "snell": {"r": 4, "sparsity": 0.5},
    "diff_pruning": {"density": 0.05, "projection_step": 2},
}

#: Overrides for the 6-step DDP run (schedules that pick or move masks within the run).
DDP_OVERRIDES: dict[str, dict[str, Any]] = {
    "spiel": {"density": 0.1, "reselection_steps": 3, "window_steps": 2},
    "diff_pruning": {"projection_step": None},  # the worker projects between two DDP runs
    # the Fisher and Σx² windows both all-reduced (the plain Fisher's all-reduce is the same code, without Σx²)
    "rosa": {"mask_score": "input_normalized", "mask_scope": "row"},
}

#: Methods whose masks are chosen or changed during training, and a substring of their mask tensors' names.
MASK_METHODS: dict[str, str] = {
    "lift": "indices",
    "spiel": "indices",
    "rosa": "indices",
    "smt": "positions",
    "diff_pruning": "indices",
}


def tiny_config(method: str, **overrides: Any):
    """The method's config for tiny models, with ``overrides``."""
    config_cls = sparse_peft.METHODS[method][0]
    return config_cls(task_type="CAUSAL_LM", **{**TINY_CONFIGS[method], **overrides})


def ddp_config(method: str):
    return tiny_config(method, **DDP_OVERRIDES.get(method, {}))


#: Per method: config overrides for a bitsandbytes 4-bit (NF4) base.
QUANTIZED_4BIT: dict[str, dict[str, Any]] = {method: {} for method in TINY_CONFIGS}

#: Methods with a schedule and the overrides that make it act around the step-3 checkpoint of a 6-step run (with a
#: statistics window open at the checkpoint where the method has one).
RESUME_CONFIGS: dict[str, dict[str, Any]] = {
    "lift": {"update_interval": 2},
    "spiel": {"density": 0.1, "reselection_steps": 5, "window_steps": 4},  # window open at step 3
    "rosa": {"schedule": "wl2", "window_steps": 2},
    "smt": {"window_steps": 4},
    "diff_pruning": {"projection_step": 2},
}


#: Methods that fine-tune a pruned base (their test bases are pruned 2:4 by magnitude first).
PRUNED_BASE = ("spp", "lors")


def prepare_base(method: str, model):
    """The base a method needs: SPP and LoRS fine-tune pruned models."""
    if method in PRUNED_BASE:
        from sparse_peft.prune import magnitude_prune

        magnitude_prune(model, n_m=(2, 4))
    return model
