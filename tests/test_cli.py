"""The main job's command line on a tiny local model and user data (the real model run is in the README)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import char_tokenizer, tiny_llama
from transformers import AutoModelForCausalLM

from sparse_peft.cli import main, parse_set
from sparse_peft.pipeline import method_config as build_config


@pytest.fixture
def tiny_model_dir(tmp_path):
    path = tmp_path / "tiny"
    tiny_llama().save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def _rows(n):
    rows = []
    for i in range(n):
        a, b = i % 7, (i * 3) % 5
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"{a}+{b}="}],
                "completion": [{"role": "assistant", "content": str(a + b)}],
                "answer": str(a + b),
            }
        )
    return rows


def test_train_end_to_end_on_tiny_model(tiny_model_dir, tmp_path, capsys):
    train = _jsonl(tmp_path / "train.jsonl", _rows(16))
    evaluation = _jsonl(tmp_path / "eval.jsonl", _rows(4))
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--model", str(tiny_model_dir),
            "--data", str(train),
            "--eval-data", str(evaluation),
            "--steps", "3",
            "--batch-size", "4",
            "--max-length", "32",
            "--set", "filter_rank=4",
            "--set", "r=2",
            "--set", "update_interval=2",
            "--output", str(out),
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reload_max_abs_logit_diff"] <= 1e-4
    assert summary["trainable_parameters"] > 0
    assert summary["before"]["n"] == 4 and summary["after"]["n"] == 4
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    assert summary["adapter_bytes"] <= 1.05 * summary["stored_bytes"] + 8192
    assert summary["stored_entries"] >= summary["trainable_parameters"]  # LIFT: active entries plus retired ones
    for label in ("exact match", "trainable parameters", "median step time", "adapter bytes on disk", "reload check"):
        assert label in printed


@pytest.mark.parametrize("reload_check", [True, False])
def test_train_without_evaluation(tmp_path, reload_check):
    """``--n-eval 0`` (benchmarks/run.py's short memory runs) trains the built-in task without evaluating; the summary
    holds no quality, the training loss curve and the memory; the reload check, when on, still runs."""
    model_dir = tmp_path / "tiny"
    tiny_llama(max_position_embeddings=512).save_pretrained(model_dir)  # the built-in prompts are ~200 characters
    char_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "run"
    args = ["train", "--method", "lora", "--model", str(model_dir), "--n-train", "8", "--n-eval", "0"]
    args += ["--steps", "2", "--batch-size", "4", "--max-length", "256", "--output", str(out)]
    assert main(args if reload_check else [*args, "--no-reload-check"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["before"] is None and summary["after"] is None
    assert [step for step, _ in summary["loss_curve"]] == [1, 2] and all(loss > 0 for _, loss in summary["loss_curve"])
    assert summary["memory_above_frozen_bytes"] > 0
    if reload_check:
        assert summary["reload_max_abs_logit_diff"] <= 1e-4 and summary["adapter_load_seconds"] > 0
    else:
        assert summary["adapter_load_seconds"] is None


def test_output_that_holds_files_is_refused(tiny_model_dir, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"precious")
    with pytest.raises(SystemExit, match="never overwrites"):
        main(["train", "--model", str(tiny_model_dir), "--output", str(out), "--steps", "1"])
    assert (out / "adapter_model.safetensors").read_bytes() == b"precious"


def test_set_parsing_and_unknown_fields():
    assert parse_set(["rank=8", "svd=randomized", "density=0.01"]) == {"rank": 8, "svd": "randomized", "density": 0.01}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        parse_set(["rank"])
    with pytest.raises(SystemExit, match="no field"):
        build_config("lift", {"ranks": 3})
    assert build_config("lift", {"r": 3}).r == 3
    with pytest.warns(FutureWarning, match=r"LiftConfig.rank is now LiftConfig.r"):
        assert build_config("lift", {"rank": 3}).r == 3  # the earlier name still works


@pytest.mark.parametrize("method", ["lora", "full", "shira", "supertuning", "lora_pruned"])
def test_baselines_for_benchmarks(tiny_model_dir, tmp_path, method):
    """``--method lora|full|shira|supertuning|lora_pruned`` train PEFT's LoRA, the full model, PEFT's static sparse
    deltas (at LoRA's trainable count) and LoRA on a 2:4-pruned base; memory, optimizer state and the adapter load
    time are reported."""
    train = _jsonl(tmp_path / "train.jsonl", _rows(8))
    evaluation = _jsonl(tmp_path / "eval.jsonl", _rows(2))
    out = tmp_path / "run"
    args = ["train", "--method", method, "--model", str(tiny_model_dir), "--data", str(train)]
    args += ["--eval-data", str(evaluation), "--steps", "2", "--batch-size", "4", "--max-length", "32"]
    assert main([*args, "--output", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    if method == "full":
        assert summary["trainable_parameters"] == params and summary["adapter_bytes"] is None
    else:
        assert 0 < summary["trainable_parameters"] < params and summary["adapter_bytes"] > 0
        assert summary["adapter_load_seconds"] > 0
    if method in ("shira", "supertuning"):  # the same budget as LoRA r=16 (up to Super-Tuning's rounding per matrix)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        head = model.get_output_embeddings()
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
        lora = sum(min(16 * (m.in_features + m.out_features), m.in_features * m.out_features) for m in linears)
        assert abs(summary["trainable_parameters"] - lora) <= len(linears), (summary["trainable_parameters"], lora)
    if method == "lora_pruned":  # the same 2:4 base as SPP and LoRS; LoRA's merge densifies it
        assert summary["sparsity"]["prune"] == "wanda:2:4"  # what --prune 2:4 means (SPP and LoRS runs too)
        assert summary["sparsity"]["before"]["nm_holds"] is True
        assert summary["sparsity"]["zeros_kept_after_merge"] is False
    # AdamW keeps two moments per trainable entry (plus a step counter per tensor)
    assert summary["optimizer_state_bytes"] >= 2 * 4 * summary["trainable_parameters"]
    assert summary["peak_rss_bytes"] >= summary["frozen_rss_bytes"] > 0


@pytest.mark.parametrize("method", ["lift", "lors"])
def test_train_on_a_4bit_base(tiny_model_dir, tmp_path, method):
    """``--quantize 4bit`` trains on an NF4 copy of the (pruned) base, and the reload check rebuilds it the same way."""
    train = _jsonl(tmp_path / "train.jsonl", _rows(8))
    evaluation = _jsonl(tmp_path / "eval.jsonl", _rows(2))
    out = tmp_path / "run"
    args = ["train", "--method", method, "--model", str(tiny_model_dir), "--data", str(train), "--quantize", "4bit"]
    args += ["--eval-data", str(evaluation), "--steps", "2", "--batch-size", "4", "--max-length", "32"]
    if method == "lors":
        args += ["--prune", "magnitude:2:4", "--set", "r=2"]
    else:
        args += ["--set", "r=2", "--set", "filter_rank=4"]
    assert main([*args, "--output", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    # the saved adapter reloads bit-exactly (logits of bitsandbytes CPU models are no reference; see the README)
    assert summary["quantize"] == "4bit" and summary["reload_max_abs_adapter_diff"] == 0.0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir)


def test_rosa_sparse_learning_rate(tiny_model_dir, tmp_path):
    """``--sparse-lr`` trains RoSA's sparse values at their own rate: at 0 they stay zero, the LoRA factors move."""
    from safetensors.torch import load_file

    train = _jsonl(tmp_path / "train.jsonl", _rows(8))
    evaluation = _jsonl(tmp_path / "eval.jsonl", _rows(2))
    out = tmp_path / "run"
    args = ["train", "--method", "rosa", "--model", str(tiny_model_dir), "--data", str(train), "--sparse-lr", "0"]
    args += ["--eval-data", str(evaluation), "--steps", "3", "--batch-size", "4", "--max-length", "32"]
    args += ["--set", "r=2", "--set", "density=0.05", "--set", "schedule=default", "--set", "window_steps=1"]
    assert main([*args, "--output", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sparse_learning_rate"] == 0.0 and summary["learning_rate"] > 0
    tensors = load_file(out / "adapter_model.safetensors")
    values = [t for k, t in tensors.items() if k.endswith("values")]
    lora_b = [t for k, t in tensors.items() if "lora_B" in k]
    assert values and all(not v.any() for v in values)
    assert lora_b and any(b.any() for b in lora_b)


def test_sparse_lr_is_for_rosa_only(tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit, match="rosa only"):
        main(["train", "--model", str(tiny_model_dir), "--sparse-lr", "1e-4", "--steps", "1", "--n-eval", "0"])


@pytest.mark.parametrize("method", ["smt", "lors"])
def test_train_runs_the_calibration_pass_first(tiny_model_dir, tmp_path, method):
    """SMT selects its blocks and LoRS sets its gradient init before the optimizer exists: SMT's trainable count
    is exactly the budget, from the first step on."""
    train = _jsonl(tmp_path / "train.jsonl", _rows(16))
    evaluation = _jsonl(tmp_path / "eval.jsonl", _rows(2))
    out = tmp_path / "run"
    args = ["train", "--method", method, "--model", str(tiny_model_dir), "--data", str(train), "--eval-data"]
    args += [str(evaluation), "--steps", "2", "--batch-size", "4", "--max-length", "32", "--output", str(out)]
    if method == "smt":
        args += ["--set", "block_size=16", "--set", "num_blocks=7", "--set", "window_steps=2"]
    else:
        args += ["--set", "r=2", "--prune", "magnitude:0.5"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    layer_class = {"smt": "SmtLinear", "lors": "LorsLinear"}[method]
    assert summary["calibration"]["layers"][layer_class] > 0
    assert summary["stored_entries"] == summary["trainable_parameters"] > 0  # what the adapter stores, not 0
    assert set(summary["storage_by_tensor"]) == ({"blocks", "positions"} if method == "smt" else {"A", "B"})
    if method == "smt":
        assert summary["calibration"]["samples"] == 2 * 4  # window_steps batches
        assert summary["trainable_parameters_at_start"] == summary["trainable_parameters"] == 7 * 16 * 16


def test_equal_budget_settings_give_loras_trainable_count():
    """defaults.EQUAL_BUDGET (and S²FT's main job, which holds LoRA's budget itself) reaches LoRA r=16's trainable
    count (within 1.5%) on SmolLM2-135M's shapes."""
    import copy

    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparse_peft.defaults import EQUAL_BUDGET, main_job_config

    config = LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9, num_key_value_heads=3,
        vocab_size=32, tie_word_embeddings=True,
    )  # fmt: skip
    base = LlamaForCausalLM(config)

    def trainable(method, overrides):
        model = get_peft_model(copy.deepcopy(base), build_config(method, overrides))
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    lora = trainable("lora", {})
    entries = sum(m.in_features * m.out_features for n, m in base.named_modules() if n.endswith("_proj"))
    for method, overrides in {**EQUAL_BUDGET, "s2ft": main_job_config("s2ft")}.items():
        if method == "smt":  # allocated at the calibration: num_blocks blocks of 64 x 64 (on the 30-layer model)
            count = overrides["num_blocks"] * 64 * 64 * 2 / 30
        elif method == "diff_pruning":  # the projection keeps density of all targeted entries
            count = overrides["density"] * entries
        else:
            count = trainable(method, overrides)
        assert abs(count / lora - 1) < 0.015, (method, count, lora)
