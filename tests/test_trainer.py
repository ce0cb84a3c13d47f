"""Training through TRL's SFTTrainer with the sparse callback: refreshes, optimizer state, exact resume."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import char_tokenizer
from datasets import Dataset
from peft import get_peft_model_state_dict
from trl import SFTConfig, SFTTrainer

from sparse_peft import LiftConfig, LiftLinear, SparsePeftCallback, SpielConfig

TEXTS = ["hello world, this is a tiny test.", "sparse adapters are fun!", "one two three four five", "abc def ghi"]


def run_sft(base_dir, out, max_steps=4, resume=None, save_steps=2, checkpointing=False, peft_config=None):
    tokenizer = char_tokenizer()
    args = SFTConfig(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        learning_rate=2e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="steps",
        save_steps=save_steps,
        max_length=32,
        use_cpu=True,
        dataset_num_proc=None,
        seed=0,
        data_seed=0,
        bf16=False,
        fp16=False,
        activation_checkpointing=checkpointing,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=str(base_dir),
        args=args,
        train_dataset=Dataset.from_dict({"text": TEXTS * 2}),
        processing_class=tokenizer,
        peft_config=peft_config or LiftConfig(rank=2, filter_rank=4, update_interval=1),
        callbacks=[SparsePeftCallback()],
    )
    trainer.train(resume_from_checkpoint=resume)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    state = {k: v.clone() for k, v in get_peft_model_state_dict(trainer.model).items()}
    return trainer, losses, state


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
    return SpielConfig(density=0.1, reselection_steps=3, selection_accumulation_steps=2, initial_reselection_rate=0.5)


def test_spiel_resume_mid_window_equals_uninterrupted_run(base_dir, tmp_path):
    """Checkpoint after step 4, inside the window of steps 4-5 that selects after step 5: the window's statistics
    travel in the checkpoint, so the resumed run makes the same selection."""
    _, losses_a, state_a = run_sft(base_dir, tmp_path / "a", max_steps=7, save_steps=4, peft_config=_spiel())
    shutil.copytree(tmp_path / "a" / "checkpoint-4", tmp_path / "b" / "checkpoint-4")
    saved = (tmp_path / "b" / "checkpoint-4" / "trainer_state.json").read_text()
    assert '"candidates"' in saved  # the open window was exported
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
