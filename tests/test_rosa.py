"""RoSA: LoRA + sparse values, gradient-statistics masks, schedules, mask files, merge, persistence, 4-bit."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import INPUT, tiny_llama
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from sparse_peft import (
    RosaConfig,
    RosaLinear,
    ScheduleContext,
    SparsePeftCallback,
    before_optimizer_step,
    begin_step,
    load_rosa_masks,
    refresh_masks,
    rosa_param_groups,
    save_rosa_masks,
)
from sparse_peft.callbacks import STATE_FILE, load_window_state, save_window_state


def rosa_layers(model):
    return [m for m in model.modules() if isinstance(m, RosaLinear)]


def make(weight_decay=0.0, **kw):
    config = dict(r=2, density=0.05, schedule="wl2")
    config.update(kw)
    model = get_peft_model(tiny_llama(), RosaConfig(**config))
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-2, weight_decay=weight_decay)


def train(model, optimizer, steps, start=1, pre_hook=True, context=None):
    """A custom loop with the schedule hooks; returns the losses."""
    context = context or ScheduleContext()
    model.train()
    losses = []
    for step in range(start, start + steps):
        begin_step(model, step, context)
        loss = model(INPUT, labels=INPUT).loss
        loss.backward()
        if pre_hook:
            before_optimizer_step(model, context)
        optimizer.step()
        optimizer.zero_grad()
        refresh_masks(model, step, optimizer, context)
        losses.append(loss.item())
    return losses


def snapshot(layer):
    return {
        "A": layer.lora_A["default"].detach().clone() if "default" in layer.lora_A else None,
        "B": layer.lora_B["default"].detach().clone() if "default" in layer.lora_B else None,
        "values": layer.values["default"].detach().clone(),
        "indices": layer.indices["default"].clone(),
    }


def changed(before, after):
    return {k for k in before if before[k] is not None and not torch.equal(before[k], after[k])}


def test_budget_lora_shapes_and_identity_start():
    model, _ = make()
    base = tiny_llama()
    with torch.no_grad():
        assert torch.equal(model(INPUT).logits, base(INPUT).logits)  # B = 0 and S = 0
    for layer in rosa_layers(model):
        assert layer.values["default"].numel() == round(0.05 * layer.numel)
        assert layer.lora_A["default"].shape == (2, layer.in_features)
        assert layer.lora_B["default"].shape == (layer.out_features, 2)
        assert not layer.get_base_layer().weight.requires_grad
        assert not layer.is_mask_ready("default")
    model, _ = make(density_pattern={"q_proj": 0.1})
    q = next(m for m in rosa_layers(model) if m.module_name.endswith("q_proj"))
    assert q.values["default"].numel() == round(0.1 * q.numel)


def test_sparse_gradient_equals_dense_gradient_at_the_mask():
    model, _ = make(init_weights=False)  # random final mask, random values and B: everything is live
    layer = rosa_layers(model)[0]
    weight = layer.get_base_layer().weight
    weight.requires_grad_(True)
    model.train()
    model(INPUT, labels=INPUT).loss.backward()
    dense = weight.grad.reshape(-1)[layer.indices["default"].long()]
    weight.requires_grad_(False)
    assert torch.allclose(layer.values["default"].grad, dense, atol=1e-6, rtol=1e-5)
    assert layer.lora_A["default"].grad is not None and layer.lora_B["default"].grad.abs().sum() > 0


def test_lora_folded_into_the_one_gemm_trains_as_its_own_branch(monkeypatch):
    """With a frozen base the LoRA joins W_eff (one GEMM, LowRank terms); with a trainable base (the unfused path:
    base + CSR delta + s·B(Ax)) the loss and every adapter gradient are the same."""
    import sparse_peft.sparse.delta as delta_mod

    model, _ = make(init_weights=False)
    model.train()
    folded = []
    original = delta_mod.FusedSparseLinear.apply
    monkeypatch.setattr(delta_mod.FusedSparseLinear, "apply", lambda *a: folded.append(len(a[5])) or original(*a))

    def loss_and_grads():
        model.zero_grad()
        loss = model(INPUT, labels=INPUT).loss
        loss.backward()
        grads = [p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and "rosa" in n]
        return loss.detach(), grads

    loss, grads = loss_and_grads()
    assert folded and all(count == 1 for count in folded)  # every layer folded its one LoRA
    for layer in rosa_layers(model):
        layer.get_base_layer().weight.requires_grad_(True)
    folded.clear()
    loss_ref, grads_ref = loss_and_grads()
    assert not folded
    assert torch.allclose(loss, loss_ref, rtol=1e-5)
    for got, want in zip(grads, grads_ref, strict=True):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("score", ["mean_squared", "mean"])
def test_collected_statistic_is_the_dense_gradient_and_mask_its_top_k(score):
    model, optimizer = make(schedule="default", mask_score=score)
    layer = rosa_layers(model)[0]
    weight = layer.get_base_layer().weight
    context = ScheduleContext()
    model.train()
    begin_step(model, 1, context)
    weight.requires_grad_(True)
    model(INPUT, labels=INPUT).loss.backward()
    grad = weight.grad.detach().clone()
    reference = tiny_llama()  # the adapter starts as the identity, so W's gradient is the base model's
    ref_weight = dict(reference.named_modules())[layer.module_name].weight
    ref_weight.requires_grad_(True)
    per_sample = []
    for row in INPUT:  # the Fisher sums per-example squared gradients (not the square of the batch's)
        ref_weight.grad = None
        reference(row[None], labels=row[None]).loss.backward()
        per_sample.append(ref_weight.grad.detach().clone() / INPUT.shape[0])  # the batch loss averages examples
    weight.requires_grad_(False)
    weight.grad = None
    fisher = sum(g.square() for g in per_sample)
    expected = fisher if score == "mean_squared" else grad
    assert torch.allclose(layer._windows["default"].pending, expected, rtol=1e-5, atol=1e-10)
    before_optimizer_step(model, context)
    optimizer.step()
    optimizer.zero_grad()
    assert refresh_masks(model, 1, optimizer, context) > 0
    k = layer.values["default"].numel()
    scores = expected.abs().reshape(-1)
    kth = scores.topk(k).values[-1]
    chosen = scores[layer.indices["default"].long()]
    assert bool((chosen >= kth - 1e-9).all()) and layer.is_mask_ready("default")
    assert not layer._windows  # the dense accumulator is gone after selection


def test_collection_window_holds_one_weight_sized_buffer_per_layer_in_one_process():
    """After the first collected step, later micro-batches are added to the total in place (no second (out, in)
    buffer per layer), and the total is the sum over the steps."""
    model, optimizer = make(schedule="default", mask_score="mean", window_steps=3)
    layer = rosa_layers(model)[0]
    weight = layer.get_base_layer().weight
    context = ScheduleContext()
    model.train()
    grads = []
    for step in (1, 2):
        begin_step(model, step, context)
        weight.requires_grad_(True)
        model(INPUT, labels=INPUT).loss.backward()
        grads.append(weight.grad.detach().clone())
        weight.grad = None
        window = layer._windows["default"]
        assert (window.pending is None) == (step == 2)  # the first step's sum becomes the total
        before_optimizer_step(model, context)
        optimizer.step()
        optimizer.zero_grad()
        assert refresh_masks(model, step, optimizer, context) == 0
    assert window.steps == 2 and window.count == 2
    assert torch.allclose(window.total, grads[0] + grads[1], rtol=1e-5, atol=1e-10)


def test_wl_schedule_trains_exactly_what_it_promises():
    """wl2 with G=1: steps 1-2 LoRA only, step 3 LoRA + collection, mask chosen after step 3, then LoRA + sparse."""
    model, optimizer = make(weight_decay=0.1)
    layer = rosa_layers(model)[0]
    values = layer.values["default"]
    phases = []
    for step in range(1, 6):
        before = snapshot(layer)
        train(model, optimizer, 1, start=step)
        phases.append(changed(before, snapshot(layer)))
        if step <= 3:
            assert values not in optimizer.state  # skipped by the optimizer, not just zero-stepped
            assert torch.all(values == 0)
    assert phases[0] == phases[1] == {"A", "B"}  # LoRA only (A moves by weight decay while B = 0)
    assert phases[2] == {"A", "B", "indices"}  # collection step: the mask is chosen at its end, values stay zero
    assert phases[3] == phases[4] == {"A", "B", "values"}
    assert int(optimizer.state[values]["step"]) == 2  # Adam's bias correction starts with the sparse phase


def test_zero_gradients_keep_frozen_values_at_zero_without_the_pre_optimizer_hook():
    """A custom loop that skips before_optimizer_step: AdamW sees zero gradients on zero values and keeps them."""
    model, optimizer = make(weight_decay=0.1)
    layer = rosa_layers(model)[0]
    train(model, optimizer, 2, pre_hook=False)
    assert torch.all(layer.values["default"] == 0)
    assert torch.all(optimizer.state[layer.values["default"]]["exp_avg"] == 0)


def test_spa_only_and_lora_only_schedules():
    model, optimizer = make(r=0, schedule="spa_only")
    layer = rosa_layers(model)[0]
    assert "default" not in layer.lora_A
    before = snapshot(layer)
    train(model, optimizer, 1)
    assert changed(before, snapshot(layer)) == {"indices"}  # collection only, nothing trains
    before = snapshot(layer)
    train(model, optimizer, 1, start=2)
    assert changed(before, snapshot(layer)) == {"values"}

    model, optimizer = make(density=0.0, schedule="lora_only")
    layer = rosa_layers(model)[0]
    assert layer.values["default"].numel() == 0 and layer.is_mask_ready("default")
    losses = train(model, optimizer, 3)
    assert losses[-1] < losses[0]


def test_row_scope_mask_is_the_row_balanced_top_k_of_the_fisher():
    """mask_scope='row': every row holds ⌊k/out⌋ or ⌊k/out⌋+1 entries, its best by the Fisher; the matrix-wide mask
    from the same statistics crowds some rows."""
    counts = {}
    for scope in ("row", "matrix"):
        torch.manual_seed(0)
        model, optimizer = make(schedule="default", mask_scope=scope, density=0.1)
        layer = rosa_layers(model)[0]
        context = ScheduleContext()
        model.train()
        begin_step(model, 1, context)
        model(INPUT, labels=INPUT).loss.backward()
        fisher = layer._windows["default"].pending.clone()
        before_optimizer_step(model, context)
        optimizer.step()
        optimizer.zero_grad()
        assert refresh_masks(model, 1, optimizer, context) > 0
        indices = layer.indices["default"].long()
        k, out = indices.numel(), layer.out_features
        counts[scope] = torch.bincount(indices // layer.in_features, minlength=out)
        if scope == "row":
            assert int(counts[scope].min()) == k // out and int(counts[scope].max()) == k // out + 1
            for row in range(out):  # each row holds its own best entries by the Fisher
                mine = indices[indices // layer.in_features == row] % layer.in_features
                assert set(mine.tolist()) == set(fisher[row].topk(mine.numel()).indices.tolist())
    assert int(counts["matrix"].max() - counts["matrix"].min()) > 1


def _layer_inputs(layer, run):
    """``Σ_t x_tj²`` of the inputs ``layer`` sees while ``run()`` runs."""
    seen = []

    def hook(_module, args):
        seen.append(args[0].detach().reshape(-1, args[0].shape[-1]))

    handle = layer.register_forward_pre_hook(hook)
    try:
        run()
    finally:
        handle.remove()
    return torch.cat(seen).float().square().sum(0)


def _brute_force_fisher(layer, batches):
    """``Σ_i G_i²`` of ``layer``'s base weight over the examples of ``batches`` (the adapter starts as the identity)."""
    reference = tiny_llama()
    weight = dict(reference.named_modules())[layer.module_name].weight
    weight.requires_grad_(True)
    fisher = torch.zeros_like(weight)
    for batch in batches:
        for row in batch:
            weight.grad = None
            reference(row[None], labels=row[None]).loss.backward()
            fisher += (weight.grad / batch.shape[0]).square()
    return fisher


def test_input_normalized_mask_is_the_top_k_of_fisher_over_feature_energy():
    """mask_score='input_normalized': the window also sums Σ_t x_tj², and the mask is the top-k of F_ij / Σ_t x_tj²
    (F the per-sample Fisher), not of F; the features with large inputs lose entries to the others."""
    model, optimizer = make(schedule="default", mask_score="input_normalized", density=0.1)
    layer = rosa_layers(model)[0]
    context = ScheduleContext()
    model.train()
    begin_step(model, 1, context)
    x_sq = _layer_inputs(layer, lambda: model(INPUT, labels=INPUT).loss.backward())
    window = layer._windows["default"]
    fisher = _brute_force_fisher(layer, [INPUT])
    assert torch.allclose(window.pending, fisher, rtol=1e-5, atol=1e-10)
    assert torch.allclose(window.pending_input_sq, x_sq, rtol=1e-5)
    before_optimizer_step(model, context)
    optimizer.step()
    optimizer.zero_grad()
    assert refresh_masks(model, 1, optimizer, context) > 0
    k = layer.values["default"].numel()
    scores = (fisher / x_sq).reshape(-1)
    chosen = scores[layer.indices["default"].long()]
    assert bool((chosen >= scores.topk(k).values[-1] * (1 - 1e-5)).all())
    plain = set(fisher.reshape(-1).topk(k).indices.tolist())
    assert plain != set(layer.indices["default"].long().tolist())  # the normalization changed the choice


def test_calibration_pass_picks_the_same_input_normalized_mask():
    """sparse_peft.calibrate with mask_score='input_normalized' ranks by F_ij / Σ_t x_tj² over its batches."""
    import sparse_peft

    model, _ = make(schedule="default", mask_score="input_normalized", density=0.1)
    layer = rosa_layers(model)[0]
    batches = [INPUT[:2], INPUT[2:]]
    x_sq = _layer_inputs(layer, lambda: sparse_peft.calibrate(model, batches))
    assert layer.is_mask_ready("default")
    scores = (_brute_force_fisher(layer, batches) / x_sq).reshape(-1)
    k = layer.values["default"].numel()
    chosen = scores[layer.indices["default"].long()]
    assert bool((chosen >= scores.topk(k).values[-1] * (1 - 1e-5)).all())


@pytest.mark.parametrize("score", ["magnitude", "random"])
def test_statistics_free_masks_are_chosen_when_the_warmup_ends(score):
    model, optimizer = make(mask_score=score, schedule="wl1")
    layer = rosa_layers(model)[0]
    train(model, optimizer, 1)
    assert not layer.is_mask_ready("default")
    train(model, optimizer, 1, start=2)
    assert layer.is_mask_ready("default") and layer.values["default"].abs().sum() > 0  # trained in step 2
    if score == "magnitude":
        k = layer.values["default"].numel()
        magnitudes = layer.get_base_layer().weight.abs().reshape(-1)
        assert bool((magnitudes[layer.indices["default"].long()] >= magnitudes.topk(k).values[-1]).all())


def test_masks_saved_and_loaded_reproduce_training(tmp_path):
    """Two-phase recipe: a run from saved masks, with the collection step as LoRA warm-up, repeats the single run."""
    model, optimizer = make(schedule="wl1")  # step 1 LoRA, step 2 LoRA + collection, steps 3-4 LoRA + sparse
    losses = train(model, optimizer, 2)
    path = tmp_path / "masks.safetensors"
    assert save_rosa_masks(model, path) == 14
    losses += train(model, optimizer, 2, start=3)

    fresh, optimizer = make(schedule="wl2", mask_path=str(path))
    assert all(layer.is_mask_ready("default") for layer in rosa_layers(fresh))
    assert train(fresh, optimizer, 4) == losses

    fresh, optimizer = make(schedule="wl2")
    assert load_rosa_masks(fresh, path) == 14
    assert train(fresh, optimizer, 4) == losses
    assert not list(tmp_path.glob(".tmp-*"))  # the atomic write left no temporary file

    with pytest.raises(ValueError, match="set density"):
        make(schedule="wl2", density=0.1, mask_path=str(path))
    with pytest.raises(FileNotFoundError, match="save_rosa_masks"):
        make(mask_path=str(tmp_path / "missing.safetensors"))
    unselected, _ = make()
    with pytest.raises(ValueError, match="not selected yet"):
        save_rosa_masks(unselected, tmp_path / "early.safetensors")


@pytest.mark.parametrize("score", ["mean_squared", "input_normalized"])
def test_open_collection_window_resumes_exactly(tmp_path, score):
    """G=2: statistics saved after the first collection step (the checkpoint's side file) give the same mask."""
    model, optimizer = make(schedule="default", window_steps=2, mask_score=score)
    train(model, optimizer, 2)
    expected = [layer.indices["default"].clone() for layer in rosa_layers(model)]

    model, optimizer = make(schedule="default", window_steps=2, mask_score=score)
    train(model, optimizer, 1)
    path = str(tmp_path / STATE_FILE)
    assert save_window_state(model, path)  # what a checkpoint holds: adapter, optimizer, window side file
    if score == "input_normalized":
        assert all(layer._windows["default"].input_sq is not None for layer in rosa_layers(model))
    resumed, resumed_optimizer = make(schedule="default", window_steps=2, mask_score=score)
    set_peft_model_state_dict(resumed, get_peft_model_state_dict(model))
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    load_window_state(resumed, path)
    train(resumed, resumed_optimizer, 1, start=2)
    for layer, indices in zip(rosa_layers(resumed), expected, strict=True):
        assert torch.equal(layer.indices["default"], indices)


def test_merge_unmerge_disable_round_trip():
    model, _ = make(init_weights=False)
    model.eval()
    base = tiny_llama()(INPUT).logits
    weights = {layer.module_name: layer.get_base_layer().weight.clone() for layer in rosa_layers(model)}
    expected = model(INPUT).logits.detach()
    assert not torch.allclose(expected, base, atol=1e-3)
    model.merge_adapter()
    assert torch.allclose(model(INPUT).logits, expected, atol=1e-5)
    model.unmerge_adapter()
    for layer in rosa_layers(model):
        assert torch.allclose(layer.get_base_layer().weight, weights[layer.module_name], atol=1e-6)
    assert torch.allclose(model(INPUT).logits, expected, atol=1e-5)
    with model.disable_adapter():
        assert torch.allclose(model(INPUT).logits, base, atol=1e-6)
    layer = rosa_layers(model)[0]
    delta = layer.get_delta_weight("default")
    lora = layer.lora_B["default"] @ layer.lora_A["default"] * layer.adapter_configs["default"].scaling
    sparse = (delta - lora.detach()).reshape(-1)
    assert torch.allclose(sparse[layer.indices["default"].long()], layer.values["default"].detach(), atol=1e-6)
    assert torch.allclose(model.merge_and_unload()(INPUT).logits, expected, atol=1e-5)


def test_save_reload_and_continue(tmp_path):
    model, optimizer = make(schedule="default")
    train(model, optimizer, 3)
    model.eval()
    expected = model(INPUT).logits.detach()
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    for name in ("lora_A", "lora_B", "values", "indices", "mask_ready"):
        assert sum(key.endswith(f"sparse_peft_rosa_{name}") for key in tensors) == 14, name
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    # equal up to float rounding: the trained model (values require grad) runs the one-GEMM path, the frozen
    # reload on 24 tokens the base + CSR path (the inference rule)
    assert torch.allclose(loaded(INPUT).logits, expected, atol=1e-6)
    trainable = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    layer = rosa_layers(trainable)[0]
    assert layer.is_mask_ready("default")  # a loaded adapter keeps its mask: no second collection
    indices = layer.indices["default"].clone()
    optimizer = torch.optim.AdamW([p for p in trainable.parameters() if p.requires_grad], lr=1e-2)
    train(trainable, optimizer, 1)
    assert torch.equal(layer.indices["default"], indices)


def test_multiple_adapters_and_delete():
    model, _ = make(init_weights=False)
    model.eval()
    first = model(INPUT).logits.detach()
    model.add_adapter("other", RosaConfig(r=4, density=0.02, init_weights=False, seed=1))
    model.set_adapter("other")
    layer = rosa_layers(model)[0]
    assert layer.lora_A["other"].shape[0] == 4 and layer.lora_A["other"].requires_grad
    assert not layer.lora_A["default"].requires_grad and not layer.values["default"].requires_grad
    assert not torch.allclose(model(INPUT).logits, first)
    model.set_adapter("default")
    assert torch.equal(model(INPUT).logits, first)
    model.delete_adapter("other")
    assert "other" not in layer.lora_A and "other" not in layer.values and "other" not in layer.mask_ready
    assert torch.equal(model(INPUT).logits, first)


def test_param_groups_separate_learning_rates():
    model, _ = make()
    groups = rosa_param_groups(model, lr=7e-4, sparse_lr=2e-4, weight_decay=0.01)
    assert [g["lr"] for g in groups] == [7e-4, 2e-4]
    assert len(groups[0]["params"]) == 28 and len(groups[1]["params"]) == 14
    n_sparse = sum(layer.values["default"].numel() for layer in rosa_layers(model))
    assert sum(p.numel() for p in groups[1]["params"]) == n_sparse
    torch.optim.AdamW(groups)  # accepted as is


def test_quantized_4bit_base_trains(base_dir):
    pytest.importorskip("bitsandbytes")
    from conftest import quantized_base

    model = get_peft_model(quantized_base(base_dir, 4), RosaConfig(r=2, density=0.05, schedule="default"))
    layer = rosa_layers(model)[0]
    assert type(layer.quantization_backend).__name__ == "Bnb4bitBackend"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = train(model, optimizer, 3)
    assert layer.is_mask_ready("default") and layer.values["default"].abs().sum() > 0
    assert losses[-1] < losses[0]
    assert not any(p.requires_grad for n, p in model.named_parameters() if "base_layer" in n)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"density": 1.5}, r"density must be in \[0, 1\]"),
        ({"r": -1}, "r must be an integer"),
        ({"schedule": "warmup64"}, "schedule must be"),
        ({"mask_score": "fisher"}, "mask_score must be one of"),
        ({"r": 0, "density": 0.0}, "trains nothing"),
        ({"schedule": "lora_only"}, "set density=0"),
        ({"schedule": "spa_only"}, "set r=0"),
        ({"window_steps": 0}, "window_steps must be a positive integer"),
        ({"density_pattern": {"q_proj": -0.1}}, "density_pattern"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RosaConfig(**kwargs)


def test_sft_trainer_with_param_groups_and_resume_inside_the_collection_window(tmp_path):
    """SFTTrainer + SparsePeftCallback + ``optimizers=`` with two learning rates; a checkpoint taken while statistics
    are open (wl1, G=2, checkpoint after step 2) resumes to the same mask, values and losses."""
    from conftest import char_tokenizer, cpu_args
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    texts = ["hello world, this is a tiny test.", "sparse adapters are fun!", "one two three four five", "abc def"]

    def run(out, resume=None):
        model = get_peft_model(tiny_llama(), RosaConfig(r=2, density=0.05, schedule="wl1", window_steps=2))
        optimizer = torch.optim.AdamW(rosa_param_groups(model, lr=2e-2, sparse_lr=1e-2))
        args = cpu_args(
            SFTConfig,
            out,
            max_steps=5,
            gradient_accumulation_steps=2,
            learning_rate=2e-2,
            logging_steps=1,
            save_strategy="steps",
            save_steps=2,
            dataset_num_proc=None,
            seed=0,
            data_seed=0,
            bf16=None,  # TRL's default, i.e. bf16 on (not fp16), as this test has always had
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_dict({"text": texts * 4}),
            processing_class=char_tokenizer(),
            optimizers=(optimizer, None),
            callbacks=[SparsePeftCallback()],
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer, [h["loss"] for h in trainer.state.log_history if "loss" in h]

    trainer, losses = run(tmp_path / "a")
    layer = rosa_layers(trainer.model)[0]
    assert [g["initial_lr"] for g in trainer.optimizer.param_groups] == [2e-2, 1e-2]
    assert layer.is_mask_ready("default") and layer.values["default"].abs().sum() > 0
    state = json.loads((tmp_path / "a" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["SparsePeftCallback"]["attributes"]["state_file"] == STATE_FILE
    from safetensors.torch import load_file

    window = load_file(str(tmp_path / "a" / "checkpoint-2" / STATE_FILE))
    counts = [t for k, t in window.items() if k.endswith("::default::count")]
    assert counts and all(float(c) == 2 for c in counts)  # two micro-batches, one step
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    resumed, resumed_losses = run(tmp_path / "b", resume=str(tmp_path / "b" / "checkpoint-2"))
    assert resumed_losses == pytest.approx(losses, abs=1e-6)
    other = rosa_layers(resumed.model)[0]
    assert torch.equal(other.indices["default"], layer.indices["default"])
    assert torch.allclose(other.values["default"], layer.values["default"], atol=1e-6)
