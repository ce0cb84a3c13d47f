"""``sparse-peft inspect``: the per-module table and the PNG heatmap; the model card line on saved adapters."""

from __future__ import annotations

from peft import get_peft_model
from transformers import AutoModelForCausalLM

from sparse_peft import LiftConfig
from sparse_peft.cli import main
from sparse_peft.inspector import density_grid, format_table, matrix_mask, read_adapter, write_heatmap


def saved_adapter(base_dir, tmp_path):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LiftConfig(r=2, filter_rank=4))
    out = tmp_path / "adapter"
    model.save_pretrained(out)
    return model, out


def test_table_counts_every_stored_entry(base_dir, tmp_path):
    model, out = saved_adapter(base_dir, tmp_path)
    config, reports = read_adapter(out)
    layers = {name: m for name, m in model.named_modules() if hasattr(m, "values") and hasattr(m, "adapter_configs")}
    assert len(reports) == len(layers)
    for name, layer in layers.items():
        report = reports[name]
        assert report.stored == layer.values["default"].numel()
        assert report.shape == (layer.out_features, layer.in_features)
        assert report.density == report.stored / (layer.out_features * layer.in_features)
        assert report.nbytes == report.stored * 4 + layer.indices["default"].numel() * 4
    table = format_table(config, reports)
    assert "lift" in table and "total" in table


def test_mask_and_heatmap(base_dir, tmp_path):
    model, out = saved_adapter(base_dir, tmp_path)
    config, reports = read_adapter(out)
    report = next(iter(reports.values()))
    mask = matrix_mask(out, report, config)
    assert mask is not None and mask.shape == report.shape and int(mask.sum()) == report.stored
    layers, names, grid = density_grid(reports)
    assert layers == [0, 1] and names[:3] == ["q_proj", "k_proj", "v_proj"] and grid.shape == (2, 7)
    png = write_heatmap(out, tmp_path / "map.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_inspect(base_dir, tmp_path, capsys):
    _, out = saved_adapter(base_dir, tmp_path)
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "q_proj" in printed and (out / "sparsity.png").is_file()


def test_model_card_says_sparse_peft_is_needed(base_dir, tmp_path):
    _, out = saved_adapter(base_dir, tmp_path)
    card = (out / "README.md").read_text()
    assert "pip install sparse_peft" in card and "import sparse_peft" in card
