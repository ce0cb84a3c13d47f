"""Sparse adapter arithmetic (sparse_peft.arithmetic): weighted sums, soups, TIES, DARE, storage and the errors."""

from __future__ import annotations

import pytest
import torch
from conftest import INPUT, tiny_llama
from conftest import train_steps as plain_steps
from method_configs import tiny_config
from peft import LoraConfig, PeftModel, get_peft_model
from test_all_methods import train_steps

from sparse_peft import (
    LiftConfig,
    SparseDelta,
    adapter_deltas,
    add_sparse_soup,
    add_weighted_sparse_adapter,
    combine_deltas,
)
from sparse_peft.arithmetic import dare_drop, dare_merge, elect_sign, ties_merge, trim, weighted_sum
from sparse_peft.tuners.sparse_delta import SparseDeltaLinear

# ---- helpers --------------------------------------------------------------------------------------------------------


def entry_layers(model) -> list[SparseDeltaLinear]:
    return [m for m in model.modules() if isinstance(m, SparseDeltaLinear)]


def two_adapters(method: str, **task_overrides) -> PeftModel:
    """Adapters "lang" and "task" of ``method`` on one tiny base, each trained 4 steps with its schedule (LIFT
    refreshes its mask, so its adapters have frozen entries too; diff pruning projects at step 2)."""
    model = get_peft_model(tiny_llama(), tiny_config(method), adapter_name="lang")
    train_steps(model, steps=4)
    model.add_adapter("task", tiny_config(method, **task_overrides))
    model.set_adapter("task")
    train_steps(model, steps=4, lr=2e-2)
    return model.eval()


def merged_weight(layer: SparseDeltaLinear, adapter: str) -> torch.Tensor:
    layer.merge(adapter_names=[adapter])
    weight = layer.get_base_weight().detach().clone()
    layer.unmerge()
    return weight


@pytest.fixture(scope="module")
def lift_pair() -> PeftModel:
    """Two trained LIFT adapters with different masks (filter ranks 4 and 8) that overlap in part."""
    return two_adapters("lift", filter_rank=8)


def d(positions: list[int], values: list[float], shape=(2, 4)) -> SparseDelta:
    return SparseDelta.from_entries(torch.tensor(positions), torch.tensor(values), shape)


def as_dict(delta: SparseDelta) -> dict[int, float]:
    return dict(zip(delta.positions.tolist(), delta.values.tolist(), strict=True))


# ---- weighted sum on the model -------------------------------------------------------------------------------------


def test_weighted_combination_merges_to_the_weighted_sum(lift_pair):
    model, weights = lift_pair, (0.7, 1.3)
    add_weighted_sparse_adapter(model, ["lang", "task"], list(weights), "sum")
    try:
        lang, task, combined = (adapter_deltas(model, name) for name in ("lang", "task", "sum"))
        worst, overlaps = 0.0, 0
        for layer in entry_layers(model):
            name = layer.module_name
            union = torch.unique(torch.cat([lang[name].positions, task[name].positions]))
            assert torch.equal(combined[name].positions, union), name  # the support is the union
            overlaps += int(torch.isin(lang[name].positions, task[name].positions).sum())
            base = layer.get_base_weight().detach().clone()
            expected = base + weights[0] * layer.get_delta_weight("lang") + weights[1] * layer.get_delta_weight("task")
            assert not torch.equal(expected, base), name
            worst = max(worst, float((merged_weight(layer, "sum") - expected).abs().max()))
        print(f"\nmax |W_merged - (W + Σ w_i ΔW_i)| over all layers: {worst:.3e}")
        assert worst < 1e-6
        assert overlaps > 0  # some positions are shared, so values were summed there
    finally:
        model.delete_adapter("sum")


def test_combined_adapter_keeps_k_trainable_slots_and_freezes_the_rest(lift_pair):
    model = lift_pair
    add_weighted_sparse_adapter(model, ["lang", "task"], [1.0, 1.0], "sum")
    try:
        config = model.peft_config["sum"]
        for layer in entry_layers(model):
            k = layer.values["lang"].numel()
            assert layer.values["sum"].numel() == k  # the config's budget
            n_frozen = layer.frozen_values["sum"].numel()
            assert config.frozen_counts[layer.module_name] == n_frozen > 0
            active = layer.values["sum"].detach().abs()
            assert float(active.min()) >= float(layer.frozen_values["sum"].abs().max())  # the k largest train
            assert not torch.isin(layer.frozen_indices["sum"], layer.indices["sum"]).any()
    finally:
        model.delete_adapter("sum")


@pytest.mark.parametrize(
    ("method", "combination", "extra"),
    [
        ("lift", "linear", {}),
        ("spiel", "linear", {}),
        ("diff_pruning", "linear", {}),
        ("lift", "ties", {"density": 0.3}),
        ("lift", "dare_ties", {"drop_rate": 0.5, "seed": 3}),
    ],
)
def test_save_and_load_round_trip(tmp_path, method, combination, extra):
    overrides = {"filter_rank": 8} if method == "lift" else {"seed": 1}
    model = two_adapters(method, **overrides)
    add_weighted_sparse_adapter(model, ["lang", "task"], [0.5, 1.5], "combined", combination, **extra)
    model.set_adapter("combined")
    with torch.no_grad():
        expected = model(INPUT).logits
        with model.disable_adapter():
            base = model(INPUT).logits
    assert not torch.allclose(expected, base, atol=1e-4)
    model.save_pretrained(tmp_path, selected_adapters=["combined"])
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "combined").eval()
    with torch.no_grad():
        logits = loaded(INPUT).logits
    print(f"\n{method}/{combination}: max |Δlogit| after reload {float((logits - expected).abs().max()):.2e}")
    assert torch.allclose(logits, expected, atol=1e-6)
    saved, reloaded = adapter_deltas(model, "combined"), adapter_deltas(loaded, "default")
    for name, delta in saved.items():
        assert torch.equal(delta.positions, reloaded[name].positions), name
        assert torch.equal(delta.values, reloaded[name].values), name


def test_dare_on_the_model_is_seeded(lift_pair):
    model = lift_pair
    kwargs = {"combination_type": "dare_linear", "drop_rate": 0.5}
    try:
        add_weighted_sparse_adapter(model, ["lang", "task"], [1.0, 1.0], "s0", seed=0, **kwargs)
        add_weighted_sparse_adapter(model, ["lang", "task"], [1.0, 1.0], "s0_again", seed=0, **kwargs)
        add_weighted_sparse_adapter(model, ["lang", "task"], [1.0, 1.0], "s1", seed=1, **kwargs)
        a, again, other = (adapter_deltas(model, n) for n in ("s0", "s0_again", "s1"))
        assert all(torch.equal(a[n].positions, again[n].positions) for n in a)
        assert any(not torch.equal(a[n].positions, other[n].positions) for n in a)
    finally:
        for name in ("s0", "s0_again", "s1"):
            if name in model.peft_config:
                model.delete_adapter(name)


# ---- soups -----------------------------------------------------------------------------------------------------------


def test_soup_of_adapters_with_one_mask_is_their_mean():
    config = lambda: LiftConfig(r=2, filter_rank=4, update_interval=None)  # noqa: E731
    model = get_peft_model(tiny_llama(), config(), adapter_name="run1")
    plain_steps(model, steps=3, lr=1e-2)
    model.add_adapter("run2", config())
    model.set_adapter("run2")
    plain_steps(model, steps=3, lr=3e-2)
    add_sparse_soup(model, ["run1", "run2"], "soup")
    run1, run2, soup = (adapter_deltas(model, n) for n in ("run1", "run2", "soup"))
    for layer in entry_layers(model):
        name = layer.module_name
        assert torch.equal(run1[name].positions, run2[name].positions)  # one mask (no refresh)
        assert not torch.equal(run1[name].values, run2[name].values)
        assert torch.equal(soup[name].positions, run1[name].positions)
        assert torch.allclose(soup[name].values, (run1[name].values + run2[name].values) / 2, atol=1e-7)
        assert layer.frozen_values["soup"].numel() == 0  # the soup fits the budget


def test_soup_refuses_different_masks_unless_union(lift_pair):
    model = lift_pair
    with pytest.raises(ValueError, match=r"layer model\.layers\.0\.self_attn\.q_proj: the masks differ.*union=True"):
        add_sparse_soup(model, ["lang", "task"], "soup")
    assert "soup" not in model.peft_config
    add_sparse_soup(model, ["lang", "task"], "soup", union=True)
    try:
        for layer in entry_layers(model):
            expected = (layer.get_delta_weight("lang") + layer.get_delta_weight("task")) / 2
            assert torch.allclose(layer.get_delta_weight("soup"), expected, atol=1e-7), layer.module_name
    finally:
        model.delete_adapter("soup")


# ---- TIES and DARE, by hand ------------------------------------------------------------------------------------------


def test_trim_keeps_the_largest_and_breaks_ties_by_position():
    assert as_dict(trim(d([3, 5, 7], [1.0, -1.0, 2.0]), density=0.67)) == {3: 1.0, 7: 2.0}
    assert as_dict(trim(d([3, 5, 7], [1.0, -1.0, 2.0]), density=0.1)) == {7: 2.0}  # at least one entry


def test_ties_by_hand():
    a = d([0, 1, 2, 5, 6], [4.0, -2.0, 1.0, 3.0, 0.5])
    b = d([0, 2, 3, 5, 6], [2.0, -3.0, 1.0, -5.0, 0.1])
    # trim to 3 of 5 entries: a keeps {0: 4, 5: 3, 1: -2}, b keeps {5: -5, 2: -3, 0: 2}
    # position 5: 3 - 5 = -2 elects "-", so only b's -5 counts; position 0: both "+", mean (4 + 2) / 2 = 3
    assert as_dict(ties_merge([a, b], [1.0, 1.0], density=0.6)) == {0: 3.0, 1: -2.0, 2: -3.0, 5: -5.0}
    # b weighted 0.5: b's entries are {5: -2.5, 2: -1.5, 0: 1}; position 5: 3 - 2.5 > 0 elects a's 3
    assert as_dict(ties_merge([a, b], [1.0, 0.5], density=0.6)) == {0: 2.5, 1: -2.0, 2: -1.5, 5: 3.0}


def test_ties_sign_election_by_mass_or_by_count():
    parts = [d([1], [5.0]), d([1], [-1.0]), d([1], [-1.0])]
    assert as_dict(ties_merge(parts, [1.0, 1.0, 1.0])) == {1: 5.0}  # "total": 5 - 2 > 0
    assert as_dict(ties_merge(parts, [1.0, 1.0, 1.0], majority_sign_method="frequency")) == {1: -1.0}
    assert torch.equal(elect_sign(torch.tensor([[1.0, -3.0], [1.0, 1.0], [-4.0, 1.0]])), torch.tensor([-1.0, -1.0]))


def test_dare_drops_with_rate_p_and_rescales_by_one_over_one_minus_p():
    delta = d(list(range(10)), [float(i + 1) for i in range(10)], shape=(2, 5))
    dropped = dare_drop(delta, 0.5, torch.Generator().manual_seed(3))
    keep = torch.rand(10, generator=torch.Generator().manual_seed(3)) >= 0.5  # the documented draw
    assert 0 < int(keep.sum()) < 10
    assert torch.equal(dropped.positions, delta.positions[keep])
    assert torch.equal(dropped.values, delta.values[keep] * 2.0)
    assert as_dict(dare_drop(delta, 0.0, torch.Generator().manual_seed(3))) == as_dict(delta)
    big = SparseDelta.from_entries(torch.arange(20000), torch.ones(20000), (100, 200))
    kept = dare_drop(big, 0.3, torch.Generator().manual_seed(0))
    assert abs(kept.nnz / big.nnz - 0.7) < 0.02
    assert abs(float(kept.values.sum()) / big.nnz - 1.0) < 0.03  # E[ΔW] is unchanged


def test_dare_linear_is_the_weighted_sum_of_the_dropped_deltas():
    a, b = d([0, 1, 2, 3], [1.0, 2.0, 3.0, 4.0]), d([2, 3, 4, 5], [1.0, 1.0, 1.0, 1.0])
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6)]  # noqa: E731
    merged = dare_merge([a, b], [1.0, -2.0], 0.5, gens())
    g = gens()
    expected = weighted_sum([dare_drop(a, 0.5, g[0]), dare_drop(b, 0.5, g[1])], [1.0, -2.0])
    assert as_dict(merged) == as_dict(expected)


def test_weighted_sum_by_hand():
    merged = weighted_sum([d([0, 2], [1.0, 2.0]), d([2, 7], [-1.0, 4.0])], [2.0, 3.0])
    assert as_dict(merged) == {0: 2.0, 2: 1.0, 7: 12.0}
    assert torch.equal(merged.to_dense(), 2.0 * d([0, 2], [1.0, 2.0]).to_dense() + 3.0 * d([2, 7], [-1, 4]).to_dense())


def test_from_entries_coalesces_repeated_positions():
    assert as_dict(d([4, 1, 4], [1.0, 2.0, 0.5])) == {1: 2.0, 4: 1.5}


# ---- errors ----------------------------------------------------------------------------------------------------------


def test_unsupported_methods_are_named():
    rosa = get_peft_model(tiny_llama(), tiny_config("rosa"), adapter_name="lang")
    rosa.add_adapter("task", tiny_config("rosa"))
    with pytest.raises(ValueError, match=r"SPARSE_PEFT_ROSA adapter \(method 'rosa'\).*LIFT, SpIEL, diff pruning"):
        add_weighted_sparse_adapter(rosa, ["lang", "task"], [1.0, 1.0], "sum")
    lora = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="lang")
    with pytest.raises(ValueError, match=r"LORA adapter.*add_weighted_adapter"):
        add_weighted_sparse_adapter(lora, ["lang"], [1.0], "sum")


def test_diff_pruning_before_its_projection_names_the_layer():
    model = get_peft_model(tiny_llama(), tiny_config("diff_pruning"), adapter_name="lang")
    with pytest.raises(ValueError, match=r"layer model\.layers\.0\.self_attn\.q_proj: .*projection"):
        add_weighted_sparse_adapter(model, ["lang"], [1.0], "sum")


def test_adapters_on_different_layers_name_the_layer(lift_pair):
    model = lift_pair
    model.add_adapter("qv", LiftConfig(r=2, filter_rank=4, target_modules=["q_proj", "v_proj"]))
    try:
        with pytest.raises(ValueError, match=r"layer model\.layers\.0\.self_attn\.k_proj: adapter 'lang' adapts it"):
            add_weighted_sparse_adapter(model, ["lang", "qv"], [1.0, 1.0], "sum")
    finally:
        model.delete_adapter("qv")
    assert "sum" not in model.peft_config


def test_adapters_of_different_shapes_name_the_layer_and_the_shapes(lift_pair):
    small = get_peft_model(tiny_llama(hidden_size=32, intermediate_size=64), LiftConfig(r=1, filter_rank=2))
    deltas = {"lang": adapter_deltas(lift_pair, "lang"), "small": adapter_deltas(small, "default")}
    with pytest.raises(ValueError, match=r"layer model\.layers\.0\.self_attn\.q_proj: .*\(64, 64\).*\(32, 32\)"):
        combine_deltas(deltas, [1.0, 1.0])


def test_adapters_of_different_base_models_are_refused(lift_pair):
    model = lift_pair
    model.peft_config["lang"].base_model_name_or_path = "org/base-a"
    model.peft_config["task"].base_model_name_or_path = "org/base-b"
    try:
        with pytest.raises(ValueError, match=r"different base models.*org/base-a.*org/base-b"):
            add_weighted_sparse_adapter(model, ["lang", "task"], [1.0, 1.0], "sum")
    finally:
        model.peft_config["lang"].base_model_name_or_path = None
        model.peft_config["task"].base_model_name_or_path = None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": [1.0]}, "1 weights for 2 adapters"),
        ({"weights": [1.0, float("nan")]}, "weights must be finite"),
        ({"combination_type": "svd"}, "combination_type must be one of"),
        ({"combination_type": "ties"}, "needs density"),
        ({"combination_type": "dare_linear"}, "needs drop_rate"),
        ({"combination_type": "dare_linear", "drop_rate": 1.0}, r"drop_rate must be in \[0, 1\)"),
        ({"adapter_name": "lang"}, "already has an adapter named 'lang'"),
        ({"adapters": ["lang", "nope"]}, "no adapter 'nope'"),
    ],
)
def test_bad_arguments(lift_pair, kwargs, message):
    args = {"adapters": ["lang", "task"], "weights": [1.0, 1.0], "adapter_name": "sum", **kwargs}
    with pytest.raises(ValueError, match=message):
        add_weighted_sparse_adapter(lift_pair, **args)
    assert "sum" not in lift_pair.peft_config
