"""Every method's settings for the built-in task, in one place.

Two layers of defaults, each written once:

* a method's **config dataclass** holds its paper's defaults (``LiftConfig().update_interval`` is the reference's
  400: long runs on billion-parameter models);
* :data:`MAIN_JOB` holds the settings for the built-in task (SmolLM2-135M-Instruct, 100 optimizer steps, batch 8):
  the config fields that differ from the paper's, the learning rate, and RoSA's rate of its sparse values. The CLI
  (``sparse-peft train``), the recipes (``recipes/sft|dpo/<method>.yaml``: ``tests/test_recipes.py`` checks that
  their ``method_config`` and SFT learning rate equal these) and the benchmarks read it. Each entry says where its
  numbers come from (``evidence``): a sweep table under ``benchmarks/results/`` or, until its sweep has run, the
  reason for the value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(frozen=True)
class MainJob:
    """The built-in task's settings of one method: config fields over the paper defaults, and learning rates."""

    config: dict[str, Any] = field(default_factory=dict)
    lr: float = 1e-3
    sparse_lr: Optional[float] = None  # RoSA: the sparse values' own rate (the LoRA factors train at ``lr``)
    evidence: str = ""


MAIN_JOB: dict[str, MainJob] = {
    "snell": MainJob(
        {"r": 16, "sparsity": 0.9, "kernel_scale": 3.0},
        lr=2e-3,
        evidence="LoRA's budget at r=16; benchmarks/results/sweeps/snell: kernel_scale 0.1 (the reference's, for ViTs) "
        "gave 4% at lr 2e-3 and 10% at 5e-3 (ΔW_s grows like c²: too small to learn in 100 steps); 1.0 gave 42%, "
        "3.0 gave 57% (LoRA: 54%)",
    ),
    "diff_pruning": MainJob(
        {"density": 0.046, "projection_step": 50},
        lr=1.5e-4,
        evidence="LoRA's budget; projection halfway through the 100 steps; benchmarks/results/sweeps/diff_pruning "
        "(gates at gate_lr 0.1): density 0.03 with the shared schedule: lr 5e-5 18%, 1.5e-4 26%, 5e-4 9%; density "
        "0.046 at 1.5e-4: 37% with the shared schedule, 51% with stage 3 on its own (finetune_lr_scale=5.0)",
    ),
    "smt": MainJob(
        {"block_size": 64, "num_blocks": 330, "window_steps": 20},
        lr=1e-3,
        evidence="block 64 on 576-wide matrices; 330 blocks = the paper's ~1% budget, chosen by the calibration pass "
        "on 160 examples (in-training warm-up, 2026-11-22: 31%); benchmarks/results/sweeps/smt: lr 5e-4 42% / 1e-3 "
        "45% at 330 blocks, 48% / 53% at LoRA's budget (1192 blocks)",
    ),
    "s2ft": MainJob(
        {
            "target_modules": ["v_proj", "o_proj", "up_proj", "down_proj"],
            "v_ratio": 0.34,
            "o_ratio": 0.12,
            "up_ratio": 0.05,
            "down_ratio": 0.05,
        },
        lr=1e-3,
        evidence="the paper's roles (V heads, single O heads, up/down channels) at LoRA's budget (4,872,960): 53% "
        "(benchmarks/results/sweeps/s2ft-equal); up/down only at 2% (1,071,360), 2026-11-22: 9%",
    ),
    "lift": MainJob(
        {"r": 16, "filter_rank": 32, "update_interval": 40},
        lr=1e-3,
        evidence="LoRA's budget at rank 16; refresh every 40 of 100 steps; 54% = LoRA (benchmarks/results/2026-12-02)",
    ),
    "spiel": MainJob(
        {
            "r": 16,
            "density": None,
            "reselection_steps": 20,
            "window_steps": 5,
            "initial_selection": "random",
            "growth_score": "input_normalized",
            "growth_scope": "row",
        },
        lr=1e-3,
        evidence="LoRA's budget at rank 16; benchmarks/results/sweeps/spiel: the reference schedule (random start "
        "replaced at step 5, growth by |ΣG|) 37% at lr 1e-3 (3e-4: 23%, 2e-3: 14%); random start kept and growth by "
        "|ΣG_ij|/‖x_j‖ 48% and 44% at training seeds 0 and 1; the same grown within the rows that dropped "
        "(growth_scope='row') 54% and 50% (LoRA: 54%, 54%); random growth (the control) 55%, a static random mask 56%",
    ),
    "rosa": MainJob(
        {"r": 8, "lora_alpha": 16, "density": 0.02, "schedule": "wl20", "window_steps": 4, "mask_scope": "row"},
        lr=1e-3,
        sparse_lr=1e-4,
        evidence="benchmarks/results/sweeps/rosa: the Fisher's top-k per row (mask_scope='row') 53% and 52% at "
        "training seeds 0 and 1, 53% at LoRA's budget (density 0.023); matrix-wide 51%, 52% and 48% (LoRA: 54%, "
        "54%); S at the LoRA rate 1e-3: 24% matrix-wide (2026-11-22), 30% by row, 41% by row with "
        "mask_score='input_normalized'; a random mask at 1e-3 (the control) 56%, 51%, 55%",
    ),
    "spp": MainJob({"groups": 16, "scaling": 2.0}, lr=4e-3, evidence="benchmark of 2026-11-22 (2:4 base)"),
    "lors": MainJob(
        {"r": 16, "lora_alpha": 16, "gradient": "exact"},
        lr=5e-4,
        evidence="LoRA's budget at r=16 (2:4 base); with the paper's gradient init 10% (Kaiming, 2026-11-22: 6%) "
        "against lora_pruned's 6% on the same base (benchmarks/results/sweeps/lors, lora_pruned)",
    ),
}


#: Config fields that give a method LoRA r=16's trainable count on SmolLM2-135M (4,884,480), for the methods whose
#: main-job setting holds another budget (SNELL, LIFT, SpIEL and LoRS match it at rank 16; S²FT's main job holds
#: 4,872,960: 1 KV head of V, 1 query head of O, 77 of 1536 up/down channels per layer; diff pruning's main job
#: density 0.046 of 106,168,320 = 4,883,743). Counted on the model's shapes: SPP 4,947,840 (groups must divide every
#: out_features; 32 is the closest), RoSA 4,884,150, SMT 1192·64² = 4,882,432.
EQUAL_BUDGET: dict[str, dict[str, Any]] = {
    "spp": {"groups": 32},
    "rosa": {"density": 0.023},
    "smt": {"num_blocks": 1192},
}

#: The DPO recipes run 50 steps instead of 100: fields that follow the step count.
DPO_OVERRIDES: dict[str, dict[str, Any]] = {"diff_pruning": {"projection_step": 25}}


#: The benchmarks' reference points (``sparse-peft train --method NAME``): PEFT's LoRA (r=16 on all linear layers, the
#: budget of LIFT/SpIEL/LoRS/SNELL at rank 16), full fine-tuning (no adapter), and PEFT's own static entry-sparse
#: deltas at LoRA's trainable count: ShiRA (r=16 gives r·(m+n) random entries per matrix) and Super-Tuning (top-|W|
#: entries; its one global ``sparsity`` is set from the loaded model so that the total equals LoRA's, see
#: :func:`sparse_peft.pipeline.lora_budget_sparsity`). ``lora_pruned`` is PEFT's LoRA trained on the same pruned
#: base as SPP and LoRS (its merge densifies the weights): the reference that tells pruning damage from method
#: quality.
BASELINES: dict[str, MainJob] = {
    "lora": MainJob({"r": 16, "lora_alpha": 16, "target_modules": "all-linear", "lora_dropout": 0.0}, lr=1e-3),
    "lora_pruned": MainJob({"r": 16, "lora_alpha": 16, "target_modules": "all-linear", "lora_dropout": 0.0}, lr=1e-3),
    "full": MainJob({}, lr=5e-5),
    "shira": MainJob({"r": 16, "target_modules": "all-linear", "random_seed": 0}, lr=1e-3),
    "supertuning": MainJob({"target_modules": "all-linear"}, lr=1e-3),
}
#: Baselines trained on a pruned base unless ``--prune`` says otherwise.
PRUNED_BASELINES: dict[str, str] = {"lora_pruned": "2:4"}


def main_job_config(method: str) -> dict[str, Any]:
    """A copy of the method's (or baseline's) main-job config fields (empty for a method without an entry)."""
    job = MAIN_JOB.get(method) or BASELINES.get(method)
    return {k: (list(v) if isinstance(v, list) else v) for k, v in job.config.items()} if job else {}


def main_job_lr(method: str) -> float:
    """The built-in task's learning rate of a method or baseline (1e-3 for one without an entry)."""
    job = MAIN_JOB.get(method) or BASELINES.get(method)
    return job.lr if job else 1e-3


def main_job_sparse_lr(method: str) -> Optional[float]:
    """RoSA's rate of its sparse values on the built-in task (None: one rate for everything)."""
    job = MAIN_JOB.get(method)
    return job.sparse_lr if job else None
