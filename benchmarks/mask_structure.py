"""Where the gradient's top-k entries fall in SmolLM2's matrices, next to a random mask of the same size.

Run by hand::

    python benchmarks/mask_structure.py --layers 0,5,15,25 --write benchmarks/results/2026-12-02/mask_structure.md

One batch of 8 training examples of the built-in task (completion tokens only), one backward through the frozen
model. For each target matrix ``(m, n)`` with LoRA r=16's budget ``k = 16·(m+n)`` it reports how concentrated the
top-``k`` of ``|G|`` (SpIEL-AG's growth criterion, ``G = ∂L/∂W``) and of ``|G_ij|/‖x_j‖`` (``growth_score=
"input_normalized"``) are: the share of the ``k`` entries held by the 5% fullest columns and rows (a uniform random
mask gives about 5%), and the mean input-feature norm ``‖x_j‖`` of the chosen entries relative to the matrix's median
feature norm (random: about the mean over features).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sparse_peft.models import load_model_and_tokenizer
from sparse_peft.tasks import arithmetic_task

ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def batch_of(tokenizer, n: int = 8) -> dict[str, torch.Tensor]:
    """``n`` training examples with labels on the completion only."""
    train, _ = arithmetic_task(n_train=n, n_eval=0)
    prompts = [tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in train]
    full = [tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=False) for r in train]
    enc = tokenizer(full, return_tensors="pt", padding=True)
    labels = enc["input_ids"].clone()
    for i, prompt in enumerate(prompts):
        labels[i, : len(tokenizer(prompt)["input_ids"])] = -100
    labels[enc["attention_mask"] == 0] = -100
    return {**enc, "labels": labels}


def concentration(chosen: torch.Tensor, shape: tuple[int, int], x_norm: torch.Tensor) -> tuple[float, float, float]:
    """(share of the 5% fullest columns, of the 5% fullest rows, mean ‖x_j‖ of the chosen / median ‖x_j‖)."""
    m, n = shape
    rows, cols = chosen // n, chosen % n
    share = []
    for ids, size in ((cols, n), (rows, m)):
        counts = torch.bincount(ids, minlength=size).float().sort(descending=True).values
        share.append(float(counts[: max(1, size // 20)].sum() / chosen.numel()))
    return share[0], share[1], float(x_norm[cols].mean() / x_norm.median())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="0,5,15,25", help="comma-separated decoder layer indices")
    parser.add_argument("--rank", type=int, default=16, help="budget k = rank·(m+n) per matrix")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", default=None, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer()
    layers = {int(i) for i in args.layers.split(",")}
    for p in model.parameters():
        p.requires_grad_(False)
    targets, norms, out_norms = {}, {}, {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name and name.rsplit(".", 1)[-1] in ROLES:
            if int(name.split(".layers.")[1].split(".")[0]) in layers:
                targets[name] = module
                module.weight.requires_grad_(True)
                module.register_forward_hook(
                    lambda mod, inp, out, key=name: norms.__setitem__(key, inp[0].detach().flatten(0, -2).norm(dim=0))
                )
                module.register_full_backward_hook(
                    lambda mod, gin, gout, key=name: out_norms.__setitem__(key, gout[0].flatten(0, -2).norm(dim=0))
                )
    model(**batch_of(tokenizer)).loss.backward()
    lines = [
        "| matrix | k/(m·n) | criterion | 5% fullest columns hold | 5% fullest rows hold | mean ‖x_j‖ / median |",
        "|---|---|---|---|---|---|",
    ]
    generator = torch.Generator().manual_seed(0)
    for name, module in targets.items():
        grad, x_norm = module.weight.grad.float(), norms[name].float()
        m, n = grad.shape
        k = min(args.rank * (m + n), m * n)
        criteria = {
            "gradient": grad.abs(),
            "input_normalized": grad.abs() / x_norm.clamp_min(1e-12),
            "correlation": grad.abs() / x_norm.clamp_min(1e-12) / out_norms[name].float().clamp_min(1e-12)[:, None],
            "random": torch.rand(m, n, generator=generator),
        }
        short = name.split("model.")[-1].replace("self_attn.", "").replace("mlp.", "")
        for label, score in criteria.items():
            chosen = torch.topk(score.reshape(-1), k).indices
            col, row, feature = concentration(chosen, (m, n), x_norm)
            lines.append(f"| {short} | {k / (m * n):.3f} | {label} | {col:.0%} | {row:.0%} | {feature:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        Path(args.write).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
