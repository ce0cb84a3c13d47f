"""``sparse-peft``: the command line.

``sparse-peft train`` fine-tunes a real model with a registered sparse method on CPU (or a GPU when present) and
reports before/after quality, trainable parameters, step time and adapter size, then reloads the saved adapter in a
fresh model and checks that it reproduces the trained model's outputs.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from . import METHODS, SparsePeftCallback
from .calibrate import calibrate, calibration_layers, first_batches
from .defaults import MAIN_JOB, main_job_config
from .groups import declared_settings, use_param_groups
from .prune import PruneSpec, calibration_batches, measure_sparsity, merged_sparsity, parse_prune_spec, prune_model
from .tuners.rosa import use_rosa_learning_rates
from .tuners.sparse_delta import SparseDeltaLinear

logger = logging.getLogger("sparse_peft")

#: The main job's settings of each method (one source: :mod:`sparse_peft.defaults`); --set and --lr override them.
MAIN_JOB_DEFAULTS: dict[str, dict[str, Any]] = {method: job.config for method, job in MAIN_JOB.items()}
MAIN_JOB_LR: dict[str, float] = {method: job.lr for method, job in MAIN_JOB.items()}
MAIN_JOB_SPARSE_LR: dict[str, float] = {m: job.sparse_lr for m, job in MAIN_JOB.items() if job.sparse_lr is not None}


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


#: Spellings the command line accepts besides the registered names (``--method diff-pruning``).
METHOD_ALIASES: dict[str, str] = {"diff-pruning": "diff_pruning"}


def canonical_method(name: str) -> str:
    """The registered method name for ``name`` or one of its aliases."""
    return METHOD_ALIASES.get(name, name)


#: Reference points for benchmarks: PEFT's LoRA (r=16 on all linear layers, the budget of LIFT/SpIEL/LoRS/SNELL at
#: rank 16), full fine-tuning (no adapter), and PEFT's own static entry-sparse deltas at LoRA's trainable count:
#: ShiRA (r=16 gives r·(m+n) random entries per matrix) and Super-Tuning (top-|W| entries; its one global
#: ``sparsity`` is set from the loaded model so that the total equals LoRA's, see :func:`lora_budget_sparsity`).
BASELINES: dict[str, dict[str, Any]] = {
    "lora": {"r": 16, "lora_alpha": 16, "target_modules": "all-linear", "lora_dropout": 0.0},
    "lora_pruned": {"r": 16, "lora_alpha": 16, "target_modules": "all-linear", "lora_dropout": 0.0},
    "full": {},
    "shira": {"r": 16, "target_modules": "all-linear", "random_seed": 0},
    "supertuning": {"target_modules": "all-linear"},
}
BASELINE_LR: dict[str, float] = {
    "lora": 1e-3,
    "lora_pruned": 1e-3,
    "full": 5e-5,
    "shira": 1e-3,
    "supertuning": 1e-3,
}
#: ``lora_pruned`` is PEFT's LoRA trained on the same pruned base as SPP and LoRS (its merge densifies the weights):
#: the reference that tells pruning damage from method quality. Its base is pruned 2:4 unless --prune says otherwise.
PRUNED_BASELINES: dict[str, str] = {"lora_pruned": "2:4"}


def lora_budget_sparsity(model: torch.nn.Module, rank: int = 16) -> float:
    """``1 - Σ r·(m+n) / Σ m·n`` over the linear layers ``all-linear`` adapts (every ``nn.Linear`` but the output
    head): the Super-Tuning sparsity whose trainable count equals LoRA r=``rank``'s."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    entries = sum(m.in_features * m.out_features for m in linears)
    lora = sum(min(rank * (m.in_features + m.out_features), m.in_features * m.out_features) for m in linears)
    return 1.0 - lora / entries


def build_config(method: str, overrides: dict[str, Any]):
    """The method's config with the main job's defaults, then the user's overrides (None for full fine-tuning)."""
    method = canonical_method(method)
    if method == "full":
        if overrides:
            raise SystemExit("--method full takes no --set fields")
        return None
    if method in ("lora", "lora_pruned", "shira", "supertuning"):
        import peft

        config_cls = {
            "lora": peft.LoraConfig,
            "lora_pruned": peft.LoraConfig,
            "shira": peft.ShiraConfig,
            "supertuning": peft.SupertuningConfig,
        }
        return config_cls[method](task_type="CAUSAL_LM", **{**BASELINES[method], **overrides})
    if method not in METHODS:
        raise SystemExit(f"unknown method {method!r}; available: {', '.join(sorted(METHODS))}")
    config_cls = METHODS[method][0]
    fields = set(config_cls.__dataclass_fields__)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise SystemExit(f"{config_cls.__name__} has no field(s) {', '.join(unknown)}")
    kwargs = {**main_job_config(method), **overrides}
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


def _proc_status_bytes(field_name: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of this process in bytes (Linux), or None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> int | None:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux ``clear_refs``) and return the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _proc_status_bytes("VmRSS")


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of every tensor the optimizer keeps per parameter (moments, accumulators, step counters)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return sum(
        value.numel() * value.element_size()
        for state in inner.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )


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


def reload_check(
    model, model_path: str | None, adapter_dir: Path, tokenizer, dataset, prepare_base=None
) -> tuple[float, float, float]:
    """``(max |logit difference|, max |adapter tensor difference|, seconds of PeftModel.from_pretrained)`` between
    the trained model and base + adapter reloaded from disk (the load time excludes loading the base).

    ``prepare_base(model) -> model`` turns the fresh base into the trained one's (``--prune``, ``--quantize``)."""
    from peft import PeftModel

    from .models import load_model_and_tokenizer
    from .tasks import _prompt_text

    rows = dataset.select(range(min(4, len(dataset)))) if dataset is not None else []
    prompts = [_prompt_text(tokenizer, row["prompt"]) for row in rows] or ["Hello"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    fresh_base, _ = load_model_and_tokenizer(model_path)
    if prepare_base is not None:
        fresh_base = prepare_base(fresh_base)
    start = time.perf_counter()
    reloaded = PeftModel.from_pretrained(fresh_base, str(adapter_dir))
    load_seconds = time.perf_counter() - start
    model.eval()
    reloaded.eval()
    device = next(model.parameters()).device
    reloaded.to(device)
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.inference_mode():
        diff = (model(**batch).logits - reloaded(**batch).logits).abs().max().item()
    return diff, adapter_state_diff(model, reloaded), load_seconds


def adapter_state_diff(model, reloaded) -> float:
    """Max |difference| over every saved adapter tensor (values, factors, indices) of two models (inf if keys differ).

    On bitsandbytes CPU bases this is the reload check that counts: bitsandbytes repacks 4-bit weights for its CPU
    kernels, and a model trained through ``Trainer`` there computes other logits than a freshly loaded copy with the
    same weights and adapter (observed with PEFT's own LoRA as well), so logits cannot be compared.
    """
    from peft import get_peft_model_state_dict

    a, b = get_peft_model_state_dict(model), get_peft_model_state_dict(reloaded)
    if a.keys() != b.keys():
        return float("inf")
    return max(((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel()), default=0.0)


def pruner(spec: PruneSpec, tokenizer, train_set) -> Callable[[torch.nn.Module], Any]:
    """``model -> report``: prunes a model in place following ``spec``; Wanda calibrates on 16 training prompts."""
    from .tasks import _prompt_text

    texts = [_prompt_text(tokenizer, row["prompt"]) for row in train_set.select(range(min(16, len(train_set))))]
    batches = calibration_batches(tokenizer, texts) if spec.method == "wanda" else None
    return functools.partial(prune_model, spec=spec, batches=batches)


def quantized_copy(model: torch.nn.Module, bits: str) -> torch.nn.Module:
    """``model`` reloaded as a bitsandbytes ``4bit`` (NF4, float32 compute) or ``8bit`` model (via a temp folder)."""
    import tempfile

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if bits == "4bit":
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    else:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="sparse-peft-quantize-") as folder:
        model.save_pretrained(folder)
        quantized = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=quantization, device_map=device, dtype=torch.float32
        )
    quantized.name_or_path = model.name_or_path  # adapters record the real base, not the temporary folder
    quantized.config._name_or_path = model.name_or_path
    quantized.generation_config = model.generation_config
    return quantized


def calibration_samples(config: Any, batch_size: int) -> int:
    """Examples for the calibration pass: SMT's warm-up (``warmup_steps`` batches), else 128 (LoRS's reference)."""
    steps = getattr(config, "warmup_steps", None) if config is not None and config.method == "smt" else None
    return steps * batch_size if steps else 128


def calibrate_before_training(trainer: Any, config: Any, batch_size: int) -> dict[str, Any] | None:
    """Run the calibration pass (:func:`sparse_peft.calibrate`) on the first training batches, before the trainer
    builds its optimizer; None when no layer asks for one (LoRA, LIFT, ...)."""
    model = trainer.model
    if config is None or not calibration_layers(model):
        return None
    samples = calibration_samples(config, batch_size)
    start = time.perf_counter()
    batches = first_batches(trainer.get_train_dataloader(), samples)
    model.train()
    done = calibrate(model, batches)
    seconds = time.perf_counter() - start
    print(f"calibration pass on {samples} examples in {seconds:.1f} s: {done}", flush=True)
    return {"samples": samples, "seconds": seconds, "layers": done}


def sparse_learning_rate(args: argparse.Namespace) -> float | None:
    """RoSA's learning rate for its sparse values: ``--sparse-lr``, else the main-job default (None: one rate)."""
    return args.sparse_lr if args.sparse_lr is not None else MAIN_JOB_SPARSE_LR.get(args.method)


def train(args: argparse.Namespace) -> int:
    from trl import SFTConfig, SFTTrainer

    from .models import load_model_and_tokenizer

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sparse_lr is not None and args.method != "rosa":
        raise SystemExit(f"--sparse-lr applies to --method rosa only, not {args.method}; use --lr")
    config = build_config(args.method, parse_set(args.set))
    if args.prune is None and args.method in PRUNED_BASELINES:
        args.prune = parse_prune_spec(PRUNED_BASELINES[args.method])
    out = output_dir(args.output, args.method)
    print(f"sparse-peft train: method={args.method} model={args.model or 'SmolLM2-135M-Instruct (default)'} -> {out}")

    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(args.model)
    print(f"model loaded in {time.perf_counter() - start:.1f} s", flush=True)
    if args.method == "supertuning" and "sparsity" not in parse_set(args.set):
        config.sparsity = lora_budget_sparsity(model)
    train_set, eval_set = load_data(args)
    n_m, sparsity = args.prune.n_m if args.prune else None, {"prune": str(args.prune or "")}
    prune = pruner(args.prune, tokenizer, train_set) if args.prune is not None else None

    def prepare_base(base: torch.nn.Module, report: bool = False) -> torch.nn.Module:
        """Prune (``--prune``), then quantize (``--quantize``): NF4 keeps a pruned base's zeros exactly."""
        if prune is not None:
            result = prune(base)
            if report:
                print(f"pruned {args.prune}: {result}", flush=True)
        return quantized_copy(base, args.quantize) if args.quantize else base

    if args.prune is not None or args.quantize:
        model = prepare_base(model, report=True)
    if args.prune is not None or args.method in ("spp", "lors"):
        sparsity["before"] = measure_sparsity(model, n_m=n_m).to_dict(per_layer=False)
        print(f"sparsity before training: {sparsity['before']}", flush=True)
    before = evaluate(model, tokenizer, eval_set, "before")

    use_cpu = not torch.cuda.is_available()
    lr = args.lr if args.lr is not None else {**MAIN_JOB_LR, **BASELINE_LR}.get(args.method, 1e-3)
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
    frozen_rss = reset_peak_rss()  # the loaded model and data: what training adds is measured above this
    trainer = SFTTrainer(
        model=model,
        args=sft_args,
        train_dataset=train_set,
        processing_class=tokenizer,
        peft_config=config,
        callbacks=[SparsePeftCallback(), timer],
    )
    peft_model = trainer.model
    calibration = calibrate_before_training(trainer, config, args.batch_size)
    sparse_lr = sparse_learning_rate(args)
    if sparse_lr is not None:
        use_rosa_learning_rates(trainer, sparse_lr)
    elif declared_settings(peft_model):  # e.g. diff pruning's gate logits: their own rate, constant
        use_param_groups(trainer)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    print(f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.3%})", flush=True)
    trainer.train()
    peak_rss = _proc_status_bytes("VmHWM")
    if peak_rss is not None and frozen_rss is not None:  # the kernel's mark can trail the RSS read at reset by a page
        peak_rss = max(peak_rss, frozen_rss)
    trainable_start, trainable = trainable, sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    memory = {
        "frozen_rss_bytes": frozen_rss,
        "peak_rss_bytes": peak_rss,
        "memory_above_frozen_bytes": peak_rss - frozen_rss if peak_rss and frozen_rss else None,
        "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizer),
    }

    after = evaluate(peft_model, tokenizer, eval_set, "after")
    if config is None:  # full fine-tuning: no adapter to save or reload
        adapter_bytes, entries, payload, diff, state_diff, load_seconds = None, 0, 0, 0.0, 0.0, None
    else:
        peft_model.save_pretrained(str(out))
        adapter_bytes = (out / "adapter_model.safetensors").stat().st_size
        entries, payload = adapter_budget_bytes(peft_model)
        diff, state_diff, load_seconds = (
            reload_check(peft_model, args.model, out, tokenizer, eval_set, prepare_base=prepare_base)
            if args.reload_check
            else (float("nan"), float("nan"), None)
        )
    step_median = statistics.median(timer.times) if timer.times else float("nan")
    if "before" in sparsity and args.quantize:
        print("sparsity after merge not measured: merging into a quantized base is lossy (merge a dequantized copy)")
    elif "before" in sparsity:  # last use of peft_model: merge it and check that the zeros survived
        merged, sparsity["zeros_kept_after_merge"] = merged_sparsity(peft_model, n_m)
        sparsity["after_merge"] = merged.to_dict(per_layer=False)
        print(f"sparsity after merge_and_unload: {merged}; every base zero kept: {sparsity['zeros_kept_after_merge']}")

    summary = {
        "method": args.method,
        "config": _config_summary(config),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "learning_rate": lr,
        "sparse_learning_rate": sparse_lr,
        "before": _metrics(before),
        "after": _metrics(after),
        "trainable_parameters": trainable,
        "trainable_parameters_at_start": trainable_start,
        "calibration": calibration,
        "loss_curve": [[h["step"], h["loss"]] for h in trainer.state.log_history if "loss" in h],
        "grad_norm_curve": [[h["step"], h["grad_norm"]] for h in trainer.state.log_history if "grad_norm" in h],
        "median_step_seconds": step_median,
        "train_seconds": sum(timer.times),  # every optimizer step, mask refreshes and other callbacks included
        "max_step_seconds": max(timer.times, default=float("nan")),
        **memory,
        "adapter_bytes": adapter_bytes,
        "stored_entries": entries,
        "k_times_value_plus_index_bytes": payload,
        "reload_max_abs_logit_diff": diff,
        "reload_max_abs_adapter_diff": state_diff,
        "adapter_load_seconds": load_seconds,
        "adapter_dir": str(out),
        "sparsity": sparsity,
        "quantize": args.quantize,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print_summary(summary)
    # On bitsandbytes CPU bases the trained model's logits are not a reference (see adapter_state_diff and the
    # README: a bnb model trained through Trainer on CPU drifts from a fresh load, PEFT's LoRA included), so there
    # the check is that every saved adapter tensor reloads exactly.
    cpu_quantized = args.quantize and not torch.cuda.is_available()
    if state_diff > 0 or (diff > 1e-3 and not cpu_quantized):
        print(f"ERROR: the reloaded adapter does not reproduce the trained model (max |Δlogit| = {diff:.2e})")
        return 1
    return 0


def _config_summary(config: Any) -> dict[str, Any]:
    if config is None:
        return {"full_fine_tuning": True}
    fields = type(config).__dataclass_fields__
    return {k: v for k, v in config.to_dict().items() if k in fields and k not in ("frozen_counts", "projected_counts")}


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
        f"median step time       {summary['median_step_seconds']:.3f} s "
        f"(training {summary['train_seconds']:.1f} s, slowest step {summary['max_step_seconds']:.2f} s)",
        f"adapter bytes on disk  {summary['adapter_bytes'] or 0:,}  "
        f"(k·(value+index) = {summary['k_times_value_plus_index_bytes']:,} for {summary['stored_entries']:,} entries)",
        f"peak RSS in training   {(summary['peak_rss_bytes'] or 0) / 2**20:,.0f} MiB "
        f"({(summary['memory_above_frozen_bytes'] or 0) / 2**20:,.0f} MiB above the loaded model); optimizer state "
        f"{summary['optimizer_state_bytes'] / 2**20:,.1f} MiB",
        f"reload check           max |Δlogit| = {summary['reload_max_abs_logit_diff']:.2e}, max |Δadapter tensor| = "
        f"{summary['reload_max_abs_adapter_diff']:.2e}",
        f"adapter load time      {_fmt_seconds(summary.get('adapter_load_seconds'))} (PeftModel.from_pretrained)",
        f"adapter saved to       {summary['adapter_dir']}",
        "=" * 64,
    ]
    print("\n".join(lines), flush=True)


def _fmt_seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _prune_spec(text: str) -> PruneSpec:
    try:
        return parse_prune_spec(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-peft", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="fine-tune a model with a sparse method and report before/after")
    t.add_argument(
        "--method",
        default="lift",
        type=canonical_method,
        choices=sorted([*METHODS, *BASELINES]),
        help="sparse method (default: lift; diff-pruning is accepted for diff_pruning); 'lora', 'full', 'shira' "
        "and 'supertuning' train the benchmarks' baselines (PEFT LoRA r=16, full fine-tuning, PEFT's ShiRA and "
        "Super-Tuning at LoRA's trainable count)",
    )
    t.add_argument(
        "--quantize", choices=["4bit", "8bit"], default=None, help="train on a bitsandbytes base (after --prune)"
    )
    t.add_argument("--no-reload-check", dest="reload_check", action="store_false", help="skip the reload check")
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
    t.add_argument(
        "--sparse-lr",
        type=float,
        default=None,
        help="RoSA only: learning rate of the sparse values S, while the LoRA factors use --lr (the paper trains S "
        "slower); default: the method's main-job default, else --lr",
    )
    t.add_argument("--max-length", type=int, default=128)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    t.add_argument("--output", default=None, help="new folder for the adapter (default: runs/<method>-<time>)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="method config field, repeatable")
    t.add_argument(
        "--prune",
        type=_prune_spec,
        default=None,
        metavar="SPEC",
        help="prune the base before fine-tuning: wanda:0.5, magnitude:0.5, 2:4 (= wanda:2:4), magnitude:4:8; Wanda "
        "calibrates on 16 training prompts",
    )
    for kind in ("sft", "dpo"):
        sub.add_parser(kind, help=f"TRL {kind.upper()} with a sparse method (--config recipes/{kind}/METHOD.yaml)")
    i = sub.add_parser("inspect", help="per-layer table and PNG heatmap of a saved adapter")
    i.add_argument("adapter_dir", help="folder written by save_pretrained")
    i.add_argument("--png", default=None, help="heatmap path (default: ADAPTER_DIR/sparsity.png); 'none' to skip")
    i.add_argument("--module", default=None, help="matrix whose mask the heatmap shows (default: the first)")
    e = sub.add_parser("env", help="versions for a bug report, checked against the tested set (constraints.txt)")
    e.add_argument(
        "--freeze", default=None, metavar="PATH", help="write this environment as a tested set to PATH instead"
    )
    return parser


def inspect_adapter(args: argparse.Namespace) -> int:
    from .inspector import format_table, read_adapter, write_heatmap

    config, reports = read_adapter(args.adapter_dir)
    print(format_table(config, reports))
    if args.png != "none":
        png = write_heatmap(args.adapter_dir, args.png or Path(args.adapter_dir) / "sparsity.png", args.module)
        print(f"heatmap written to {png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("SPARSE_PEFT_LOG", "WARNING"))
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("sft", "dpo"):  # TRL-style flags, parsed by TRL's own parser
        from .recipes import run

        return run(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "train":
        return train(args)
    if args.command == "inspect":
        return inspect_adapter(args)
    if args.command == "env":
        from .env import main as env_main

        return env_main(args.freeze)
    return 2


if __name__ == "__main__":
    sys.exit(main())
