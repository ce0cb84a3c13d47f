"""SpIEL and the shared regrowth machinery: windows, drop-and-grow, optimizer-slot surgery, SM3."""

from __future__ import annotations

import pytest
import torch
from conftest import INPUT, tiny_llama
from peft import get_peft_model

from sparse_peft import (
    ScheduleContext,
    SparseSM3,
    SpielConfig,
    SpielLinear,
    before_optimizer_step,
    begin_step,
    refresh_masks,
)
from sparse_peft.sparse.regrow import plan_drop_and_grow
from sparse_peft.sparse.select import topk_per_row, topk_row_balanced


def spiel_layers(model):
    return [m for m in model.modules() if isinstance(m, SpielLinear)]


def run(model, optimizer, steps, total=0, start=1):
    context = ScheduleContext(total_steps=total)
    moved = []
    model.train()
    for step in range(start, start + steps):
        begin_step(model, step, context)
        model(INPUT, labels=INPUT).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        moved.append(refresh_masks(model, step, optimizer, context))
    return moved


def make(**kw):
    config = dict(density=0.1, reselection_steps=4, window_steps=2, initial_reselection_rate=0.5)
    config.update(kw)
    model = get_peft_model(tiny_llama(), SpielConfig(**config))
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def test_budget_and_random_initial_mask():
    model, _ = make()
    for layer in spiel_layers(model):
        idx = layer.indices["default"]
        assert idx.numel() == round(0.1 * layer.in_features * layer.out_features)
        assert idx.unique().numel() == idx.numel()
    model, _ = make(r=2, density=None)
    layer = spiel_layers(model)[0]
    assert layer.values["default"].numel() == 2 * (layer.in_features + layer.out_features)


def test_first_selection_is_brute_force_top_k_of_accumulated_gradient():
    """With S = 1 the candidates and scores come from one step's gradient: the new mask is its top-k."""
    model, optimizer = make(window_steps=1)
    layer = spiel_layers(model)[0]
    # dense reference gradient of this layer's weight on the same batch
    captured = {}
    base = layer.get_base_layer()
    base.weight.requires_grad_(True)
    model.train()
    begin_step(model, 1, ScheduleContext())
    model(INPUT, labels=INPUT).loss.backward()
    captured["g"] = base.weight.grad.detach().clone()
    base.weight.requires_grad_(False)
    base.weight.grad = None
    optimizer.step()
    optimizer.zero_grad()
    moved = refresh_masks(model, 1, optimizer, ScheduleContext())
    assert moved > 0
    k = layer.indices["default"].numel()
    brute = torch.topk(captured["g"].abs().reshape(-1), k)
    kth = brute.values[-1]
    chosen = set(layer.indices["default"].tolist())
    differ = chosen ^ set(brute.indices.tolist())
    assert all(abs(captured["g"].abs().reshape(-1)[i] - kth) < 1e-6 for i in differ)


def test_input_normalized_growth_is_brute_force_top_k_of_gradient_over_feature_norm():
    """growth_score='input_normalized', S = 1: the new mask is the top-k of |G_ij| / ‖x_j‖ of one step."""
    model, optimizer = make(window_steps=1, growth_score="input_normalized")
    layer = spiel_layers(model)[0]
    base = layer.get_base_layer()
    base.weight.requires_grad_(True)
    inputs = []
    hook = layer.register_forward_hook(lambda module, args, out: inputs.append(args[0].detach().clone()))
    model.train()
    begin_step(model, 1, ScheduleContext())
    model(INPUT, labels=INPUT).loss.backward()
    hook.remove()
    x = inputs[0].reshape(-1, layer.in_features)
    score = (base.weight.grad.abs() / x.square().sum(0).sqrt()).reshape(-1)
    base.weight.requires_grad_(False)
    base.weight.grad = None
    optimizer.step()
    optimizer.zero_grad()
    assert refresh_masks(model, 1, optimizer, ScheduleContext()) > 0
    k = layer.indices["default"].numel()
    brute = torch.topk(score, k)
    differ = set(layer.indices["default"].tolist()) ^ set(brute.indices.tolist())
    assert all(abs(score[i] - brute.values[-1]) < 1e-6 * brute.values[0] for i in differ)
    gradient_model, _ = make(window_steps=1)  # the plain gradient's criterion picks another set on the same step
    run(gradient_model, torch.optim.AdamW([p for p in gradient_model.parameters() if p.requires_grad]), 1)
    plain = set(spiel_layers(gradient_model)[0].indices["default"].tolist())
    assert plain != set(layer.indices["default"].tolist())


def test_random_growth_is_seeded_and_differs_from_the_gradient_criterion():
    """growth_score='random' (SET's regrowth, a control): the same seed grows the same entries; the gradient
    criterion grows others from the same state."""
    masks = {}
    for label, score in (("a", "random"), ("b", "random"), ("gradient", "gradient")):
        torch.manual_seed(0)
        model, optimizer = make(growth_score=score, initial_selection="random")
        run(model, optimizer, 2, total=100)  # the selection after step S = 2 replaces ζ(2)·k slots
        masks[label] = spiel_layers(model)[0].indices["default"].clone()
    start = spiel_layers(make()[0])[0].indices["default"]
    assert not torch.equal(masks["a"], start)
    assert torch.equal(masks["a"], masks["b"])
    assert not torch.equal(masks["a"], masks["gradient"])


def test_regrowth_moves_the_scheduled_fraction_and_keeps_indices_unique():
    model, optimizer = make()
    layer = spiel_layers(model)[0]
    k = layer.indices["default"].numel()
    before = {}

    moved = run(model, optimizer, 2, total=100)  # first selection after step 2: p = 1
    assert moved[0] == 0 and moved[1] > 0
    before = layer.indices["default"].clone()
    moved = run(model, optimizer, 4, total=100, start=3)  # next selection after step 6
    assert moved[:3] == [0, 0, 0]
    after = layer.indices["default"]
    assert after.unique().numel() == k
    expected = int(k * 0.5 * (1 - 6 / 100))
    changed = int((after != before).sum())
    assert 0 < changed <= expected


def test_zero_grown_moments_leave_grown_slots_without_optimizer_state():
    model, optimizer = make(grown_moments="zero")
    run(model, optimizer, 5, total=100)
    layer = spiel_layers(model)[0]
    old_idx = layer.indices["default"].clone()
    state = optimizer.state[layer.values["default"]]
    run(model, optimizer, 1, total=100, start=6)  # selection after step 6
    moved = (layer.indices["default"] != old_idx).nonzero().flatten()
    assert moved.numel() > 0
    assert torch.all(state["exp_avg"][moved] == 0) and torch.all(state["exp_avg_sq"][moved] == 0)
    assert torch.all(layer.values["default"].detach()[moved] == 0)


def test_random_initial_selection_keeps_the_start_and_replaces_the_scheduled_fraction_at_step_s():
    """initial_selection='random': the seeded random start is the same as 'window''s, and the selection after step S
    replaces ζ(S)·k slots (not all of them); the kept slots keep their trained values."""
    window_model, _ = make()
    model, optimizer = make(initial_selection="random")
    layer = spiel_layers(model)[0]
    start = layer.indices["default"].clone()
    assert torch.equal(start, spiel_layers(window_model)[0].indices["default"])
    k = start.numel()
    run(model, optimizer, 1, total=100)
    trained = layer.values["default"].detach().clone()
    assert run(model, optimizer, 1, total=100, start=2)[0] > 0  # selection after step S = 2
    kept = layer.indices["default"] == start
    assert 0 < int((~kept).sum()) <= int(k * 0.5 * (1 - 2 / 100)) < k
    assert torch.all(layer.values["default"].detach()[~kept] == 0)
    assert not torch.equal(layer.values["default"].detach()[kept], trained[kept])  # step 2 trained them further
    assert torch.all(layer.values["default"].detach()[kept] != 0)


def test_moved_slots_are_zeroed_and_reseeded_others_keep_state():
    model, optimizer = make()
    run(model, optimizer, 5, total=100)  # first selection at step 2; window for step 6 opens at step 5
    layer = spiel_layers(model)[0]
    values = layer.values["default"]
    state = optimizer.state[values]
    old_idx, old_val = layer.indices["default"].clone(), values.detach().clone()
    old_m, old_v = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
    window = layer._windows["default"]
    run(model, optimizer, 1, total=100, start=6)
    moved = (layer.indices["default"] != old_idx).nonzero().flatten()
    stayed = (layer.indices["default"] == old_idx).nonzero().flatten()
    assert moved.numel() > 0
    assert torch.all(values.detach()[moved] == 0)
    # reseeded: bias-corrected moments equal the window means m̄ = ΣG / steps
    t = float(state["step"])
    beta1, beta2 = optimizer.param_groups[0]["betas"]
    pos = layer.indices["default"][moved].long()
    where = torch.searchsorted(window.candidates.long(), pos)
    assert torch.allclose(state["exp_avg"][moved] / (1 - beta1**t), window.sum_g[where] / window.steps, atol=1e-6)
    assert torch.allclose(state["exp_avg_sq"][moved] / (1 - beta2**t), window.sum_g2[where] / window.steps, atol=1e-6)
    # slots that stayed went on training normally: their moments are not reset
    assert torch.all(state["exp_avg_sq"][stayed] > 0)
    assert not torch.equal(values.detach()[stayed], old_val[stayed])
    del old_m, old_v


def test_no_selection_after_total_steps():
    model, optimizer = make()
    moved = run(model, optimizer, 10, total=5)
    assert moved[1] > 0 and sum(moved[5:]) == 0


def test_plan_drop_and_grow_rules():
    values = torch.tensor([0.5, 0.0, -0.1, 0.3])
    indices = torch.tensor([10, 11, 12, 13], dtype=torch.int32)
    candidates = torch.tensor([11, 20, 21, 13], dtype=torch.int32)
    scores = torch.tensor([9.0, 5.0, 1.0, 8.0])
    slots, positions = plan_drop_and_grow(values, indices, candidates, scores, 2)
    # drop slots 1 (|0|) and 2 (|0.1|); 13 is active and kept, 11 is outgoing and incoming: stays; 20 grows
    assert slots.tolist() == [2] and positions.tolist() == [20]


def test_plan_drop_and_grow_by_row_grows_within_the_rows_that_dropped():
    """Rows of length 10: row 1 drops two slots and row 2 one; row 1 grows its two best candidates although row 3
    holds better ones, and row 2, with no eligible candidate, keeps its slot."""
    values = torch.tensor([0.0, 0.01, 0.02, 0.9, 0.8])
    indices = torch.tensor([10, 11, 20, 12, 21], dtype=torch.int32)  # rows 1, 1, 2, 1, 2
    candidates = torch.tensor([13, 14, 15, 21, 30, 31], dtype=torch.int32)
    scores = torch.tensor([1.0, 3.0, 2.0, 9.0, 50.0, 60.0])
    slots, positions = plan_drop_and_grow(values, indices, candidates, scores, 3, row_length=10)
    assert slots.tolist() == [0, 1] and sorted(positions.tolist()) == [14, 15]
    matrix_wide = plan_drop_and_grow(values, indices, candidates, scores, 3)  # the paper's: best anywhere
    assert sorted(matrix_wide[1].tolist()) == [14, 30, 31]


def test_topk_per_row_is_brute_force_per_row_top_k_and_seeded_on_ties():
    scores = torch.randn(5, 7)
    chosen = topk_per_row(scores, 3)
    brute = (torch.topk(scores, 3, dim=1).indices + torch.arange(5).unsqueeze(1) * 7).reshape(-1)
    assert chosen.tolist() == sorted(brute.tolist())
    tied = torch.zeros(4, 6)
    assert torch.equal(topk_per_row(tied, 2, seed=1), topk_per_row(tied, 2, seed=1))
    assert not torch.equal(topk_per_row(tied, 2, seed=1), topk_per_row(tied, 2, seed=2))
    with pytest.raises(ValueError, match="per_row"):
        topk_per_row(scores, 8)


def test_topk_row_balanced_takes_exactly_k_spread_over_rows():
    scores = torch.zeros(4, 10)
    scores[0] = torch.arange(10.0) + 100  # row 0 holds every large score
    scores[2, 5] = 50.0  # row 2's best entry; its next best (0) ties with the other rows'
    chosen = topk_row_balanced(scores, 9, seed=0)
    rows = torch.bincount(chosen.long() // 10, minlength=4)
    assert chosen.numel() == 9 and rows.tolist() == [3, 2, 2, 2]  # ⌊9/4⌋ = 2 each, one more to row 0's 107
    assert set(chosen[chosen < 10].tolist()) == {7, 8, 9} and 25 in chosen.tolist()
    brute = torch.randn(7, 11)
    for k in (3, 7, 20, 77):
        chosen = topk_row_balanced(brute, k, seed=1).long()
        counts = torch.bincount(chosen // 11, minlength=7)
        assert chosen.numel() == k and int(counts.max() - counts.min()) <= 1
        for row in range(7):  # each row holds its own best entries
            mine = chosen[chosen // 11 == row] % 11
            assert set(mine.tolist()) == set(brute[row].topk(mine.numel()).indices.tolist())
    with pytest.raises(ValueError, match="k=41"):
        topk_row_balanced(scores, 41)


@pytest.mark.parametrize("score", ["gradient", "input_normalized"])
def test_row_scope_growth_keeps_every_rows_count(score):
    """growth_scope='row': after selections every row holds as many entries as the random start gave it, while the
    mask moved; the matrix-wide growth from the same state changes row counts."""
    counts = {}
    for scope in ("row", "matrix"):
        torch.manual_seed(0)
        model, optimizer = make(growth_scope=scope, growth_score=score, initial_selection="random")
        layer = spiel_layers(model)[0]
        start = layer.indices["default"].clone()
        run(model, optimizer, 6, total=100)  # selections after steps 2 and 6
        after = layer.indices["default"]
        assert after.unique().numel() == after.numel() and not torch.equal(torch.sort(after).values, start)
        counts[scope] = [
            torch.bincount(i.long() // layer.in_features, minlength=layer.out_features) for i in (start, after)
        ]
    assert torch.equal(*counts["row"])
    assert not torch.equal(*counts["matrix"])


def test_sm3_trains_scores_without_dense_gradient_and_regrows():
    model = get_peft_model(
        tiny_llama(),
        SpielConfig(density=0.1, selection_algorithm="sm3", reselection_steps=3, window_steps=1),
    )
    optimizer = SparseSM3(model, lr=1e-2)
    layer = spiel_layers(model)[0]
    observed = []
    original = layer._observe
    layer._observe = lambda *a: observed.append(1) or original(*a)
    before = layer.indices["default"].clone()
    moved = run(model, optimizer, 4, total=100)
    assert moved[0] > 0 and not observed  # no gradient statistics were taken
    assert not torch.equal(before, layer.indices["default"])
    state = optimizer.state[layer.values["default"]]
    assert state["row_acc"].shape == (layer.out_features,) and state["col_acc"].shape == (layer.in_features,)
    assert "exp_avg" not in state


def test_sm3_requires_its_optimizer():
    model, optimizer = make(selection_algorithm="sm3", window_steps=1)
    with pytest.raises(TypeError, match="SparseSM3"):
        run(model, optimizer, 1, total=100)


def test_save_reload_after_regrowth(tmp_path):
    from peft import PeftModel

    model, optimizer = make()
    run(model, optimizer, 6, total=100)
    model.eval()
    expected = model(INPUT).logits.detach()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.allclose(loaded(INPUT).logits, expected, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"density": 0.0}, r"density must be in \(0, 1\]"),
        ({"reselection_steps": 5, "window_steps": 5}, "must be smaller than"),
        ({"selection_algorithm": "magic"}, "selection_algorithm"),
        ({"density": None}, "needs density or r "),
        ({"initial_selection": "magnitude"}, "initial_selection must be one of 'window', 'random', 'calibration'"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpielConfig(**kwargs)


def test_window_statistics_follow_gradient_clipping():
    """Reseeded moments must be on the scale Adam sees: statistics are scaled by the trainer's clip factor."""
    sums = {}
    for clip in (None, 1e-4):
        model, optimizer = make()
        layer = spiel_layers(model)[0]
        context = ScheduleContext()
        model.train()
        begin_step(model, 1, context)
        model(INPUT, labels=INPUT).loss.backward()
        params = [p for p in model.parameters() if p.requires_grad]
        total = torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf"))
        before_optimizer_step(model, context)
        sums[clip] = (layer._windows["default"].sum_g.clone(), float(total))
    (plain, norm), (clipped, _) = sums[None], sums[1e-4]
    assert torch.allclose(clipped, plain * (1e-4 / norm), rtol=1e-3, atol=1e-12)


def test_calibrated_initial_selection_is_top_k_of_summed_gradient():
    """initial_selection='calibration': the pass picks the top-k of |Σ_b G_b| (brute force: the dense weight
    gradient over the same batches), values stay zero, and step S replaces ζ(S)·k slots, not all of them."""
    from sparse_peft import calibrate

    batches = [INPUT, INPUT.flip(1)]
    model, optimizer = make(initial_selection="calibration")
    layer = spiel_layers(model)[0]
    base = layer.get_base_layer()
    base.weight.requires_grad_(True)
    with model.disable_adapter():  # values are zero: the adapter does not change the gradient
        for batch in batches:
            model(batch, labels=batch).loss.backward()
    dense = base.weight.grad.detach().abs().reshape(-1).clone()
    base.weight.requires_grad_(False)
    base.weight.grad = None
    model.zero_grad(set_to_none=True)

    random_start = layer.indices["default"].clone()
    assert calibrate(model, batches)["SpielLinear"] == len(spiel_layers(model))
    k = layer.indices["default"].numel()
    chosen = set(layer.indices["default"].tolist())
    kth = torch.topk(dense, k).values[-1]
    differ = chosen ^ set(torch.topk(dense, k).indices.tolist())
    assert all(abs(dense[i] - kth) < 1e-6 for i in differ)
    assert set(random_start.tolist()) != chosen
    assert torch.equal(layer.indices["default"], layer.indices["default"].sort().values)
    assert not layer.values["default"].any()
    assert calibrate(model, batches) == {}  # done once

    before = layer.indices["default"].clone()
    moved = run(model, optimizer, 2, total=100)  # step S = 2: an ordinary selection, p = 0.5·(1 − 2/100)
    assert moved[0] == 0 and 0 < moved[1]
    changed = int((layer.indices["default"] != before).sum())
    assert 0 < changed <= int(k * 0.5 * (1 - 2 / 100))


def test_uncalibrated_initial_selection_warns_and_falls_back_to_the_window():
    model, optimizer = make(initial_selection="calibration")
    layer = spiel_layers(model)[0]
    before = layer.indices["default"].clone()
    with pytest.warns(UserWarning, match="sparse_peft.calibrate"):
        moved = run(model, optimizer, 2, total=100)
    assert moved[1] > 0
    assert int((layer.indices["default"] != before).sum()) > 0.9 * before.numel()  # p = 1 at step S


def test_loaded_calibrated_adapter_is_not_recalibrated(tmp_path):
    from peft import PeftModel

    from sparse_peft import calibrate

    model, _ = make(initial_selection="calibration")
    calibrate(model, [INPUT])
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    layer = spiel_layers(loaded)[0]
    assert not layer.uncalibrated and "default" in layer.keeps_initial
    assert torch.equal(layer.indices["default"], spiel_layers(model)[0].indices["default"])
    assert calibrate(loaded, [INPUT]) == {}


def test_sft_trainer_callback_calibrates_the_initial_selection(tmp_path):
    import warnings

    from conftest import sft_trainer

    from sparse_peft import SparsePeftCallback

    model, _ = make(initial_selection="calibration")
    before = [layer.indices["default"].clone() for layer in spiel_layers(model)]
    trainer = sft_trainer(model, tmp_path / "out", [SparsePeftCallback(calibration_samples=4)])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*were not calibrated")  # the fallback: no calibration ran
        trainer.train()
    for layer, old in zip(spiel_layers(trainer.model), before, strict=True):
        assert not layer.uncalibrated and "default" in layer.keeps_initial
        assert not torch.equal(layer.indices["default"], old)


def test_window_saved_without_feature_norms_resumes_with_equal_weights():
    """A checkpoint side file written before windows kept Σx_j² loads with every feature weighing the same."""
    from sparse_peft.tuners.spiel.layer import Window

    model, optimizer = make(growth_score="input_normalized")
    run(model, optimizer, 1, total=100)  # inside the first window
    layer = spiel_layers(model)[0]
    tensors = layer.export_state("default")
    assert "x_sq" in tensors and tensors["x_sq"].shape == (layer.in_features,) and bool((tensors["x_sq"] > 0).all())
    old = {key: value for key, value in tensors.items() if key != "x_sq"}
    window = Window.from_tensors(old, layer.shape, layer.indices["default"])
    assert torch.equal(window.x_sq, torch.ones(layer.in_features))
    assert "x_sq" in window.to_tensors()
