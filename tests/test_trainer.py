"""Training through TRL's SFTTrainer with the sparse callback: refreshes, optimizer state, exact resume."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import run_sft
from safetensors.torch import load_file

from sparse_peft import LiftLinear, SpielConfig
from sparse_peft.callbacks import STATE_FILE


@pytest.fixture(scope="module")
def uninterrupted(base_dir, tmp_path_factory):
    return run_sft(base_dir, tmp_path_factory.mktemp("sft_a"))


def test_sft_trains_and_refreshes_masks(uninterrupted):
    trainer, losses, state = uninterrupted
    assert len(losses) == 4 and losses[-1] < losses[0]
    layers = [m for m in trainer.model.modules() if isinstance(m, LiftLinear)]
    assert sum(layer.frozen_values["default"].numel() for layer in layers) > 0  # refreshes retired entries
    optimizer = trainer.optimizer
    for layer in layers:
        values = layer.values["default"]
        assert optimizer.state[values]["exp_avg"].shape == values.shape


def test_resume_from_checkpoint_equals_uninterrupted_run(uninterrupted, base_dir, tmp_path):
    trainer_a, losses_a, state_a = uninterrupted
    source = trainer_a.args.output_dir + "/checkpoint-2"
    shutil.copytree(source, tmp_path / "checkpoint-2")
    _, losses_b, state_b = run_sft(base_dir, tmp_path, resume=str(tmp_path / "checkpoint-2"))
    # the resumed history holds steps 1-2 from the checkpoint and steps 3-4 computed after the resume
    assert losses_b == pytest.approx(losses_a, abs=1e-6)
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        if "indices" in key:
            assert torch.equal(state_a[key], state_b[key]), key
        else:
            assert torch.allclose(state_a[key], state_b[key], atol=1e-6), key


def test_sft_with_activation_checkpointing(base_dir, tmp_path):
    """TRL's default (checkpointing on, inputs requiring grad) recomputes the sparse forward in backward."""
    trainer, losses, state = run_sft(base_dir, tmp_path, max_steps=2, save_steps=100, checkpointing=True)
    assert len(losses) == 2 and all(loss == loss for loss in losses)
    layer = next(m for m in trainer.model.modules() if isinstance(m, LiftLinear))
    assert layer.values["default"].abs().sum() > 0


def _spiel():
    return SpielConfig(density=0.1, reselection_steps=3, window_steps=2, initial_reselection_rate=0.5)


def test_spiel_resume_mid_window_equals_uninterrupted_run(base_dir, tmp_path):
    """Checkpoint after step 4, inside the window of steps 4-5 that selects after step 5: the window's statistics
    travel in the checkpoint, so the resumed run makes the same selection."""
    _, losses_a, state_a = run_sft(base_dir, tmp_path / "a", max_steps=7, save_steps=4, peft_config=_spiel())
    shutil.copytree(tmp_path / "a" / "checkpoint-4", tmp_path / "b" / "checkpoint-4")
    side = load_file(str(tmp_path / "b" / "checkpoint-4" / STATE_FILE))
    assert any(key.endswith("::default::candidates") for key in side)  # the open window was exported, as tensors
    assert "candidates" not in (tmp_path / "b" / "checkpoint-4" / "trainer_state.json").read_text()
    _, losses_b, state_b = run_sft(
        base_dir,
        tmp_path / "b",
        max_steps=7,
        save_steps=4,
        peft_config=_spiel(),
        resume=str(tmp_path / "b" / "checkpoint-4"),
    )
    assert losses_b == pytest.approx(losses_a, abs=1e-6)
    for key in state_a:
        if "indices" in key:
            assert torch.equal(state_a[key], state_b[key]), key
        else:
            assert torch.allclose(state_a[key], state_b[key], atol=1e-6), key


def _checkpoint_inside_a_window(base_dir, tmp_path):
    """checkpoint-4 of a SpIEL run whose window (steps 4-5) is open at step 4, copied into a fresh run folder."""
    run_sft(base_dir, tmp_path / "a", max_steps=5, save_steps=4, peft_config=_spiel())
    shutil.copytree(tmp_path / "a" / "checkpoint-4", tmp_path / "b" / "checkpoint-4")
    return tmp_path / "b" / "checkpoint-4"


def test_resume_without_the_side_file_names_it(base_dir, tmp_path):
    checkpoint = _checkpoint_inside_a_window(base_dir, tmp_path)
    (checkpoint / STATE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"sparse_peft_state.safetensors.*SparsePeftCallback\(state_path="):
        run_sft(base_dir, tmp_path / "b", max_steps=5, save_steps=4, peft_config=_spiel(), resume=str(checkpoint))


def test_resume_of_an_old_json_window_checkpoint_is_refused(base_dir, tmp_path):
    """Releases before the side file kept windows as JSON lists in trainer_state.json: refused with a clear error."""
    import json

    checkpoint = _checkpoint_inside_a_window(base_dir, tmp_path)
    state_path = checkpoint / "trainer_state.json"
    state = json.loads(state_path.read_text())
    state["stateful_callbacks"]["SparsePeftCallback"]["attributes"] = {
        "window_state": {"model.layers.0.self_attn.q_proj": {"default": {"candidates": [1, 2], "steps": 1}}}
    }
    state_path.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="JSON form of earlier sparse_peft releases"):
        run_sft(base_dir, tmp_path / "b", max_steps=5, save_steps=4, peft_config=_spiel(), resume=str(checkpoint))
