"""sparse_peft.prune: magnitude and Wanda pruning hit the requested sparsity and N:M pattern exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import INPUT, tiny_llama
from peft import get_peft_model

from sparse_peft import LorsConfig, PruneSpec, magnitude_prune, measure_sparsity, parse_prune_spec, wanda_prune
from sparse_peft.cli import build_parser
from sparse_peft.prune import nm_holds, prune_mask, target_linears

BATCHES = [{"input_ids": INPUT}, {"input_ids": INPUT[:, :5]}]


def linears(model):
    return dict(target_linears(model))


def test_default_targets_are_all_linear_but_lm_head():
    names = list(linears(tiny_llama()))
    assert len(names) == 14 and not any("lm_head" in n for n in names)
    assert list(target_linears(tiny_llama(), ["q_proj"])) and len(list(target_linears(tiny_llama(), ["q_proj"]))) == 2


@pytest.mark.parametrize("scope", ["row", "layer"])
def test_unstructured_magnitude_hits_the_sparsity_exactly_and_zeroes_the_smallest(scope):
    model = tiny_llama()
    dense = {n: m.weight.detach().clone() for n, m in linears(model).items()}
    lm_head = model.lm_head.weight.detach().clone()
    report = magnitude_prune(model, sparsity=0.3, scope=scope)
    assert torch.equal(model.lm_head.weight, lm_head)
    for name, module in linears(model).items():
        w, w0 = module.weight.detach(), dense[name]
        zero = w == 0
        if scope == "row":
            assert (zero.sum(1) == int(0.3 * w.shape[1])).all()
            kept_min = w0.abs().masked_fill(zero, float("inf")).min(1).values
            assert (w0.abs().masked_fill(~zero, 0).max(1).values <= kept_min).all()
        else:
            assert int(zero.sum()) == int(0.3 * w.numel())
            assert w0.abs()[zero].max() <= w0.abs()[~zero].min()
        assert torch.equal(w[~zero], w0[~zero])
        assert report.layers[name].zeros == int(zero.sum())
    assert report.sparsity == pytest.approx(measure_sparsity(model).sparsity)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_n_m_pattern_holds_exactly(method, n, m):
    model = tiny_llama()
    if method == "wanda":
        report = wanda_prune(model, BATCHES, n_m=(n, m))
    else:
        report = magnitude_prune(model, n_m=(n, m))
    assert report.nm_holds and report.sparsity == pytest.approx(1 - n / m)
    for module in linears(model).values():
        groups = (module.weight != 0).reshape(module.weight.shape[0], -1, m).sum(-1)
        assert (groups == n).all()


def _input_squares(model, wanted) -> dict:
    squares, handles = {}, []

    def hook_for(name):
        def hook(_module, args, _output):
            x = args[0].reshape(-1, args[0].shape[-1])
            squares[name] = squares.get(name, 0) + x.square().sum(0)

        return hook

    for name, module in linears(model).items():
        if wanted(name):
            handles.append(module.register_forward_hook(hook_for(name)))
    with torch.no_grad():
        for batch in BATCHES:
            model(**batch)
    for handle in handles:
        handle.remove()
    return squares


def test_wanda_scores_weight_times_input_norm_block_by_block():
    model = tiny_llama()
    dense = copy.deepcopy(model)
    wanda_prune(model, BATCHES, sparsity=0.5)
    # brute force: norms of each block's inputs in a model whose earlier blocks are pruned and later ones dense
    for block in range(2):
        reference = copy.deepcopy(dense)
        for name, module in linears(reference).items():
            if int(name.split(".")[2]) < block:
                module.weight.data = linears(model)[name].weight.detach().clone()
        squares = _input_squares(reference, lambda name, block=block: int(name.split(".")[2]) == block)
        for name, sq in squares.items():
            score = linears(dense)[name].weight.abs() * sq.sqrt()
            expected = prune_mask(score, PruneSpec("wanda", 0.5))
            assert torch.equal(linears(model)[name].weight == 0, expected), name


def test_wanda_differs_from_magnitude():
    a, b = tiny_llama(), tiny_llama()
    wanda_prune(a, BATCHES, sparsity=0.5)
    magnitude_prune(b, sparsity=0.5)
    assert any(
        not torch.equal(x.weight == 0, y.weight == 0)
        for x, y in zip(linears(a).values(), linears(b).values(), strict=True)
    )


def test_measure_sparsity_reads_peft_models_with_the_plain_names():
    model = tiny_llama()
    magnitude_prune(model, n_m=(2, 4))
    before = measure_sparsity(model, n_m=(2, 4))
    wrapped = get_peft_model(model, LorsConfig(r=2))
    after = measure_sparsity(wrapped, n_m=(2, 4))
    assert after.layers.keys() == before.layers.keys() and after.sparsity == before.sparsity == 0.5
    assert after.nm_holds and after.to_dict(per_layer=False)["nm_holds"] is True
    assert not nm_holds(torch.ones(2, 8), 2, 4) and "2:4 holds" in str(after)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("wanda:0.5", PruneSpec("wanda", 0.5)),
        ("magnitude:0.5", PruneSpec("magnitude", 0.5)),
        ("2:4", PruneSpec("wanda", None, 2, 4)),
        ("wanda:2:4", PruneSpec("wanda", None, 2, 4)),
        ("Magnitude:4:8", PruneSpec("magnitude", None, 4, 8)),
        ("0.7", PruneSpec("wanda", 0.7)),
    ],
)
def test_parse_prune_spec(text, expected):
    assert parse_prune_spec(text) == expected
    assert parse_prune_spec(str(expected)) == expected


@pytest.mark.parametrize("text", ["sparsegpt:0.5", "wanda:1.5", "4:2", "wanda:2:4:8", "half", "2:0"])
def test_bad_prune_specs_raise(text):
    with pytest.raises(ValueError):
        parse_prune_spec(text)


def test_cli_prune_option_is_parsed():
    args = build_parser().parse_args(["train", "--method", "lors", "--prune", "2:4"])
    assert args.prune == PruneSpec("wanda", None, 2, 4)
    args = build_parser().parse_args(["train", "--method", "spp", "--prune", "magnitude:0.5"])
    assert args.prune == PruneSpec("magnitude", 0.5)
    assert build_parser().parse_args(["train"]).prune is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--prune", "sparsegpt:0.5"])


def test_pruning_errors():
    with pytest.raises(ValueError, match="divisible by 3"):
        prune_mask(torch.ones(4, 8), PruneSpec("magnitude", None, 1, 3))
    with pytest.raises(ValueError, match="calibration batches"):
        wanda_prune(tiny_llama(), [])
    with pytest.raises(ValueError, match="no linear layer"):
        magnitude_prune(tiny_llama(), target_modules=["nothing"])
    bnb = pytest.importorskip("bitsandbytes")
    quantized = torch.nn.Sequential(bnb.nn.Linear4bit(8, 8, quant_type="nf4").to("cpu"))
    with pytest.raises(TypeError, match="prune the float model first"):
        magnitude_prune(quantized)
