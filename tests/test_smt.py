"""SMT on a tiny Llama: gradient warm-up, one-shot block selection, block autograd, PEFT layer contract."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import INPUT, tiny_llama
from peft import PeftModel, get_peft_model

from sparse_peft import ScheduleContext, SmtConfig, SmtLinear, begin_step, refresh_masks
from sparse_peft.sparse.slices import BlockLayout, block_extents, block_matmul, block_scores, blocks_to_dense


def smt_layers(model):
    return [m for m in model.modules() if isinstance(m, SmtLinear)]


def run(model, steps, lr=1e-2, start=1, optimizer=None):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer or torch.optim.AdamW(params, lr=lr)
    context = ScheduleContext()
    model.train()
    moved = []
    for step in range(start, start + steps):
        begin_step(model, step, context)
        model(INPUT, labels=INPUT).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        moved.append(refresh_masks(model, step, optimizer, context))
    model.eval()
    return optimizer, moved


def make(**kw):
    config = dict(block_size=24, num_blocks=5, window_steps=2, seed=1)
    config.update(kw)
    return get_peft_model(tiny_llama(), SmtConfig(**config))


def dense_warmup_grads(steps: int) -> dict[str, torch.Tensor]:
    """Brute force: q/k/v weight gradients of the frozen model summed over the warm-up steps."""
    model = tiny_llama()
    grads = {}
    for name, p in model.named_parameters():
        p.requires_grad_(any(t in name for t in ("q_proj", "k_proj", "v_proj")))
    model.train()
    for _ in range(steps):
        model(INPUT, labels=INPUT).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            grads[name.removesuffix(".weight")] = p.grad.clone()
    return grads


def test_targets_and_fixed_storage():
    model = make()
    layers = smt_layers(model)
    assert len(layers) == 6 and {l.module_name.split(".")[-1] for l in layers} == {"q_proj", "k_proj", "v_proj"}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("sparse_peft_smt_blocks" in n for n in trainable) and len(trainable) == 6
    cap = -(-2 * 5 // 6)  # ⌈2n/M⌉
    for layer in layers:
        assert layer.blocks["default"].shape == (cap, 24, 24)
        assert layer.positions["default"].dtype == torch.int32 and (layer.positions["default"] == -1).all()
        assert not layer.get_base_layer().weight.requires_grad


def test_warmup_leaves_model_unchanged_then_selects_global_top_n():
    model = make(max_blocks_per_matrix=9)  # no capacity limit: pure global top-n
    with torch.no_grad():
        before = model(INPUT).logits.detach()
    params = {id(l.blocks["default"]): l.blocks["default"] for l in smt_layers(model)}
    _, moved = run(model, steps=2)
    assert moved == [0, 5]
    assert torch.equal(model(INPUT).logits, before)  # gradient-only warm-up: nothing trained yet
    assert {id(l.blocks["default"]) for l in smt_layers(model)} == set(params)  # same tensors: optimizer unchanged
    grads = dense_warmup_grads(2)
    scored = []
    for layer in smt_layers(model):
        key = next(k for k in grads if layer.module_name.endswith(k))
        s = block_scores(grads[key], 24, "mean_abs")
        scored += [(float(s[r, c]), layer.module_name, r, c) for r in range(s.shape[0]) for c in range(s.shape[1])]
    brute = {(n, r, c) for _, n, r, c in sorted(scored, reverse=True)[:5]}
    chosen = {(l.module_name, r, c) for l in smt_layers(model) for r, c in l.positions["default"].tolist() if r >= 0}
    assert chosen == brute


def test_per_matrix_selection_fills_every_matrix():
    model = make(selection="per_matrix", num_blocks=2)
    run(model, steps=2)
    for layer in smt_layers(model):
        pos = layer.positions["default"]
        assert pos.shape == (2, 2) and (pos >= 0).all()


def test_only_selected_blocks_change_and_state_is_block_sized():
    model = make()
    optimizer, _ = run(model, steps=4)
    for layer in smt_layers(model):
        state = optimizer.state[layer.blocks["default"]]
        if layer.selected("default"):
            assert state["exp_avg"].shape == layer.blocks["default"].shape
        else:  # a matrix without blocks never trains, so it never gets optimizer state
            assert not state
        w0 = layer.get_base_layer().weight.detach().clone()
        layer.merge()
        changed = (layer.get_base_layer().weight != w0).nonzero().tolist()
        allowed = {(r, c) for r, c in layer.positions["default"].tolist() if r >= 0}
        assert all((i // 24, j // 24) in allowed for i, j in changed)
        assert bool(changed) == bool(allowed)
        layer.unmerge()
        assert torch.equal(layer.get_base_layer().weight, w0)


@pytest.mark.parametrize("shape,block", [((64, 48), 16), ((50, 37), 16), ((32, 64), 24)])
def test_block_gradient_equals_dense_gradient_restricted(shape, block):
    torch.manual_seed(0)
    layout_coords = torch.tensor([[0, 1], [(shape[0] - 1) // block, (shape[1] - 1) // block], [1, 0]])
    layout = BlockLayout.build(layout_coords, shape, block)
    heights, widths = block_extents(layout_coords, shape, block)
    blocks = torch.zeros(3, block, block, dtype=torch.float64)
    for i, (h, w) in enumerate(zip(heights.tolist(), widths.tolist(), strict=True)):  # edge blocks: zero outside W
        blocks[i, :h, :w] = torch.randn(h, w, dtype=torch.float64)
    dense_mask = blocks_to_dense(torch.ones_like(blocks), layout)
    blocks.requires_grad_(True)
    x = torch.randn(2, 5, shape[1], dtype=torch.float64, requires_grad=True)
    y = block_matmul(x, blocks, layout)
    dense = blocks_to_dense(blocks.detach(), layout).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    y_ref = x2 @ dense.t()
    assert torch.allclose(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.allclose(x.grad, x2.grad)
    assert torch.allclose(blocks_to_dense(blocks.grad, layout), dense.grad * dense_mask)
    for i, (r, c) in enumerate(layout_coords.tolist()):  # outside the weight: exactly zero
        h, w = min(block, shape[0] - r * block), min(block, shape[1] - c * block)
        outside = blocks.grad[i].clone()
        outside[:h, :w] = 0
        assert torch.count_nonzero(outside) == 0


def test_block_backward_saves_only_input_column_slices():
    out_f, in_f, b = 64, 96, 16
    layout = BlockLayout.build(torch.tensor([[0, 1], [2, 1], [3, 4]]), (out_f, in_f), b)
    blocks = torch.randn(3, b, b, requires_grad=True)
    x = torch.randn(10, in_f, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = block_matmul(x, blocks, layout)
    y.sum().backward()
    sizes = sorted(t.numel() for t in saved if t is not blocks)
    assert sizes == [10 * 2 * b]  # two distinct block columns, once each
    assert max(t.numel() for t in saved) < out_f * in_f


def test_layer_training_saves_nothing_dense():
    model = make(block_size=16, num_blocks=2)
    run(model, steps=2)
    layer = next(l for l in smt_layers(model) if l.layout("default")[0] is not None)
    x = torch.randn(3, 8, layer.in_features, requires_grad=True)
    weight = layer.get_base_layer().weight
    saved = []
    layer.train()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    y.sum().backward()
    frozen = {weight.untyped_storage().data_ptr(), layer.blocks["default"].untyped_storage().data_ptr()}
    ours = [t for t in saved if t.untyped_storage().data_ptr() not in frozen]  # the base layer's own weight aside
    assert ours and max(t.numel() for t in ours) < layer.out_features * layer.in_features


def test_merge_unmerge_disable_and_unload():
    model = make(init_weights=False)
    run(model, steps=2, lr=0.0)
    trained = model(INPUT).logits.detach()
    with model.disable_adapter():
        base_out = model(INPUT).logits.detach()
    assert not torch.allclose(trained, base_out)
    bases = [l.get_base_layer().weight.detach().clone() for l in smt_layers(model)]
    model.merge_adapter(safe_merge=True)
    assert torch.allclose(model(INPUT).logits, trained, atol=1e-5)
    model.unmerge_adapter()
    for layer, base in zip(smt_layers(model), bases, strict=True):
        assert torch.equal(layer.get_base_layer().weight, base)
    merged = copy.deepcopy(model).merge_and_unload()
    assert not any(isinstance(m, SmtLinear) for m in merged.modules())
    assert torch.allclose(merged(INPUT).logits, trained, atol=1e-5)


def test_save_reload_round_trip(base_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir), SmtConfig(block_size=24, num_blocks=5, window_steps=2)
    )
    run(model, steps=4)
    expected = model(INPUT).logits.detach()
    positions = {l.module_name: l.positions["default"].clone() for l in smt_layers(model)}
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path)
    assert torch.allclose(loaded(INPUT).logits, expected, atol=1e-6)
    for layer in smt_layers(loaded):
        assert torch.equal(layer.positions["default"], positions[layer.module_name])
    trainable = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path, is_trainable=True)
    _, moved = run(trainable, steps=3)  # already selected: no new warm-up or selection
    assert moved == [0, 0, 0]


def test_multiple_adapters_set_and_delete():
    model = make(init_weights=False)
    run(model, steps=2, lr=0.0)
    out_default = model(INPUT).logits.detach()
    model.add_adapter("other", SmtConfig(block_size=32, num_blocks=2, window_steps=1, init_weights=False))
    layer = smt_layers(model)[0]
    assert not layer.blocks["other"].requires_grad and layer.blocks["other"].shape[-1] == 32
    model.set_adapter("other")
    run(model, steps=1, lr=0.0)
    assert sum(int((l.positions["other"][:, 0] >= 0).sum()) for l in smt_layers(model)) == 2
    assert not torch.allclose(model(INPUT).logits, out_default)
    model.set_adapter("default")
    model.delete_adapter("other")
    assert "other" not in layer.blocks and "other" not in layer.selectors
    assert torch.allclose(model(INPUT).logits, out_default)


def test_warmup_statistics_survive_export_and_import():
    model = make(window_steps=3)
    run(model, steps=2)
    saved = {l.module_name: l.export_state("default") for l in smt_layers(model)}
    assert all(set(tensors) == {"gradient", "batches"} for tensors in saved.values())
    resumed = make(window_steps=3)
    for layer in smt_layers(resumed):
        layer.import_state("default", saved[layer.module_name])
    run(model, steps=1, start=3)
    run(resumed, steps=1, start=3)
    for a, b in zip(smt_layers(model), smt_layers(resumed), strict=True):
        assert torch.equal(a.positions["default"], b.positions["default"])


def test_quantized_4bit_base_trains(base_dir):
    from conftest import quantized_base

    model = get_peft_model(quantized_base(base_dir, 4), SmtConfig(block_size=16, num_blocks=4, window_steps=1))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    model.train()
    for step in range(1, 5):
        begin_step(model, step)
        loss = model(INPUT, labels=INPUT).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        refresh_masks(model, step, optimizer)
        losses.append(loss.item())
    assert losses[-1] < losses[1]
    assert sum(float(p.detach().abs().sum()) for p in params) > 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"block_size": 0}, "SmtConfig.block_size must be a positive integer"),
        ({"num_blocks": -1}, "SmtConfig.num_blocks must be a positive integer"),
        ({"num_blocks": None, "density": None}, "needs num_blocks or density"),
        ({"density": 1.5}, r"SmtConfig.density must be in \(0, 1\]"),
        ({"selection": "heap"}, "SmtConfig.selection"),
        ({"block_score": "mean"}, "SmtConfig.block_score"),
        ({"window_steps": 0}, "SmtConfig.window_steps"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SmtConfig(**kwargs)


def test_budget_errors_name_the_fix():
    with pytest.raises(ValueError, match="num_blocks=1000 exceeds"):
        get_peft_model(tiny_llama(), SmtConfig(block_size=32, num_blocks=1000))
    with pytest.raises(ValueError, match="raise max_blocks_per_matrix"):
        get_peft_model(tiny_llama(), SmtConfig(block_size=32, num_blocks=10, max_blocks_per_matrix=1))


def _brute_top(grads, layers, n):
    scored = []
    for layer in layers:
        key = next(k for k in grads if layer.module_name.endswith(k))
        s = block_scores(grads[key], 24, "mean_abs")
        scored += [(float(s[r, c]), layer.module_name, r, c) for r in range(s.shape[0]) for c in range(s.shape[1])]
    return {(name, r, c) for _, name, r, c in sorted(scored, reverse=True)[:n]}


def test_calibration_selects_exactly_the_budget_without_a_per_matrix_cap():
    from sparse_peft import calibrate

    n = 12  # ⌈2n/M⌉ = 4 would cap a matrix at 4 blocks; the calibration pass has no such cap
    model = make(num_blocks=n)
    assert calibrate(model, [INPUT, INPUT]) == {"SmtLinear": 6}
    layers = smt_layers(model)
    chosen = {(l.module_name, r, c) for l in layers for r, c in l.positions["default"].tolist()}
    assert chosen == _brute_top(dense_warmup_grads(2), layers, n)
    assert sum(l.blocks["default"].shape[0] for l in layers) == n  # storage = the blocks used, every slot used
    assert all((l.positions["default"] >= 0).all() for l in layers)
    assert max(l.blocks["default"].shape[0] for l in layers) > -(-2 * n // 6)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == n * 24 * 24
    assert all(p.grad is None for p in model.parameters())
    optimizer, moved = run(model, steps=2)  # trains at once, in a plain loop too
    assert moved == [0, 0]
    assert all(optimizer.state[l.blocks["default"]]["step"] == 2 for l in layers if l.selected("default"))


def test_first_adam_step_of_a_block_after_the_warmup_is_a_fresh_adam_step():
    lr = 1e-2
    model = make(window_steps=2)
    optimizer, _ = run(model, steps=2, lr=lr)  # the warm-up, then the selection after step 2
    before = {id(l): l.blocks["default"].detach().clone() for l in smt_layers(model)}
    optimizer, _ = run(model, steps=1, start=3, optimizer=optimizer)
    for layer in smt_layers(model):
        if not layer.selected("default"):
            continue
        assert int(optimizer.state[layer.blocks["default"]]["step"]) == 1
        change = (layer.blocks["default"].detach() - before[id(layer)]).abs()
        moved = change[change > 0]
        # a fresh AdamW's first step moves every entry with a gradient by lr·|g|/(|g| + eps): lr, except where
        # |g| is within a few eps of 0 (an Adam that had counted the 2 warm-up steps would move by 0.51·lr)
        assert moved.numel() and moved.max() <= lr * (1 + 1e-6)
        assert (moved > 0.99 * lr).float().mean() > 0.95


def test_default_config_in_a_plain_loop_fails_with_the_fix():
    model = get_peft_model(tiny_llama(), SmtConfig(block_size=24, num_blocks=5))
    model.train()
    with pytest.raises(RuntimeError, match=r"calibrate\(model, batches\).*SparsePeftCallback.*begin_step"):
        model(INPUT, labels=INPUT)
    with torch.no_grad():  # inference is fine: nothing selected means the base model
        model(INPUT)


def test_calibrated_adapter_saves_and_loads_with_its_exact_storage(tmp_path):
    from peft import PeftModel

    from sparse_peft import calibrate

    model = make(num_blocks=12)
    calibrate(model, [INPUT])
    run(model, steps=2)
    counts = model.peft_config["default"].block_counts
    assert sum(counts.values()) == 12 and len(set(counts.values())) > 1
    expected = model(INPUT).logits.detach()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.allclose(loaded(INPUT).logits, expected, atol=1e-6)
    sizes = [l.blocks["default"].shape[0] for l in smt_layers(loaded)]
    assert sizes == [counts[l.module_name] for l in smt_layers(model)]
