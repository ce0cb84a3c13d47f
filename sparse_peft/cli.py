"""``sparse-peft``: the command line.

``sparse-peft train`` fine-tunes a real model with a registered sparse method on CPU (or a GPU when present) and
reports before/after quality, trainable parameters, step time and adapter size, then reloads the saved adapter in a
fresh model and checks that it reproduces the trained model's outputs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from . import METHODS, SparsePeftCallback
from .tuners.sparse_delta import SparseDeltaLinear

logger = logging.getLogger("sparse_peft")

#: Settings of each method for the main job (a 135M model, a few hundred steps); anything can be overridden by --set.
MAIN_JOB_DEFAULTS: dict[str, dict[str, Any]] = {
    "lift": {"rank": 16, "filter_rank": 32, "update_interval": 40},
    "spiel": {"rank": 16, "density": None, "reselection_steps": 20, "selection_accumulation_steps": 5},
}
MAIN_JOB_LR: dict[str, float] = {"lift": 1e-3, "spiel": 1e-3}


def parse_set(pairs: list[str]) -> dict[str, Any]:
    """``["rank=8", "svd=exact"]`` -> ``{"rank": 8, "svd": "exact"}``; values are parsed as JSON when possible."""
    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            result[key] = json.loads(raw)
        except json.JSONDecodeError:
            result[key] = raw
    return result


def build_config(method: str, overrides: dict[str, Any]):
    """The method's config with the main job's defaults, then the user's overrides."""
    if method not in METHODS:
        raise SystemExit(f"unknown method {method!r}; available: {', '.join(sorted(METHODS))}")
    config_cls = METHODS[method][0]
    fields = set(config_cls.__dataclass_fields__)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise SystemExit(f"{config_cls.__name__} has no field(s) {', '.join(unknown)}")
    kwargs = {**MAIN_JOB_DEFAULTS.get(method, {}), **overrides}
    return config_cls(task_type="CAUSAL_LM", **kwargs)


@dataclass
class StepTimer(TrainerCallback):
    """Records the wall time of every optimizer step (callbacks included)."""

    times: list[float] = field(default_factory=list)
    _start: float = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def new_run_dir(root: Path, method: str) -> Path:
    """A fresh folder under ``root``; an existing run is never written into."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        path = root / (f"{method}-{stamp}" if attempt == 0 else f"{method}-{stamp}-{attempt}")
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise SystemExit(f"could not create a fresh run folder under {root}")


def output_dir(requested: str | None, method: str) -> Path:
    if requested is None:
        return new_run_dir(Path("runs"), method)
    path = Path(requested)
    if path.exists() and any(path.iterdir()):
        raise SystemExit(
            f"--output {path} already holds files; sparse-peft never overwrites a saved run. Pick a new path."
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


def adapter_budget_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """``(entries, bytes)`` that the sparse deltas of ``model`` need: ``k·(value bytes + index bytes)``."""
    entries = payload = 0
    for layer in model.modules():
        if not isinstance(layer, SparseDeltaLinear):
            continue
        for name in layer.values:
            for values, indices in (
                (layer.values[name], layer.indices[name]),
                (layer.frozen_values[name], layer.frozen_indices[name]),
            ):
                entries += values.numel()
                payload += values.numel() * (values.element_size() + indices.element_size())
    return entries, payload


def load_data(args: argparse.Namespace):
    from .tasks import arithmetic_task, load_dataset_any

    if args.data is None:
        return arithmetic_task(n_train=args.n_train, n_eval=args.n_eval, seed=args.seed)
    train = load_dataset_any(args.data)
    evaluation = load_dataset_any(args.eval_data, require_answer=True) if args.eval_data else None
    return train, evaluation


def evaluate(model, tokenizer, dataset, label: str) -> dict[str, Any] | None:
    from .tasks import evaluate_exact_match

    if dataset is None:
        return None
    start = time.perf_counter()
    result = evaluate_exact_match(model, tokenizer, dataset)
    print(
        f"[{label}] exact match {result['exact_match']:.1%}  number match {result['number_match']:.1%}  "
        f"(n={result['n']}, {time.perf_counter() - start:.1f} s)",
        flush=True,
    )
    return result


def reload_check(model, model_path: str | None, adapter_dir: Path, tokenizer, dataset) -> float:
    """Max |logit difference| between the trained model and base + adapter reloaded from disk."""
    from peft import PeftModel

    from .models import load_model_and_tokenizer
    from .tasks import _prompt_text

    rows = dataset.select(range(min(4, len(dataset)))) if dataset is not None else []
    prompts = [_prompt_text(tokenizer, row["prompt"]) for row in rows] or ["Hello"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    fresh_base, _ = load_model_and_tokenizer(model_path)
    reloaded = PeftModel.from_pretrained(fresh_base, str(adapter_dir))
    model.eval()
    reloaded.eval()
    device = next(model.parameters()).device
    reloaded.to(device)
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.inference_mode():
        diff = (model(**batch).logits - reloaded(**batch).logits).abs().max().item()
    return diff


def train(args: argparse.Namespace) -> int:
    from trl import SFTConfig, SFTTrainer

    from .models import load_model_and_tokenizer

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = build_config(args.method, parse_set(args.set))
    out = output_dir(args.output, args.method)
    print(f"sparse-peft train: method={args.method} model={args.model or 'SmolLM2-135M-Instruct (default)'} -> {out}")

    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(args.model)
    print(f"model loaded in {time.perf_counter() - start:.1f} s", flush=True)
    train_set, eval_set = load_data(args)
    before = evaluate(model, tokenizer, eval_set, "before")

    use_cpu = not torch.cuda.is_available()
    lr = args.lr if args.lr is not None else MAIN_JOB_LR.get(args.method, 1e-3)
    sft_args = SFTConfig(
        output_dir=str(out / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=lr,
        lr_scheduler_type="linear",
        warmup_steps=max(1, args.steps // 20),
        logging_steps=max(1, args.steps // 10),
        save_strategy="no",
        report_to=[],
        max_length=args.max_length,
        use_cpu=use_cpu,
        bf16=False,
        fp16=False,
        activation_checkpointing=False,
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=0,
    )
    timer = StepTimer()
    trainer = SFTTrainer(
        model=model,
        args=sft_args,
        train_dataset=train_set,
        processing_class=tokenizer,
        peft_config=config,
        callbacks=[SparsePeftCallback(), timer],
    )
    peft_model = trainer.model
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    print(f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.3%})", flush=True)
    trainer.train()

    after = evaluate(peft_model, tokenizer, eval_set, "after")
    peft_model.save_pretrained(str(out))
    adapter_file = out / "adapter_model.safetensors"
    adapter_bytes = adapter_file.stat().st_size
    entries, payload = adapter_budget_bytes(peft_model)
    diff = reload_check(peft_model, args.model, out, tokenizer, eval_set)
    step_median = statistics.median(timer.times) if timer.times else float("nan")

    summary = {
        "method": args.method,
        "config": {
            k: v
            for k, v in config.to_dict().items()
            if k in type(config).__dataclass_fields__ and k not in ("frozen_counts",)
        },
        "steps": args.steps,
        "batch_size": args.batch_size,
        "learning_rate": lr,
        "before": _metrics(before),
        "after": _metrics(after),
        "trainable_parameters": trainable,
        "median_step_seconds": step_median,
        "adapter_bytes": adapter_bytes,
        "stored_entries": entries,
        "k_times_value_plus_index_bytes": payload,
        "reload_max_abs_logit_diff": diff,
        "adapter_dir": str(out),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print_summary(summary)
    if diff > 1e-3:
        print(f"ERROR: the reloaded adapter does not reproduce the trained model (max |Δlogit| = {diff:.2e})")
        return 1
    return 0


def _metrics(result: dict[str, Any] | None) -> dict[str, float] | None:
    if result is None:
        return None
    return {"exact_match": result["exact_match"], "number_match": result["number_match"], "n": result["n"]}


def print_summary(summary: dict[str, Any]) -> None:
    before, after = summary["before"], summary["after"]
    lines = ["", "=" * 64, f"method                 {summary['method']}"]
    if before and after:
        lines += [
            f"exact match            {before['exact_match']:.1%} -> {after['exact_match']:.1%}",
            f"number match           {before['number_match']:.1%} -> {after['number_match']:.1%}",
        ]
    lines += [
        f"trainable parameters   {summary['trainable_parameters']:,}",
        f"median step time       {summary['median_step_seconds']:.3f} s",
        f"adapter bytes on disk  {summary['adapter_bytes']:,}  "
        f"(k·(value+index) = {summary['k_times_value_plus_index_bytes']:,} for {summary['stored_entries']:,} entries)",
        f"reload check           max |Δlogit| = {summary['reload_max_abs_logit_diff']:.2e}",
        f"adapter saved to       {summary['adapter_dir']}",
        "=" * 64,
    ]
    print("\n".join(lines), flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-peft", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="fine-tune a model with a sparse method and report before/after")
    t.add_argument("--method", default="lift", choices=sorted(METHODS), help="sparse method (default: lift)")
    t.add_argument("--model", default=None, help="local model directory or .gguf (default: SmolLM2-135M-Instruct)")
    t.add_argument(
        "--data", default=None, help="local .jsonl file or datasets.save_to_disk folder (default: built-in task)"
    )
    t.add_argument("--eval-data", default=None, help="evaluation set with an 'answer' column (for --data)")
    t.add_argument("--n-train", type=int, default=2000, help="built-in task: training problems")
    t.add_argument("--n-eval", type=int, default=100, help="built-in task: evaluation problems")
    t.add_argument("--steps", type=int, default=100, help="optimizer steps")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--lr", type=float, default=None, help="learning rate (default: the method's main-job default)")
    t.add_argument("--max-length", type=int, default=128)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    t.add_argument("--output", default=None, help="new folder for the adapter (default: runs/<method>-<time>)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="method config field, repeatable")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("SPARSE_PEFT_LOG", "WARNING"))
    args = build_parser().parse_args(argv)
    if args.command == "train":
        return train(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
