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


def test_compare_two_saves_reports_how_much_of_the_mask_moved(base_dir, tmp_path, capsys):
    """LIFT with a refresh every step: the per-module moved fraction equals the brute-force set difference of the two
    saved masks; the CLI prints the table and writes the map."""
    import torch
    from conftest import INPUT
    from safetensors.torch import load_file

    from sparse_peft import refresh_masks
    from sparse_peft.inspector import mask_movement

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir), LiftConfig(r=2, filter_rank=4, update_interval=1)
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.save_pretrained(tmp_path / "early")
    for step in range(1, 4):
        model(INPUT, labels=INPUT).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        refresh_masks(model, step, optimizer)
    model.save_pretrained(tmp_path / "late")
    movement = mask_movement(tmp_path / "early", tmp_path / "late")
    early, late = (load_file(str(tmp_path / name / "adapter_model.safetensors")) for name in ("early", "late"))
    moved_any = False
    for module, row in movement.items():
        key = next(k for k in late if k.startswith(module + ".") and k.endswith("_indices") and "frozen" not in k)
        a, b = set(early[key].tolist()), set(late[key].tolist())
        assert row.kept == len(a & b) and row.total == len(b)
        moved_any |= row.moved > 0
    assert moved_any
    assert main(["inspect", str(tmp_path / "late"), "--compare", str(tmp_path / "early")]) == 0
    printed = capsys.readouterr().out
    assert "moved" in printed and "total" in printed and (tmp_path / "late" / "mask-moved.png").is_file()
