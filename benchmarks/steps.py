"""Step time of every method on the main-job model, timed round-robin in one process so machine drift cancels.

Run by hand::

    python benchmarks/steps.py                                    # every method and LoRA, ShiRA, Super-Tuning
    python benchmarks/steps.py --methods lora,lift,snell --rounds 12 --write benchmarks/results/<date>/steps.md

Why: ``benchmarks/run.py`` trains one method after another, and this 2-core machine's speed drifts by tens of
percent over minutes (the same LoRA run took 3.4 s and 5.0 s a step an hour apart), which swamps a 5% target. Here
each method gets its own copy of SmolLM2-135M-Instruct wrapped with its main-job config
(``sparse_peft.pipeline.method_config``, as ``sparse-peft train``), its own AdamW at its main-job learning rate, and
the schedule hooks a ``SparsePeftCallback`` would call (``begin_step``, ``before_optimizer_step``,
``refresh_masks``). Each round runs one optimizer step of every method on the same batch of the built-in task (batch
8, chat template, up to 128 tokens; a fresh batch per round); the table gives the median over the timed rounds and
its ratio to LoRA's.

Methods whose schedule changes what a step does are first run untimed to their steady phase (``--preroll``): RoSA
past its LoRA warm-up and gradient collection (25 steps), diff pruning past its projection (51 steps: the engine
target is its stage-3 step), SMT past its warm-up (21 steps). SpIEL's reselection windows stay in the timed rounds
(the median is its ordinary step). LIFT's refreshes fall outside the median; ``benchmarks/refresh.py`` times them.
SPP and LoRS run on the dense base here: their kernels are dense, so a 2:4 base costs the same.

``--wall``: the whole schedule instead, from step 1 and without pre-roll (``--rounds`` 100 by default, the main job's
steps): RoSA's LoRA-only warm-up, collection and mask selection, LIFT's refreshes, SpIEL's windows are all timed, and
the table adds each method's total over every round (its training time without data loading or logging) and its
ratio to LoRA's, interleaved so that the machine's drift (tens of percent over minutes here) hits every method alike.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import get_peft_model
from run import RATIO_COLUMN, STEP_COLUMN, WALL_COLUMN  # the columns run.py --interleaved reads

import sparse_peft
from sparse_peft.callbacks import ScheduleContext, before_optimizer_step, begin_step, refresh_masks
from sparse_peft.defaults import main_job_lr
from sparse_peft.models import load_model_and_tokenizer
from sparse_peft.pipeline import lora_budget_sparsity, method_config
from sparse_peft.registry import atomic_write
from sparse_peft.sparse import cpu_kernel
from sparse_peft.tasks import _prompt_text, arithmetic_task

BASELINES = ("lora", "shira", "supertuning")
PREROLL = {"rosa": 25, "diff_pruning": 51, "smt": 21}


class Runner:
    """One method: its wrapped model, optimizer and schedule position."""

    def __init__(self, method: str, base: torch.nn.Module, total_steps: int, kernel: bool = True) -> None:
        config = method_config(method, {})
        if method == "supertuning":
            config.sparsity = lora_budget_sparsity(base)
        self.method = method if kernel else f"{method} (torch kernels)"
        self.kernel = kernel
        self.model = get_peft_model(copy.deepcopy(base), config)
        lr = main_job_lr(method)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr)
        self.context = ScheduleContext(total_steps=total_steps)
        self.step_count = 0
        self.times: list[float] = []

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        """One optimizer step with the callback's hooks; returns its wall time."""
        self.step_count += 1
        with cpu_kernel_switch(self.kernel):
            return self._step(batch)

    def _step(self, batch: dict[str, torch.Tensor]) -> float:
        start = time.perf_counter()
        self.model.train()
        begin_step(self.model, self.step_count, self.context)
        self.model(**batch).loss.backward()
        before_optimizer_step(self.model, self.context)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        refresh_masks(self.model, self.step_count, self.optimizer, self.context)
        return time.perf_counter() - start


@contextlib.contextmanager
def cpu_kernel_switch(on: bool) -> Iterator[None]:
    """Run with the compiled CPU kernels on (the default) or off (``torch.sparse.sampled_addmm``, indexing ops and
    SNELL's ``cdist`` / ``kthvalue`` / elementwise path)."""
    previous = os.environ.get(cpu_kernel.SWITCH_ENV_VAR)
    os.environ[cpu_kernel.SWITCH_ENV_VAR] = "1" if on else "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[cpu_kernel.SWITCH_ENV_VAR]
        else:
            os.environ[cpu_kernel.SWITCH_ENV_VAR] = previous


def batches(tokenizer, n: int, batch_size: int, max_length: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of the built-in task: prompt and answer in the chat template, padded right, loss everywhere."""
    train, _ = arithmetic_task(n_train=n * batch_size, n_eval=0, seed=seed)
    rows = [
        _prompt_text(tokenizer, row["prompt"]) + row["completion"][0]["content"] + tokenizer.eos_token for row in train
    ]
    out = []
    for i in range(n):
        chunk = rows[i * batch_size : (i + 1) * batch_size]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out.append({**enc, "labels": labels})
    return out


def table(runners: list[Runner], rounds: int, warmup: int, setting: str, wall: bool = False) -> str:
    lora = statistics.median(next(r for r in runners if r.method == "lora").times)
    lines = [
        f"{setting}, float32, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, median of {rounds - warmup} round-robin rounds after {warmup} warm-up rounds.",
        "",
        f"| method | trainable | {STEP_COLUMN} | {RATIO_COLUMN} | slowest timed step s |",
        "|---|---|---|---|---|",
    ]
    for runner in runners:
        median = statistics.median(runner.times)
        trainable = sum(p.numel() for p in runner.model.parameters() if p.requires_grad)
        lines.append(
            f"| {runner.method} | {trainable:,} | {median:.2f} | {median / lora:.2f}x | {max(runner.times):.2f} |"
        )
    if wall:
        total = sum(next(r for r in runners if r.method == "lora").times)
        lines += ["", f"| method | {WALL_COLUMN} | {RATIO_COLUMN} |", "|---|---|---|"]
        lines += [f"| {r.method} | {sum(r.times):.1f} | {sum(r.times) / total:.2f}x |" for r in runners]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    methods = [*BASELINES, *sorted(sparse_peft.METHODS)]
    parser.add_argument("--methods", default=",".join(methods), help="comma-separated; lora is always included")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds plus warm-up (default 12; --wall: 100)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first rounds")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="model directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--write", default=None, help="also write the Markdown table to this file")
    parser.add_argument(
        "--sddmm-ab",
        action="store_true",
        help="also time every method but the baselines with the compiled CPU kernels switched off (torch's ops)",
    )
    parser.add_argument(
        "--wall",
        action="store_true",
        help="time the whole schedule from step 1 (no pre-roll, no warm-up, --rounds defaults to 100) and add each "
        "method's total",
    )
    args = parser.parse_args(argv)
    if args.wall:
        args.warmup = 0
    args.rounds = args.rounds or (100 if args.wall else 12)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    chosen = ["lora", *[m for m in args.methods.split(",") if m and m != "lora"]]
    base, tokenizer = load_model_and_tokenizer(args.model)
    preroll = {} if args.wall else PREROLL
    preroll_max = max((preroll.get(m, 0) for m in chosen), default=0)
    data = batches(tokenizer, preroll_max + args.rounds, args.batch_size, args.max_length, args.seed)
    runners = []
    variants = [(m, True) for m in chosen]
    if args.sddmm_ab:
        variants += [(m, False) for m in chosen if m not in BASELINES]
    for method, kernel in variants:
        runner = Runner(method, base, total_steps=100, kernel=kernel)
        for i in range(preroll.get(method, 0)):
            runner.step(data[i])
        print(f"{runner.method}: ready after {runner.step_count} untimed steps", flush=True)
        runners.append(runner)
    for round_ in range(args.rounds):
        batch = data[preroll_max + round_]
        for runner in runners:
            seconds = runner.step(batch)
            if round_ >= args.warmup:
                runner.times.append(seconds)
        timed = " ".join(f"{r.method} {r.times[-1]:.2f}" for r in runners if r.times)
        print(f"round {round_ + 1}/{args.rounds}: {timed}", flush=True)
    model_name = args.model or "SmolLM2-135M-Instruct"
    setting = f"{model_name}, batch {args.batch_size} of the built-in task (up to {args.max_length} tokens)"
    text = table(runners, args.rounds, args.warmup, setting, args.wall)
    print(text)
    if args.write:
        atomic_write(args.write, lambda tmp: Path(tmp).write_text(text + "\n"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
