"""The run pipeline behind ``sparse-peft train``, ``sparse-peft sft|dpo`` and the benchmarks.

spec → load → prune / quantize → wrap → calibrate → train → evaluate → save → verify → report. Every stage is one
function here; :func:`run_train` chains them for ``sparse-peft train`` (and so for ``benchmarks/run.py`` and
``benchmarks/sweep.py``, which run that command), and :mod:`sparse_peft.recipes` runs the same stages around TRL's
SFT and DPO trainers. The command line (:mod:`sparse_peft.cli`) only parses and prints. Defaults come from
:mod:`sparse_peft.defaults`; measuring instruments from :mod:`sparse_peft.instruments`.
"""

from __future__ import annotations

import functools
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from . import METHODS
from .calibrate import calibrate, calibration_layers, first_batches
from .callbacks import SparsePeftCallback
from .defaults import BASELINES, PRUNED_BASELINES, main_job_config, main_job_lr, main_job_sparse_lr
from .groups import declared_settings, use_param_groups
from .instruments import StepTimer, optimizer_state_bytes, peak_rss_since, reset_peak_rss
from .prune import PruneSpec, calibration_batches, measure_sparsity, merged_sparsity, parse_prune_spec, prune_model
from .sparse.io import atomic_write
from .tuners.base import current_field_names
from .tuners.layer_base import SparseLayerBase, StorageReport
from .tuners.rosa import use_rosa_learning_rates

#: Spellings accepted besides the registered names (``--method diff-pruning``).
METHOD_ALIASES: dict[str, str] = {"diff-pruning": "diff_pruning"}


def canonical_method(name: str) -> str:
    """The registered method name for ``name`` or one of its aliases."""
    return METHOD_ALIASES.get(name, name)


@dataclass
class RunSpec:
    """One ``sparse-peft train`` run: the method and its config fields, the base, the data and the training."""

    method: str = "lift"
    overrides: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    data: str | None = None
    eval_data: str | None = None
    n_train: int = 2000
    n_eval: int = 100
    steps: int = 100
    batch_size: int = 8
    lr: float | None = None
    sparse_lr: float | None = None
    max_length: int = 128
    seed: int = 0  # training: adapter init, data order, dropout
    task_seed: int = 0  # the built-in task's problems (train and eval): fixed, so runs of other seeds compare
    threads: int | None = None
    output: str | None = None
    prune: PruneSpec | None = None
    quantize: str | None = None
    reload_check: bool = True

    def __post_init__(self) -> None:
        self.method = canonical_method(self.method)
        if self.sparse_lr is not None and self.method != "rosa":
            raise SystemExit(f"--sparse-lr applies to --method rosa only, not {self.method}; use --lr")
        if self.prune is None and self.method in PRUNED_BASELINES:
            self.prune = parse_prune_spec(PRUNED_BASELINES[self.method])

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else main_job_lr(self.method)

    @property
    def sparse_learning_rate(self) -> float | None:
        """RoSA's rate of its sparse values: ``sparse_lr``, else the main-job default (None: one rate)."""
        return self.sparse_lr if self.sparse_lr is not None else main_job_sparse_lr(self.method)


# ---- spec ----------------------------------------------------------------------------------------------------------
def method_config(method: str, overrides: dict[str, Any], main_job: bool = True):
    """The PEFT config of ``method`` (a registered method or a baseline of :data:`~sparse_peft.defaults.BASELINES`):
    the main job's fields (``main_job``), then ``overrides``; None for full fine-tuning."""
    method = canonical_method(method)
    if method == "full":
        if overrides:
            raise SystemExit("--method full takes no --set fields")
        return None
    if method in BASELINES:
        import peft

        config_cls = {"shira": peft.ShiraConfig, "supertuning": peft.SupertuningConfig}.get(method, peft.LoraConfig)
        return config_cls(task_type="CAUSAL_LM", **{**main_job_config(method), **overrides})
    if method not in METHODS:
        raise SystemExit(f"unknown method {method!r}; available: {', '.join(sorted(METHODS))}")
    config_cls = METHODS[method][0]
    overrides = current_field_names(config_cls, overrides)
    unknown = sorted(set(overrides) - set(config_cls.__dataclass_fields__))
    if unknown:
        raise SystemExit(f"{config_cls.__name__} has no field(s) {', '.join(unknown)}")
    return config_cls(task_type="CAUSAL_LM", **{**(main_job_config(method) if main_job else {}), **overrides})


def lora_budget_sparsity(model: torch.nn.Module, rank: int = 16) -> float:
    """``1 - Σ r·(m+n) / Σ m·n`` over the linear layers ``all-linear`` adapts (every ``nn.Linear`` but the output
    head): the Super-Tuning sparsity whose trainable count equals LoRA r=``rank``'s."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    entries = sum(m.in_features * m.out_features for m in linears)
    lora = sum(min(rank * (m.in_features + m.out_features), m.in_features * m.out_features) for m in linears)
    return 1.0 - lora / entries


def fresh_output_dir(requested: str | None, method: str, resuming: bool = False) -> Path:
    """``requested`` (created; refused when it holds files, unless ``resuming``), or a new ``runs/<method>-<time>``.
    A saved run is never written into."""
    if requested is None:
        return _new_run_dir(Path("runs"), method)
    path = Path(requested)
    if path.exists() and any(path.iterdir()) and not resuming:
        raise SystemExit(
            f"output folder {path} already holds files; sparse-peft never overwrites a saved run. Pick a new path "
            f"(or resume the run it holds, where the command offers it)."
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


def _new_run_dir(root: Path, method: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        path = root / (f"{method}-{stamp}" if attempt == 0 else f"{method}-{stamp}-{attempt}")
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise SystemExit(f"could not create a fresh run folder under {root}")


# ---- load, prune / quantize ----------------------------------------------------------------------------------------
def load_data(
    data: str | None, eval_data: str | None, n_train: int, n_eval: int, seed: int = 0, kind: str = "sft"
) -> tuple[Any, Any]:
    """``(train, eval)``: a local ``.jsonl`` / ``save_to_disk`` folder, or the built-in arithmetic task (``kind``
    ``"dpo"``: its preference pairs)."""
    from .tasks import arithmetic_task, load_dataset_any, preference_task

    if data is None:
        build = arithmetic_task if kind == "sft" else preference_task
        return build(n_train=n_train, n_eval=n_eval, seed=seed)
    train = load_dataset_any(data)
    evaluation = load_dataset_any(eval_data, require_answer=True) if eval_data else None
    return train, evaluation


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


def base_preparer(
    prune: PruneSpec | None, quantize: str | None, tokenizer, train_set
) -> Callable[..., torch.nn.Module]:
    """``prepare(base, report=False) -> base``: prune (``prune``), then quantize (``quantize``), in that order (NF4
    keeps a pruned base's zeros exactly). Used on the trained base and again on the reload check's fresh base."""
    prune_fn = pruner(prune, tokenizer, train_set) if prune is not None else None

    def prepare(base: torch.nn.Module, report: bool = False) -> torch.nn.Module:
        if prune_fn is not None:
            result = prune_fn(base)
            if report:
                print(f"pruned {prune}: {result}", flush=True)
        return quantized_copy(base, quantize) if quantize else base

    return prepare


# ---- calibrate, learning rates -------------------------------------------------------------------------------------
def calibration_samples(config: Any, batch_size: int) -> int:
    """Examples for the calibration pass: SMT's warm-up window (``window_steps`` batches), else 128 (LoRS's
    reference)."""
    steps = getattr(config, "window_steps", None) if config is not None and config.method == "smt" else None
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


def use_learning_rates(trainer: Any, sparse_lr: float | None) -> None:
    """RoSA's two rates (``sparse_lr``), or the parameter groups layers declare (e.g. diff pruning's gate logits at
    their own constant rate), on the trainer's optimizer; nothing when neither applies."""
    if sparse_lr is not None:
        use_rosa_learning_rates(trainer, sparse_lr)
    elif declared_settings(trainer.model):
        use_param_groups(trainer)


# ---- evaluate, save, verify, report ---------------------------------------------------------------------------------
def evaluate(model, tokenizer, dataset, label: str) -> dict[str, Any] | None:
    """Exact match on ``dataset`` (None without one), printed with ``label``."""
    from .tasks import evaluate_exact_match

    if dataset is None or len(dataset) == 0:
        return None
    start = time.perf_counter()
    result = evaluate_exact_match(model, tokenizer, dataset)
    print(
        f"[{label}] exact match {result['exact_match']:.1%}  number match {result['number_match']:.1%}  "
        f"(n={result['n']}, {time.perf_counter() - start:.1f} s)",
        flush=True,
    )
    return result


def storage_report(model: torch.nn.Module, adapter_name: str | None = None) -> StorageReport:
    """What the adapters of ``model`` store (all adapters, or ``adapter_name``), summed over layers by tensor name."""
    total = StorageReport()
    for module in model.modules():
        if isinstance(module, SparseLayerBase):
            for name in module.adapter_configs:
                if adapter_name is None or name == adapter_name:
                    total = total + module.storage_report(name)
    return total


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


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    """``summary.json`` (atomic)."""
    atomic_write(str(path), lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2, default=str)))


def config_summary(config: Any) -> dict[str, Any]:
    """The config's own fields, without the runtime sizes a trained adapter records."""
    if config is None:
        return {"full_fine_tuning": True}
    fields = type(config).__dataclass_fields__
    return {k: v for k, v in config.to_dict().items() if k in fields and k not in ("frozen_counts", "projected_counts")}


def metrics(result: dict[str, Any] | None) -> dict[str, float] | None:
    if result is None:
        return None
    return {"exact_match": result["exact_match"], "number_match": result["number_match"], "n": result["n"]}


# ---- sparse-peft train ----------------------------------------------------------------------------------------------
def run_train(spec: RunSpec) -> tuple[dict[str, Any], int]:
    """Fine-tune ``spec.model`` with ``spec.method`` and report; ``(summary, exit code)`` (1: the reloaded adapter
    does not reproduce the trained model). The summary is also written to ``OUTPUT/summary.json``."""
    from trl import SFTTrainer

    from .models import load_model_and_tokenizer

    torch.manual_seed(spec.seed)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    config = method_config(spec.method, spec.overrides)
    out = fresh_output_dir(spec.output, spec.method)
    print(f"sparse-peft train: method={spec.method} model={spec.model or 'SmolLM2-135M-Instruct (default)'} -> {out}")

    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(spec.model)
    print(f"model loaded in {time.perf_counter() - start:.1f} s", flush=True)
    if spec.method == "supertuning" and "sparsity" not in spec.overrides:
        config.sparsity = lora_budget_sparsity(model)
    train_set, eval_set = load_data(spec.data, spec.eval_data, spec.n_train, spec.n_eval, spec.task_seed)
    prepare = base_preparer(spec.prune, spec.quantize, tokenizer, train_set)
    if spec.prune is not None or spec.quantize:
        model = prepare(model, report=True)
    n_m, sparsity = spec.prune.n_m if spec.prune else None, {"prune": str(spec.prune or "")}
    if spec.prune is not None or spec.method in ("spp", "lors"):
        sparsity["before"] = measure_sparsity(model, n_m=n_m).to_dict(per_layer=False)
        print(f"sparsity before training: {sparsity['before']}", flush=True)
    before = evaluate(model, tokenizer, eval_set, "before")

    timer = StepTimer()
    frozen_rss = reset_peak_rss()  # the loaded model and data: what training adds is measured above this
    trainer = SFTTrainer(
        model=model,
        args=_sft_args(spec, out),
        train_dataset=train_set,
        processing_class=tokenizer,
        peft_config=config,
        callbacks=[SparsePeftCallback(), timer],
    )
    peft_model = trainer.model
    calibration = calibrate_before_training(trainer, config, spec.batch_size)
    use_learning_rates(trainer, spec.sparse_learning_rate)
    trainable_start = _trainable(peft_model)
    total = sum(p.numel() for p in peft_model.parameters())
    print(f"trainable parameters: {trainable_start:,} of {total:,} ({trainable_start / total:.3%})", flush=True)
    trainer.train()
    trainable = _trainable(peft_model)  # after the schedules (SMT's warm-up selection, diff pruning's projection)
    peak_rss = peak_rss_since(frozen_rss)
    memory = {
        "frozen_rss_bytes": frozen_rss,
        "peak_rss_bytes": peak_rss,
        "memory_above_frozen_bytes": peak_rss - frozen_rss if peak_rss and frozen_rss else None,
        "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizer),
    }
    after = evaluate(peft_model, tokenizer, eval_set, "after")
    saved = _save_and_verify(spec, config, peft_model, out, tokenizer, eval_set, prepare)
    if "before" in sparsity:  # the last use of the trained model: it is merged
        _sparsity_after_merge(spec, peft_model, n_m, sparsity)
    summary = {
        "method": spec.method,
        "config": config_summary(config),
        "steps": spec.steps,
        "batch_size": spec.batch_size,
        "learning_rate": spec.learning_rate,
        "sparse_learning_rate": spec.sparse_learning_rate,
        "before": metrics(before),
        "after": metrics(after),
        "trainable_parameters": trainable,
        "trainable_parameters_at_start": trainable_start,
        "calibration": calibration,
        "loss_curve": [[h["step"], h["loss"]] for h in trainer.state.log_history if "loss" in h],
        "grad_norm_curve": [[h["step"], h["grad_norm"]] for h in trainer.state.log_history if "grad_norm" in h],
        "median_step_seconds": statistics.median(timer.times) if timer.times else float("nan"),
        "train_seconds": sum(timer.times),  # every optimizer step, mask refreshes and other callbacks included
        "max_step_seconds": max(timer.times, default=float("nan")),
        **memory,
        **saved,
        "adapter_dir": str(out),
        "sparsity": sparsity,
        "quantize": spec.quantize,
    }
    write_summary(out / "summary.json", summary)
    return summary, _verdict(spec, summary)


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _sft_args(spec: RunSpec, out: Path):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(out / "trainer"),
        max_steps=spec.steps,
        per_device_train_batch_size=spec.batch_size,
        learning_rate=spec.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=max(1, spec.steps // 20),
        logging_steps=max(1, spec.steps // 10),
        save_strategy="no",
        report_to=[],
        max_length=spec.max_length,
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        fp16=False,
        activation_checkpointing=False,
        seed=spec.seed,
        data_seed=spec.seed,
        dataloader_num_workers=0,
    )


def _save_and_verify(spec: RunSpec, config: Any, model, out: Path, tokenizer, eval_set, prepare) -> dict[str, Any]:
    """Save the adapter, account for what it stores, and reload it into a fresh base (``spec.reload_check``)."""
    if config is None:  # full fine-tuning: no adapter to save or reload
        return {
            "adapter_bytes": None,
            "stored_entries": 0,
            "stored_bytes": 0,
            "storage_by_tensor": {},
            "reload_max_abs_logit_diff": 0.0,
            "reload_max_abs_adapter_diff": 0.0,
            "adapter_load_seconds": None,
        }
    model.save_pretrained(str(out))
    storage = storage_report(model)
    diff, state_diff, load_seconds = (
        reload_check(model, spec.model, out, tokenizer, eval_set, prepare_base=prepare)
        if spec.reload_check
        else (float("nan"), float("nan"), None)
    )
    return {
        "adapter_bytes": (out / "adapter_model.safetensors").stat().st_size,
        "stored_entries": storage.entries,
        "stored_bytes": storage.bytes,
        "storage_by_tensor": {name: list(row) for name, row in storage.tensors.items()},
        "reload_max_abs_logit_diff": diff,
        "reload_max_abs_adapter_diff": state_diff,
        "adapter_load_seconds": load_seconds,
    }


def _sparsity_after_merge(spec: RunSpec, model, n_m, sparsity: dict[str, Any]) -> None:
    """Merge (the last use of the trained model) and check that the pruned base's zeros survived."""
    if spec.quantize:
        print("sparsity after merge not measured: merging into a quantized base is lossy (merge a dequantized copy)")
        return
    merged, sparsity["zeros_kept_after_merge"] = merged_sparsity(model, n_m)
    sparsity["after_merge"] = merged.to_dict(per_layer=False)
    print(f"sparsity after merge_and_unload: {merged}; every base zero kept: {sparsity['zeros_kept_after_merge']}")


def _verdict(spec: RunSpec, summary: dict[str, Any]) -> int:
    """1 when the reloaded adapter does not reproduce the trained model.

    On bitsandbytes CPU bases the trained model's logits are not a reference (see :func:`adapter_state_diff`), so
    there the check is that every saved adapter tensor reloads exactly."""
    diff, state_diff = summary["reload_max_abs_logit_diff"], summary["reload_max_abs_adapter_diff"]
    cpu_quantized = spec.quantize and not torch.cuda.is_available()
    return 1 if state_diff > 0 or (diff > 1e-3 and not cpu_quantized) else 0
