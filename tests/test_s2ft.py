"""S²FT on a tiny grouped-query Llama: whole heads and channels, slice autograd, calibration, PEFT contract."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import INPUT, tiny_llama
from peft import PeftModel, get_peft_model

from sparse_peft import S2ftConfig, S2FTLinear, calibrate_s2ft
from sparse_peft.sparse.slices import col_slice_matmul, row_slice_matmul

HEAD_DIM, GROUP = 16, 2  # tiny_llama: hidden 64, 4 query heads, 2 KV heads


def s2ft_layers(model):
    return [m for m in model.modules() if isinstance(m, S2FTLinear)]


def by_role(model, role):
    return [l for l in s2ft_layers(model) if l.specs["default"].role == role]


def make(**kw):
    config = dict(v_ratio=0.5, o_ratio=0.5, up_ratio=0.05, down_ratio=0.05, seed=3)
    config.update(kw)
    return get_peft_model(tiny_llama(), S2ftConfig(**config))


def train(model, steps=3, lr=1e-2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        model(INPUT, labels=INPUT).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return optimizer


def units(index: torch.Tensor, width: int) -> list[int]:
    """The unit ids of a sorted index buffer, checking that it holds whole units."""
    blocks = index.long().view(-1, width)
    assert torch.equal(blocks - blocks[:, :1], torch.arange(width).expand_as(blocks))
    assert torch.equal(blocks[:, 0] % width, torch.zeros(blocks.shape[0], dtype=torch.long))
    return (blocks[:, 0] // width).tolist()


def test_gqa_o_units_are_single_query_heads_by_default():
    """On a GQA model (4 query heads, 2 KV heads) O can train one query head: a quarter of W_o's columns."""
    model = make(o_ratio=0.25)
    for layer in by_role(model, "o"):
        spec = layer.specs["default"]
        assert (spec.unit, spec.n_units, spec.count) == (HEAD_DIM, 4, 1)
        assert layer.delta["default"].shape == (64, HEAD_DIM)
        (head,) = units(layer.index["default"], HEAD_DIM)
        assert 0 <= head < 4
    train(model, steps=3)
    assert all(layer.delta["default"].abs().sum() > 0 for layer in by_role(model, "o"))


def test_gqa_units_are_kv_heads_and_kv_groups():
    model = make(o_unit="kv_group")
    for layer in by_role(model, "v"):
        spec = layer.specs["default"]
        assert (spec.unit, spec.n_units, spec.count) == (HEAD_DIM, 2, 1)
        assert layer.delta["default"].shape == (HEAD_DIM, 64)
        assert len(units(layer.index["default"], HEAD_DIM)) == 1
    for layer in by_role(model, "o"):
        spec = layer.specs["default"]
        assert (spec.unit, spec.n_units, spec.count) == (GROUP * HEAD_DIM, 2, 1)
        assert layer.delta["default"].shape == (64, GROUP * HEAD_DIM)
        (group,) = units(layer.index["default"], GROUP * HEAD_DIM)
        # O columns of KV group h are the query heads h·GROUP .. h·GROUP+GROUP-1, which read KV head h (repeat_kv)
        query_heads = sorted({c // HEAD_DIM for c in layer.index["default"].tolist()})
        assert query_heads == [group * GROUP + i for i in range(GROUP)]
        assert {q // GROUP for q in query_heads} == {group}
    for layer in by_role(model, "up") + by_role(model, "down"):
        assert layer.specs["default"].count == round(0.05 * 128)


def test_selection_is_seeded_and_varies_by_layer():
    a, b, c = make(), make(), make(seed=4)
    idx = lambda m: [l.index["default"].tolist() for l in s2ft_layers(m)]  # noqa: E731
    assert idx(a) == idx(b) and idx(a) != idx(c)
    ups = [l.index["default"].tolist() for l in by_role(a, "up")]
    assert ups[0] != ups[1]


def test_identity_at_init_and_only_slices_train():
    model = make()
    assert torch.allclose(model(INPUT).logits, tiny_llama()(INPUT).logits)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 8 and all("sparse_peft_s2ft_delta" in n for n in trainable)
    names = {l.module_name.split(".")[-1] for l in s2ft_layers(model)}
    assert names == {"v_proj", "o_proj", "up_proj", "down_proj"}  # q, k, gate are never trained
    train(model)
    for layer in s2ft_layers(model):
        w0 = layer.get_base_layer().weight.detach().clone()
        layer.merge()
        changed = layer.get_base_layer().weight != w0
        index = layer.index["default"].long()
        if layer.specs["default"].axis == "rows":
            assert changed.any(dim=1).nonzero().flatten().tolist() == index.tolist()
        else:
            assert changed.any(dim=0).nonzero().flatten().tolist() == index.tolist()
        layer.unmerge()
        assert torch.equal(layer.get_base_layer().weight, w0)


def test_slice_gradient_equals_dense_gradient_restricted():
    model = make()
    model.train()
    model(INPUT, labels=INPUT).loss.backward()
    reference = tiny_llama()
    for p in reference.parameters():
        p.requires_grad_(True)
    reference.train()
    reference(INPUT, labels=INPUT).loss.backward()
    dense = dict(reference.named_parameters())
    for layer in s2ft_layers(model):
        grad = dense[layer.module_name + ".weight"].grad
        index = layer.index["default"].long()
        expected = grad[index] if layer.specs["default"].axis == "rows" else grad[:, index]
        assert torch.allclose(layer.delta["default"].grad, expected, atol=1e-6)


def test_slice_autograd_saves_only_the_needed_input():
    x = torch.randn(10, 48, requires_grad=True)
    cols = torch.tensor([3, 7, 8, 40])
    delta = torch.randn(64, 4, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = col_slice_matmul(x, delta, cols)
    y.sum().backward()
    assert sorted(t.numel() for t in saved if t is not delta) == [10 * 4]  # x[..., C] only
    assert max(t.numel() for t in saved) < 64 * 48
    assert torch.allclose(x.grad[:, [0, 1, 2]], torch.zeros(10, 3))
    saved.clear()
    rows_delta = torch.randn(5, 48, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = row_slice_matmul(x, rows_delta)
    y.sum().backward()
    assert max(t.numel() for t in saved) < 64 * 48


def test_layer_forward_saves_nothing_dense():
    model = make()
    layer = by_role(model, "o")[0]
    x = torch.randn(3, 8, 64, requires_grad=True)
    frozen = {
        layer.get_base_layer().weight.untyped_storage().data_ptr(),
        layer.delta["default"].untyped_storage().data_ptr(),
    }
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    y.sum().backward()
    ours = [t for t in saved if t.untyped_storage().data_ptr() not in frozen]
    assert ours and max(t.numel() for t in ours) < 64 * 64


def test_weight_selection_takes_largest_norm_units():
    model = make(selection="weight")
    for layer in by_role(model, "up"):
        norms = layer.get_base_layer().weight.detach().norm(dim=1)
        expected = torch.topk(norms, layer.specs["default"].count).indices.sort().values
        assert layer.index["default"].long().tolist() == expected.tolist()
    smallest = make(selection="weight", select_largest=False)
    for layer in by_role(smallest, "down"):
        norms = layer.get_base_layer().weight.detach().norm(dim=0)
        expected = torch.topk(-norms, layer.specs["default"].count).indices.sort().values
        assert layer.index["default"].long().tolist() == expected.tolist()


def test_gradient_calibration_matches_brute_force():
    model = make(selection="gradient")
    assert calibrate_s2ft(model, [INPUT]) == 8
    assert all(p.grad is None for p in model.parameters())
    reference = tiny_llama()
    for p in reference.parameters():
        p.requires_grad_(True)
    reference(INPUT, labels=INPUT).loss.backward()
    dense = dict(reference.named_parameters())
    for layer in by_role(model, "down") + by_role(model, "v"):
        spec = layer.specs["default"]
        grad = dense[layer.module_name + ".weight"].grad
        if spec.axis == "rows":
            norms = grad.view(spec.n_units, spec.unit, -1).square().sum(dim=(1, 2))
        else:
            norms = grad.square().sum(dim=0).view(spec.n_units, spec.unit).sum(dim=1)
        expected = torch.topk(norms, spec.count).indices.sort().values
        assert units(layer.index["default"], spec.unit) == expected.tolist()


def test_activation_calibration_and_uncalibrated_warning():
    model = make(selection="activation")
    with pytest.warns(UserWarning, match=r"sparse_peft.calibrate\(model, batches\)"):
        model.train()
        model(INPUT, labels=INPUT)
    model = make(selection="activation")
    calibrate_s2ft(model, [INPUT])
    hidden = {}
    reference = tiny_llama()
    hooks = [
        m.register_forward_hook(lambda mod, args, out, n=n: hidden.__setitem__(n, args[0]))
        for n, m in reference.named_modules()
        if n.endswith("down_proj")
    ]
    reference(INPUT)
    for h in hooks:
        h.remove()
    for layer in by_role(model, "down"):
        norms = hidden[layer.module_name].reshape(-1, 128).norm(dim=0)
        expected = torch.topk(norms, layer.specs["default"].count).indices.sort().values
        assert layer.index["default"].long().tolist() == expected.tolist()


def test_save_reload_merge_round_trip(base_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), S2ftConfig(v_ratio=0.5, o_ratio=0.5, seed=7))
    train(model)
    expected = model(INPUT).logits.detach()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path)
    assert torch.allclose(loaded(INPUT).logits, expected, atol=1e-6)
    for a, b in zip(s2ft_layers(model), s2ft_layers(loaded), strict=True):
        assert torch.equal(a.index["default"], b.index["default"])
    merged = copy.deepcopy(loaded).merge_and_unload()
    assert not any(isinstance(m, S2FTLinear) for m in merged.modules())
    assert torch.allclose(merged(INPUT).logits, expected, atol=1e-5)
    with loaded.disable_adapter():
        base = loaded(INPUT).logits
    assert torch.allclose(base, AutoModelForCausalLM.from_pretrained(base_dir)(INPUT).logits, atol=1e-6)


def test_switching_adapters_and_merged_pair_unmerges_exactly():
    model = make(init_weights=False)
    out_default = model(INPUT).logits.detach()
    model.add_adapter("other", S2ftConfig(v_ratio=0.5, o_ratio=0.5, init_weights=False, seed=9))
    layer = by_role(model, "o")[0]
    assert not layer.delta["other"].requires_grad
    model.set_adapter("other")
    assert layer.delta["other"].requires_grad and not layer.delta["default"].requires_grad
    assert not torch.allclose(model(INPUT).logits, out_default)
    bases = [l.get_base_layer().weight.detach().clone() for l in s2ft_layers(model)]
    model.base_model.set_adapter(["default", "other"])
    both = model(INPUT).logits.detach()
    model.merge_adapter(["default", "other"])
    assert torch.allclose(model(INPUT).logits, both, atol=1e-5)
    model.unmerge_adapter()
    for l, base in zip(s2ft_layers(model), bases, strict=True):
        assert torch.equal(l.get_base_layer().weight, base)
    model.set_adapter("default")
    model.delete_adapter("other")
    assert "other" not in layer.delta and "other" not in layer.index
    assert torch.allclose(model(INPUT).logits, out_default)


def test_quantized_4bit_base_trains(base_dir):
    from conftest import quantized_base

    model = get_peft_model(quantized_base(base_dir, 4), S2ftConfig(v_ratio=0.5, o_ratio=0.5, selection="weight"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    model.train()
    for _ in range(3):
        loss = model(INPUT, labels=INPUT).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"v_ratio": 0.0}, r"S2ftConfig.v_ratio must be in \(0, 1\]"),
        ({"down_ratio": 2.0}, r"S2ftConfig.down_ratio must be in \(0, 1\]"),
        ({"selection": "fisher"}, "S2ftConfig.selection"),
        ({"module_roles": {"v_proj": "value"}}, "unknown roles"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        S2ftConfig(**kwargs)


def test_module_without_role_or_wrong_shape_is_named():
    with pytest.raises(ValueError, match="no role for 'model.layers.0.self_attn.q_proj'"):
        get_peft_model(tiny_llama(), S2ftConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="does not match role 'v'"):
        get_peft_model(tiny_llama(), S2ftConfig(target_modules=["q_proj"], module_roles={"q_proj": "v"}))
