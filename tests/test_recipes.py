"""``recipes/`` and ``sparse-peft sft|dpo``: every recipe parses into TRL's config and a valid method config, and the
commands run end to end (tiny model standing in for the default one)."""

from __future__ import annotations

import json
import math

import pytest
from conftest import REPO, char_tokenizer
from helpers_tasks import tiny_chat_model

import sparse_peft
from sparse_peft.cli import main
from sparse_peft.recipes import method_config, parse

RECIPES = sorted((REPO / "recipes").glob("*/*.yaml"))


def test_every_method_has_an_sft_and_a_dpo_recipe():
    names = {(p.parent.name, p.stem) for p in RECIPES}
    for method in sparse_peft.METHODS:
        assert ("sft", method) in names and ("dpo", method) in names, method


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}-{p.stem}")
def test_recipe_parses(recipe, tmp_path):
    script, training = parse(recipe.parent.name, ["--config", str(recipe), "--output_dir", str(tmp_path / "out")])
    config = method_config(script)
    assert type(config) is sparse_peft.METHODS[recipe.stem][0]
    assert training.max_steps > 0 and training.learning_rate > 0
    if recipe.parent.name == "dpo":
        assert training.logging_steps == 1  # the first logged loss is the first step's


@pytest.fixture
def tiny_chat_dir(tmp_path):
    path = tmp_path / "tiny-chat"
    tiny_chat_model().save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def _run(kind: str, method: str, model_dir, out, *extra: str) -> dict:
    recipe = REPO / "recipes" / kind / f"{method}.yaml"
    args = [kind, "--config", str(recipe), "--model_name_or_path", str(model_dir), "--output_dir", str(out)]
    args += ["--max_steps", "2", "--n_train", "8", "--n_eval", "0", "--max_length", "256", "--disable_tqdm", "true"]
    assert main([*args, *extra]) == 0
    return json.loads((out / "summary.json").read_text())


def test_sft_command(tiny_chat_dir, tmp_path):
    summary = _run("sft", "lift", tiny_chat_dir, tmp_path / "sft", "--method_config", '{"r": 2, "filter_rank": 4}')
    assert summary["steps"] == 2 and (tmp_path / "sft" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("method", ["rosa", "snell"])
def test_dpo_command_starts_at_ln2(tiny_chat_dir, tmp_path, method):
    """RoSA: reference = adapter disabled; SNELL (not the identity at init): reference = frozen copy ('ref')."""
    fields = {"rosa": '{"r": 2, "density": 0.01, "schedule": "wl1"}', "snell": '{"r": 4, "sparsity": 0.5}'}[method]
    summary = _run("dpo", method, tiny_chat_dir, tmp_path / "dpo", "--method_config", fields)
    assert summary["first_logged_loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_output_dir_with_files_is_refused(tiny_chat_dir, tmp_path):
    out = tmp_path / "used"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(SystemExit, match="already holds files"):
        _run("sft", "lift", tiny_chat_dir, out)


def test_rosa_recipe_trains_sparse_values_at_their_own_rate(tiny_chat_dir, tmp_path):
    """The SFT recipe's ``sparse_learning_rate``: at 0 RoSA's values stay zero while its LoRA factors move."""
    from safetensors.torch import load_file

    fields = '{"r": 2, "density": 0.05, "schedule": "default", "window_steps": 1}'
    _run("sft", "rosa", tiny_chat_dir, tmp_path / "sft", "--method_config", fields, "--sparse_learning_rate", "0")
    tensors = load_file(tmp_path / "sft" / "adapter" / "adapter_model.safetensors")
    assert all(not t.any() for k, t in tensors.items() if k.endswith("values"))
    assert any(t.any() for k, t in tensors.items() if "lora_B" in k)
    with pytest.raises(SystemExit, match="rosa only"):
        _run("sft", "lift", tiny_chat_dir, tmp_path / "other", "--sparse_learning_rate", "1e-4")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}-{p.stem}")
def test_recipe_settings_are_the_main_job_defaults(recipe):
    """One source of defaults: every recipe's method_config (and the SFT recipes' learning rates) equal
    sparse_peft.defaults.MAIN_JOB, which the CLI's main job reads as well."""
    import yaml

    from sparse_peft.defaults import DPO_OVERRIDES, MAIN_JOB
    from sparse_peft.pipeline import method_config as build_config

    data = yaml.safe_load(recipe.read_text())
    job = MAIN_JOB[recipe.stem]
    overrides = DPO_OVERRIDES.get(recipe.stem, {}) if recipe.parent.name == "dpo" else {}
    assert data["method_config"] == {**job.config, **overrides}, recipe
    assert method_config(parse_script(data)).to_dict() == build_config(recipe.stem, overrides).to_dict()
    if recipe.parent.name == "sft":
        assert data["learning_rate"] == job.lr
        assert data.get("sparse_learning_rate") == job.sparse_lr


def parse_script(data):
    from sparse_peft.recipes import SparseScriptArguments

    return SparseScriptArguments(method=data["method"], method_config=json.dumps(data["method_config"]))
