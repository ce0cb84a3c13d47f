"""Shared fixtures: tiny models built from configs (no downloads), saved to a temp folder when a test needs a path."""

from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import sparse_peft  # noqa: E402,F401  (registers the methods before any test builds a config)

if TYPE_CHECKING:
    from transformers import TrainingArguments

REPO = Path(__file__).resolve().parents[1]


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A 2-layer Llama with grouped-query attention (4 heads, 2 KV heads), about 100k parameters."""
    torch.manual_seed(seed)
    config = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    config.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**config)).eval()


INPUT = (torch.arange(24).view(3, 8) * 7) % 128


def train_steps(model, steps: int = 3, lr: float = 1e-2) -> list[float]:
    """``steps`` plain AdamW steps on the causal-LM loss of ``INPUT`` (train mode, then back to eval); the losses.

    No schedule hooks run: for methods whose masks are fixed at creation (SNELL, SPP, LoRS)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(INPUT, labels=INPUT).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.fixture
def base_model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory) -> Path:
    """A tiny Llama saved with save_pretrained, for loaders that need a path (AutoPeftModel, fresh processes)."""
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama().save_pretrained(path)
    return path


def run_python(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (so nothing registered in this process leaks into it)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)


def char_tokenizer():
    """A character-level tokenizer with a chat template, small enough for the tiny model's vocabulary."""
    from helpers_tasks import tiny_chat_tokenizer

    return tiny_chat_tokenizer()


SFT_TEXTS = ["hello world", "sparse diffs", "abc def", "one two"]

#: What every trainer run of the tests shares: on the CPU in float32, no reports, saves or progress bars, a batch of
#: two sequences of at most 32 tokens. :func:`cpu_args` passes only the keys a config class has (``max_length`` is
#: TRL's, not ``TrainingArguments``'s).
CPU_DEFAULTS: dict[str, Any] = {
    "per_device_train_batch_size": 2,
    "report_to": [],
    "save_strategy": "no",
    "max_length": 32,
    "use_cpu": True,
    "bf16": False,
    "fp16": False,
    "disable_tqdm": True,
}

ArgsT = TypeVar("ArgsT", bound="TrainingArguments")


def cpu_args(config_class: type[ArgsT], output_dir: str | os.PathLike, **overrides: Any) -> ArgsT:
    """``config_class`` (``TrainingArguments``, TRL's ``SFTConfig``, ``DPOConfig`` ...) with :data:`CPU_DEFAULTS`
    (the keys it accepts), ``output_dir`` and ``overrides``, which win over the defaults and are all passed on."""
    fields = {f.name for f in dataclasses.fields(config_class)}
    defaults = {key: copy.deepcopy(value) for key, value in CPU_DEFAULTS.items() if key in fields}
    return config_class(**{**defaults, "output_dir": str(output_dir), **overrides})


def sft_trainer(model, output_dir, callbacks=(), texts=SFT_TEXTS, **overrides):
    """A TRL ``SFTTrainer`` over the tiny model on a few character-level texts, on the CPU (no saving, no reports);
    ``overrides`` go into its ``SFTConfig``."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    return SFTTrainer(
        model=model,
        args=cpu_args(SFTConfig, output_dir, **{"max_steps": 1, **overrides}),
        processing_class=char_tokenizer(),
        train_dataset=Dataset.from_dict({"text": list(texts)}),
        callbacks=list(callbacks),
    )


def quantized_base(base_dir, bits: int):
    """The tiny model at ``base_dir`` loaded as a bitsandbytes 4-bit (NF4) or 8-bit base; skips the calling test
    when bitsandbytes is not installed (only the quantized cases, never a whole module)."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if bits == 4:
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    else:
        qc = BitsAndBytesConfig(load_in_8bit=True)
    return AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=qc, device_map="cpu", dtype=torch.float32)


TEXTS = ["hello world, this is a tiny test.", "sparse adapters are fun!", "one two three four five", "abc def ghi"]


def run_sft(base_dir, out, max_steps=4, resume=None, save_steps=2, checkpointing=False, peft_config=None):
    """SFTTrainer from the saved tiny model with ``peft_config`` (default: a LIFT adapter refreshed every step),
    checkpoints every ``save_steps``; ``(trainer, logged losses, adapter state dict)``."""
    from datasets import Dataset
    from peft import get_peft_model_state_dict
    from trl import SFTConfig, SFTTrainer

    from sparse_peft import LiftConfig, SparsePeftCallback

    tokenizer = char_tokenizer()
    args = cpu_args(
        SFTConfig,
        out,
        max_steps=max_steps,
        learning_rate=2e-2,
        logging_steps=1,
        save_strategy="steps",
        save_steps=save_steps,
        dataset_num_proc=None,
        seed=0,
        data_seed=0,
        activation_checkpointing=checkpointing,
    )
    trainer = SFTTrainer(
        model=str(base_dir),
        args=args,
        train_dataset=Dataset.from_dict({"text": TEXTS * 2}),
        processing_class=tokenizer,
        peft_config=peft_config or LiftConfig(r=2, filter_rank=4, update_interval=1),
        callbacks=[SparsePeftCallback()],
    )
    trainer.train(resume_from_checkpoint=resume)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    state = {k: v.clone() for k, v in get_peft_model_state_dict(trainer.model).items()}
    return trainer, losses, state
