"""Diff pruning on a tiny Llama: gated dense stage, exact global projection, fixed-mask sparse stage."""

from __future__ import annotations

import gc
import math
import types
import weakref

import pytest
import torch
from conftest import INPUT, char_tokenizer, cpu_args, tiny_llama
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from sparse_peft import (
    DiffPruningConfig,
    DiffPruningLinear,
    ScheduleContext,
    SparsePeftCallback,
    before_optimizer_step,
    begin_step,
    param_groups,
    refresh_masks,
    use_param_groups,
)
from sparse_peft.cli import build_parser
from sparse_peft.groups import CONSTANT_LR
from sparse_peft.pipeline import method_config as build_config
from sparse_peft.sparse.hard_concrete import expected_l0


def dp_layers(model):
    return [m for m in model.modules() if isinstance(m, DiffPruningLinear)]


def run_loop(model, steps, lr=1e-2, optimizer=None, start=1):
    """A custom training loop with the three schedule hooks."""
    optimizer = optimizer or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(start, start + steps):
        begin_step(model, step)
        model(INPUT, labels=INPUT).loss.backward()
        before_optimizer_step(model)
        optimizer.step()
        optimizer.zero_grad()
        refresh_masks(model, step, optimizer)
    model.eval()
    return optimizer


def config(**kwargs):
    return DiffPruningConfig(**{"density": 0.02, "l0_lambda": 0.0, **kwargs})


def test_stage1_is_identity_at_init_and_trains_diff_and_gates():
    base = tiny_llama()
    expected = base(INPUT).logits.detach()
    model = get_peft_model(base, config())
    assert torch.allclose(model(INPUT).logits, expected)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".sparse_peft_diff_pruning_diff." in n or "_log_alpha." in n for n in trainable)
    layer = dp_layers(model)[0]
    assert torch.all(layer.log_alpha["default"] == 5.0) and torch.all(layer.diff["default"] == 0)
    assert not layer.get_base_layer().weight.requires_grad


def test_projection_keeps_exact_density_with_one_global_threshold():
    model = get_peft_model(tiny_llama(), config(init_weights=False))
    layers = dp_layers(model)
    gated = {layer.module_name: layer.gated_diff("default").detach().abs().reshape(-1) for layer in layers}
    total = sum(g.numel() for g in gated.values())
    kept = model.base_model.project()
    assert kept == round(0.02 * total)
    assert sum(layer.values["default"].numel() for layer in layers) == kept
    kept_mags = torch.cat([gated[layer.module_name][layer.indices["default"].long()] for layer in layers])
    dropped = torch.cat([g for g in gated.values()]).sort(descending=True).values[kept:]
    assert kept_mags.min() >= dropped.max()  # one threshold over all layers, not a per-layer budget
    counts = {layer.values["default"].numel() for layer in layers}
    assert len(counts) > 1  # the global threshold gives different counts per layer
    assert model.peft_config["default"].projected_counts == {
        layer.module_name: layer.values["default"].numel() for layer in layers
    }


def test_projection_preserves_the_deterministic_function():
    model = get_peft_model(tiny_llama(), config(init_weights=False, density=1.0)).eval()
    before = model(INPUT).logits.detach()  # eval mode: deterministic gates
    model.base_model.project()
    assert torch.allclose(model(INPUT).logits, before, atol=1e-5)


def test_stages_through_loop_hooks_drop_dense_state_and_free_it():
    model = get_peft_model(tiny_llama(), config(projection_step=2))
    optimizer = run_loop(model, steps=1)
    assert all(layer.stage("default") == 1 for layer in dp_layers(model))
    run_loop(model, steps=1, optimizer=optimizer, start=2)
    assert all(layer.stage("default") == 3 for layer in dp_layers(model))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    values = [layer.values["default"] for layer in dp_layers(model)]
    assert len(params) == len(values) and all(any(p is v for v in values) for p in params)
    assert {id(p) for p in optimizer.state} <= {id(v) for v in values}  # stage-1 moments are gone
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(v.numel() for v in values) == round(0.02 * sum(l.numel for l in dp_layers(model)))
    assert not any("diff." in n or "log_alpha" in n for n, _ in model.named_parameters())
    # stage 3 trains on: only the kept entries change, with state sized k
    snapshot = [v.detach().clone() for v in values]
    run_loop(model, steps=2, optimizer=optimizer, start=3)
    assert all(not torch.equal(v, s) for v, s in zip(values, snapshot, strict=True) if v.numel())
    assert all(optimizer.state[v]["exp_avg"].shape == v.shape for v in values if v.numel())


def test_dense_stage_parameters_are_freed_after_projection():
    model = get_peft_model(tiny_llama(), config())
    optimizer = run_loop(model, steps=1)
    refs = [weakref.ref(p) for layer in dp_layers(model) for p in (layer.diff["default"], layer.log_alpha["default"])]
    model.base_model.project(optimizer=optimizer)
    gc.collect()
    assert all(r() is None for r in refs)


def test_l0_penalty_gradient_reaches_gate_logits_once_per_step():
    model = get_peft_model(tiny_llama(), config(l0_lambda=0.5, init_weights=False))
    layer = dp_layers(model)[0]
    model.train()
    torch.manual_seed(0)
    model(INPUT, labels=INPUT).loss.backward()
    data_grad = layer.log_alpha["default"].grad.clone()
    before_optimizer_step(model)
    sig = torch.sigmoid(layer.log_alpha["default"].detach() - math.log(1.0))
    assert torch.allclose(layer.log_alpha["default"].grad, data_grad + 0.5 * sig * (1 - sig), atol=1e-7)
    total = model.base_model.l0_penalty()
    assert torch.isclose(total, 0.5 * sum(torch.sigmoid(l.log_alpha["default"]).sum() for l in dp_layers(model)))


def test_structured_group_gate_multiplies_gate_and_penalty():
    model = get_peft_model(tiny_llama(), config(structured=True, l0_lambda=1.0))
    layer = dp_layers(model)[0]
    with torch.no_grad():
        layer.group_log_alpha["default"].fill_(-10.0)  # closes the whole matrix
        layer.diff["default"].fill_(1.0)
    assert torch.all(layer.get_delta_weight("default") == 0)
    expected = torch.sigmoid(torch.tensor(-10.0)) * torch.sigmoid(torch.tensor(5.0)) * layer.numel
    assert torch.isclose(layer.l0_penalty("default"), expected)


def test_sampled_gates_follow_hard_concrete_limits():
    model = get_peft_model(tiny_llama(), config(log_alpha_init=0.0))
    layer = dp_layers(model)[0]
    z = layer.gate("default", sample=True)
    assert z.min() == 0 and z.max() == 1 and ((z > 0) & (z < 1)).any()


def test_save_in_stage1_and_stage3_reload_and_merge(tmp_path):
    model = get_peft_model(tiny_llama(), config(init_weights=False)).eval()
    out1 = model(INPUT).logits.detach()
    model.save_pretrained(tmp_path / "stage1")
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "stage1")
    assert torch.allclose(reloaded(INPUT).logits, out1, atol=1e-6)

    run_loop(model, steps=1)
    model.base_model.project()
    run_loop(model, steps=1)
    out3 = model(INPUT).logits.detach()
    model.save_pretrained(tmp_path / "stage3")
    keys = load_file(tmp_path / "stage3" / "adapter_model.safetensors").keys()
    assert keys and all(
        k.endswith(("sparse_peft_diff_pruning_values", "sparse_peft_diff_pruning_indices")) for k in keys
    )
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "stage3")
    assert all(layer.stage("default") == 3 for layer in dp_layers(reloaded))
    assert torch.allclose(reloaded(INPUT).logits, out3, atol=1e-6)

    for m, out in ((reloaded, out3), (PeftModel.from_pretrained(tiny_llama(), tmp_path / "stage1"), out1)):
        bases = [layer.get_base_layer().weight.detach().clone() for layer in dp_layers(m)]
        m.merge_adapter(safe_merge=True)
        assert torch.allclose(m(INPUT).logits, out, atol=1e-5)
        m.unmerge_adapter()
        assert all(torch.equal(l.get_base_layer().weight, b) for l, b in zip(dp_layers(m), bases, strict=True))


def test_stage3_checkpoint_loads_into_stage1_model(tmp_path):
    """Trainer resuming past projection_step loads a stage-3 checkpoint into a freshly built stage-1 model."""
    model = get_peft_model(tiny_llama(), config(init_weights=False)).eval()
    model.base_model.project()
    out = model(INPUT).logits.detach()
    model.save_pretrained(tmp_path)
    fresh = get_peft_model(tiny_llama(), config())
    fresh.load_adapter(tmp_path, "default", is_trainable=True)
    assert all(layer.stage("default") == 3 for layer in dp_layers(fresh))
    assert torch.allclose(fresh(INPUT).logits, out, atol=1e-6)


def test_layer_with_no_survivors_still_runs():
    model = get_peft_model(tiny_llama(), config(init_weights=False, density=1e-5))
    assert model.base_model.project() == 1
    assert sum(layer.values["default"].numel() == 0 for layer in dp_layers(model)) == len(dp_layers(model)) - 1
    model.train()
    model(INPUT, labels=INPUT).loss.backward()


def test_ddp_guard_names_the_fix():
    model = get_peft_model(tiny_llama(), config(projection_step=5))
    context = types.SimpleNamespace(world_size=2, total_steps=10, group=None)
    with pytest.raises(RuntimeError, match="max_steps=5"):
        begin_step(model, 1, context)
    begin_step(model, 1, types.SimpleNamespace(world_size=2, total_steps=5, group=None))  # projection at the end


def test_quantized_4bit_base_trains_through_projection(base_dir):
    pytest.importorskip("bitsandbytes")
    from conftest import quantized_base

    model = get_peft_model(quantized_base(base_dir, 4), config(projection_step=2, density=0.05))
    run_loop(model, steps=3)
    assert all(layer.stage("default") == 3 for layer in dp_layers(model))
    assert any(layer.values["default"].abs().sum() > 0 for layer in dp_layers(model))


def test_sft_trainer_penalty_and_projection(tmp_path):
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    seen = {}

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            layer = dp_layers(model)[0]
            if state.global_step == 1:
                seen["log_alpha"] = layer.log_alpha["default"].detach().clone()

    args = cpu_args(
        SFTConfig,
        tmp_path / "out",
        max_steps=3,
        learning_rate=1e-2,
        activation_checkpointing=False,
        lr_scheduler_type="constant",
        weight_decay=0.0,
    )
    trainer = SFTTrainer(
        model=str(base),
        args=args,
        processing_class=char_tokenizer(),
        train_dataset=Dataset.from_dict({"text": ["hello world", "sparse diffs", "abc def", "one two"]}),
        peft_config=config(l0_lambda=1.0, projection_step=2, gate_lr=0.05),
        callbacks=[SparsePeftCallback(), Snapshot()],
    )
    use_param_groups(trainer)
    trainer.train()
    # step 1: the data gradient of log α is 0 (w starts at 0), so only the penalty moved it, downwards by ~gate_lr
    assert torch.allclose(seen["log_alpha"], torch.full_like(seen["log_alpha"], 5.0 - 0.05), atol=1e-4)
    layers = dp_layers(trainer.model)
    assert all(layer.stage("default") == 3 for layer in layers)
    inner = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    n_params = sum(p.numel() for g in inner.param_groups for p in g["params"])
    assert n_params == sum(layer.values["default"].numel() for layer in layers)


def test_config_errors_and_cli_alias():
    for kwargs, match in [
        ({"density": 0.0}, "density must be in"),
        ({"projection_step": 0}, "projection_step must be a positive integer"),
        ({"l0_lambda": -1.0}, "l0_lambda must be >= 0"),
        ({"gate_left": 0.5}, "gate_left < 0 and gate_right > 1"),
        ({"gate_temperature": 0.0}, "gate_temperature must be a positive number"),
        ({"finetune_init": "zero"}, "finetune_init must be"),
        ({"gate_lr": 0.0}, "gate_lr must be a positive number"),
    ]:
        with pytest.raises(ValueError, match=match):
            DiffPruningConfig(**kwargs)
    assert build_parser().parse_args(["train", "--method", "diff-pruning"]).method == "diff_pruning"
    assert isinstance(build_config("diff-pruning", {}), DiffPruningConfig)


def _decaying_loop(model, steps, lr, optimizer):
    """A plain loop under a linearly decaying schedule, keeping constant-rate groups through the hook."""
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    model.train()
    for step in range(1, steps + 1):
        begin_step(model, step)
        model(INPUT, labels=INPUT).loss.backward()
        before_optimizer_step(model, optimizer=optimizer)
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
    model.eval()


def test_gate_logits_train_in_their_own_constant_group():
    model = get_peft_model(tiny_llama(), config(l0_lambda=0.0))
    groups = param_groups(model, lr=1e-3, weight_decay=0.01)
    assert [(g["lr"], g["weight_decay"], CONSTANT_LR in g) for g in groups] == [(1e-3, 0.01, False), (0.1, 0.0, True)]
    layer = dp_layers(model)[0]
    assert {id(p) for p in groups[1]["params"]} == {id(m.log_alpha["default"]) for m in dp_layers(model)}
    optimizer = torch.optim.AdamW(groups)
    _decaying_loop(model, steps=10, lr=1e-3, optimizer=optimizer)
    assert optimizer.param_groups[1]["lr"] == 0.0 == optimizer.param_groups[0]["lr"]  # the schedule's last value
    before_optimizer_step(model, optimizer=optimizer)
    assert optimizer.param_groups[1]["lr"] == 0.1 and optimizer.param_groups[0]["lr"] == 0.0
    moved = (layer.log_alpha["default"] - 5.0).abs().max().item()
    single = get_peft_model(tiny_llama(), config(l0_lambda=0.0, gate_lr=None))
    assert len(param_groups(single, lr=1e-3)) == 1
    _decaying_loop(single, 10, 1e-3, torch.optim.AdamW(param_groups(single, lr=1e-3)))
    moved_single = (dp_layers(single)[0].log_alpha["default"] - 5.0).abs().max().item()
    assert moved > 0.3 and moved_single < 0.02  # at w's rate the gates barely move: the defect


def test_l0_penalty_lowers_the_expected_density():
    def expected_density(l0_lambda):
        model = get_peft_model(tiny_llama(), config(l0_lambda=l0_lambda, gate_lr=0.3))
        _decaying_loop(model, 15, 1e-3, torch.optim.AdamW(param_groups(model, lr=1e-3)))
        layers = dp_layers(model)
        counts = sum(expected_l0(m.log_alpha["default"], -1.5, 1.5, 1.0).sum().item() for m in layers)
        return counts / sum(m.numel for m in layers)

    free, penalised = expected_density(0.0), expected_density(1e-3)
    assert penalised < free - 0.1, (free, penalised)


def test_trainer_without_the_gate_group_warns(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = cpu_args(SFTConfig, tmp_path / "out", max_steps=1)
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    trainer = SFTTrainer(
        model=str(base),
        args=args,
        processing_class=char_tokenizer(),
        train_dataset=Dataset.from_dict({"text": ["hello world", "sparse diffs"]}),
        peft_config=config(),
        callbacks=[SparsePeftCallback()],
    )
    with pytest.warns(UserWarning, match=r"diff pruning gate logits .*use_param_groups\(trainer\)"):
        trainer.train()


def _rates_after_projection(scale, steps=6, lr=1e-3):
    """Rates the stage-3 values' group steps with in a 6-step loop under a linear decay (projection after step 2)."""
    model = get_peft_model(tiny_llama(), config(projection_step=2, finetune_lr_scale=scale))
    optimizer = torch.optim.AdamW(param_groups(model, lr=lr))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    context = ScheduleContext(total_steps=steps)
    rates = []
    model.train()
    for step in range(1, steps + 1):
        begin_step(model, step, context)
        model(INPUT, labels=INPUT).loss.backward()
        before_optimizer_step(model, context, optimizer)
        values = [layer.values["default"] for layer in dp_layers(model) if "default" in layer.values]
        if values:
            rates.append(next(g["lr"] for g in optimizer.param_groups if any(p is values[0] for p in g["params"])))
        optimizer.step()
        optimizer.zero_grad()
        refresh_masks(model, step, optimizer, context)
        schedule.step()
    return rates


def test_stage3_trains_on_a_schedule_of_its_own():
    """The paper fine-tunes the projected entries in a run of their own at 5x stage 1's rate: stage 3's group starts
    at finetune_lr_scale x the diff's initial rate and decays linearly to 0 over the 4 steps left, whatever the
    trainer's schedule does; with finetune_lr_scale=None it follows the trainer's decayed tail."""
    assert _rates_after_projection(5.0) == pytest.approx([5e-3, 5e-3 * 0.75, 5e-3 * 0.5, 5e-3 * 0.25])
    assert _rates_after_projection(None) == pytest.approx([1e-3 * (1 - t / 6) for t in range(2, 6)])
