"""Making sparse bases to fine-tune: magnitude and Wanda pruning, unstructured or N:M, in place.

Scores (per weight entry ``W[i, j]`` of a target linear layer):

* ``magnitude``: ``|W[i, j]|``;
* ``wanda`` (Sun et al., ICLR 2024, "A Simple and Effective Pruning Approach for Large Language Models"):
  ``|W[i, j]| · ‖X[:, j]‖₂``, the weight times the L2 norm of input feature ``j`` over all calibration tokens.

Patterns:

* **unstructured**, ``scope="row"`` (default, as Wanda does): every output row loses exactly
  ``floor(sparsity · in)`` entries, the lowest-scoring ones; ``scope="layer"``: the layer loses exactly
  ``floor(sparsity · out · in)`` entries ranked over the whole matrix;
* **N:M** (NVIDIA's convention): in every group of ``M`` consecutive inputs of every row at most ``N`` entries are
  non-zero (the ``M - N`` lowest-scoring ones are zeroed); ``in`` must be divisible by ``M``. 2:4 and 4:8 are
  the patterns sparse tensor cores accelerate.

Wanda is applied block by block, as in the reference code: the targets inside one repeated block (``...layers.<i>.``)
are calibrated together with the earlier blocks already pruned, so later blocks see the pruned model's activations.
Calibration batches are dicts of model inputs (``input_ids``, optionally ``attention_mask``); prefer unpadded
batches, because padding tokens enter the norms (the norms do not look at the attention mask).

Targets default to every ``nn.Linear`` except the output embedding (``lm_head``). Bases quantized with bitsandbytes
cannot be pruned in place: prune the float model, then quantize it. Entry points: :func:`prune_model`,
:func:`magnitude_prune`, :func:`wanda_prune`, :func:`parse_prune_spec`, :func:`measure_sparsity`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Literal, Optional, Union

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import resolve_quantization_backend
from torch import nn

Targets = Optional[Union[str, list[str]]]
Batch = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class PruneSpec:
    """What to prune: ``method`` ("magnitude" or "wanda") and either ``sparsity`` or an ``n:m`` pattern."""

    method: Literal["magnitude", "wanda"] = "wanda"
    sparsity: Optional[float] = 0.5
    n: Optional[int] = None
    m: Optional[int] = None
    scope: Literal["row", "layer"] = "row"

    def __post_init__(self) -> None:
        if self.method not in ("magnitude", "wanda"):
            raise ValueError(f"prune method must be 'magnitude' or 'wanda', got {self.method!r}")
        if self.scope not in ("row", "layer"):
            raise ValueError(f"prune scope must be 'row' or 'layer', got {self.scope!r}")
        if (self.n is None) != (self.m is None):
            raise ValueError("an N:M pattern needs both n and m, e.g. n=2, m=4")
        if self.n is not None:
            if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n < self.m):
                raise ValueError(f"N:M pattern needs integers 0 < n < m, got {self.n}:{self.m}")
        elif self.sparsity is None or not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"prune sparsity must be in [0, 1), got {self.sparsity!r}; e.g. 0.5 zeroes half")

    @property
    def n_m(self) -> Optional[tuple[int, int]]:
        return None if self.n is None else (self.n, self.m)

    def __str__(self) -> str:
        pattern = f"{self.n}:{self.m}" if self.n is not None else f"{self.sparsity:g}"
        return f"{self.method}:{pattern}"


def parse_prune_spec(text: str) -> PruneSpec:
    """Parse ``wanda:0.5``, ``magnitude:0.5``, ``2:4``, ``wanda:2:4``, ``magnitude:4:8`` or ``0.5``.

    Without a method name the method is Wanda (the usual base for SPP and LoRS).
    """
    parts = [p.strip() for p in str(text).strip().lower().split(":")]
    method = "wanda"
    if parts and parts[0] in ("wanda", "magnitude"):
        method = parts.pop(0)
    try:
        if len(parts) == 1:
            return PruneSpec(method=method, sparsity=float(parts[0]))
        if len(parts) == 2:
            return PruneSpec(method=method, sparsity=None, n=int(parts[0]), m=int(parts[1]))
    except ValueError as error:
        raise ValueError(f"bad prune spec {text!r}: {error}") from None
    raise ValueError(
        f"bad prune spec {text!r}; use METHOD:SPARSITY or [METHOD:]N:M, e.g. wanda:0.5, magnitude:0.5, 2:4, wanda:2:4"
    )


# ---- targets ---------------------------------------------------------------------------------------------------------
def _is_target(name: str, module: nn.Module, targets: Targets, output: Optional[nn.Module]) -> bool:
    if module is output or name.split(".")[-1] == "lm_head":
        return False
    if targets is None:
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in targets)


def target_linears(model: nn.Module, target_modules: Targets = None) -> Iterator[tuple[str, nn.Module]]:
    """``(name, linear)`` for every target linear layer; a PEFT tuner layer yields its base layer under its own name.

    ``target_modules``: None (every linear layer but the output embedding / ``lm_head``), a list of module names or
    name suffixes (``["q_proj", "v_proj"]``), or a regex matched against the full name. A ``PeftModel`` is read
    through its transformers model, so names match those of the model before wrapping and after ``merge_and_unload``.
    """
    model = _unwrap(model)
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    inside_tuner: set[str] = set()
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside_tuner):
            continue
        if isinstance(module, BaseTunerLayer):
            inside_tuner.add(f"{name}.")
            module = module.get_base_layer()
        if not isinstance(module, nn.Linear) and resolve_quantization_backend(module) is None:
            continue
        if _is_target(name, module, target_modules, output):
            yield name, module


def _unwrap(model: nn.Module) -> nn.Module:
    if isinstance(model, PeftModel):
        return model.get_base_model()
    return model.model if isinstance(model, BaseTuner) else model


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as a float tensor (dequantized for bitsandbytes layers; a transient copy then)."""
    backend = resolve_quantization_backend(module)
    if backend is not None:
        return backend.get_base_weight(module)
    return module.weight.data


# ---- masks -----------------------------------------------------------------------------------------------------------
def prune_mask(score: torch.Tensor, spec: PruneSpec) -> torch.Tensor:
    """Boolean ``(out, in)`` mask of the entries to zero: the lowest scores per row, per layer or per N:M group."""
    out_f, in_f = score.shape
    zero = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    if spec.n is not None:
        if in_f % spec.m:
            raise ValueError(f"{spec.n}:{spec.m} pruning needs in_features divisible by {spec.m}, got {in_f}")
        groups = score.reshape(out_f, in_f // spec.m, spec.m)
        lowest = torch.topk(groups, spec.m - spec.n, dim=-1, largest=False).indices
        return zero.reshape(groups.shape).scatter_(-1, lowest, True).reshape(out_f, in_f)
    if spec.scope == "row":
        k = int(spec.sparsity * in_f)
        return zero.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, True) if k else zero
    k = int(spec.sparsity * score.numel())
    if k:
        zero.view(-1)[torch.topk(score.reshape(-1), k, largest=False).indices] = True
    return zero


def nm_holds(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive inputs of every row has at most ``n`` non-zeros."""
    out_f, in_f = weight.shape
    if in_f % m:
        return False
    return bool(((weight != 0).reshape(out_f, in_f // m, m).sum(-1) <= n).all())


# ---- reports ---------------------------------------------------------------------------------------------------------
@dataclass
class LayerSparsity:
    """Zeros of one weight; ``nm`` is whether the requested N:M pattern holds (None when none was asked)."""

    shape: tuple[int, int]
    zeros: int
    sparsity: float
    nm: Optional[bool] = None


@dataclass
class SparsityReport:
    """Per-layer and overall fraction of zeros in the target weights (and whether N:M holds everywhere)."""

    layers: dict[str, LayerSparsity] = field(default_factory=dict)
    n_m: Optional[tuple[int, int]] = None
    spec: Optional[str] = None

    @property
    def sparsity(self) -> float:
        numel = sum(s.shape[0] * s.shape[1] for s in self.layers.values())
        return sum(s.zeros for s in self.layers.values()) / numel if numel else 0.0

    @property
    def nm_holds(self) -> Optional[bool]:
        return None if self.n_m is None else all(s.nm for s in self.layers.values())

    def to_dict(self, per_layer: bool = True) -> dict:
        result = {"sparsity": self.sparsity, "n_m": self.n_m, "nm_holds": self.nm_holds, "layers": len(self.layers)}
        if self.spec is not None:
            result["spec"] = self.spec
        if per_layer:
            result["per_layer"] = {name: asdict(s) for name, s in self.layers.items()}
        return result

    def __str__(self) -> str:
        text = f"{self.sparsity:.2%} zeros over {len(self.layers)} layers"
        if self.n_m is not None:
            text += f", {self.n_m[0]}:{self.n_m[1]} {'holds' if self.nm_holds else 'VIOLATED'}"
        return text


def measure_sparsity(
    model: nn.Module, target_modules: Targets = None, n_m: Optional[tuple[int, int]] = None
) -> SparsityReport:
    """Fraction of zeros of every target weight (PEFT tuner layers are measured on their base weight)."""
    report = SparsityReport(n_m=n_m)
    for name, module in target_linears(model, target_modules):
        weight = dense_weight(module)
        zeros = int((weight == 0).sum())
        nm = None if n_m is None else nm_holds(weight, *n_m)
        report.layers[name] = LayerSparsity(tuple(weight.shape), zeros, zeros / weight.numel(), nm)
    return report


def zero_sets(model: nn.Module, target_modules: Targets = None) -> dict[str, torch.Tensor]:
    """Boolean ``weight == 0`` per target layer (to check later that a merge kept every zero)."""
    return {name: dense_weight(module) == 0 for name, module in target_linears(model, target_modules)}


def zeros_kept(before: Mapping[str, torch.Tensor], model: nn.Module) -> bool:
    """True when every layer of ``before`` (from :func:`zero_sets`) is still zero wherever it was zero."""
    layers = dict(target_linears(model, list(before)))
    for name, was_zero in before.items():
        module = layers.get(name)
        if module is None or bool((dense_weight(module)[was_zero] != 0).any()):
            return False
    return True


# ---- pruning ---------------------------------------------------------------------------------------------------------
def _check_prunable(name: str, module: nn.Module) -> None:
    if resolve_quantization_backend(module) is not None or not isinstance(module, nn.Linear):
        raise TypeError(
            f"cannot prune {name} ({type(module).__name__}) in place: prune the float model first, then quantize it"
        )


@torch.no_grad()
def _apply(
    layers: Iterable[tuple[str, nn.Module]],
    spec: PruneSpec,
    report: SparsityReport,
    norms: Optional[Mapping[str, torch.Tensor]] = None,
) -> None:
    for name, module in layers:
        weight = module.weight.data
        score = weight.abs().float()
        if norms is not None:
            score = score * norms[name].to(score.device).unsqueeze(0)
        weight.masked_fill_(prune_mask(score, spec), 0)
        zeros = int((weight == 0).sum())
        nm = None if spec.n is None else nm_holds(weight, spec.n, spec.m)
        report.layers[name] = LayerSparsity(tuple(weight.shape), zeros, zeros / weight.numel(), nm)


def _report(spec: PruneSpec) -> SparsityReport:
    return SparsityReport(n_m=spec.n_m, spec=str(spec))


def magnitude_prune(
    model: nn.Module,
    sparsity: float = 0.5,
    n_m: Optional[tuple[int, int]] = None,
    target_modules: Targets = None,
    scope: Literal["row", "layer"] = "row",
) -> SparsityReport:
    """Zero the smallest ``|W|`` of every target layer in place (``n_m=(2, 4)`` for 2:4); returns what was achieved."""
    return prune_model(model, _spec("magnitude", sparsity, n_m, scope), target_modules=target_modules)


def wanda_prune(
    model: nn.Module,
    batches: Iterable[Batch],
    sparsity: float = 0.5,
    n_m: Optional[tuple[int, int]] = None,
    target_modules: Targets = None,
    scope: Literal["row", "layer"] = "row",
) -> SparsityReport:
    """Wanda: zero the smallest ``|W|·‖x‖`` of every target layer in place, calibrated on ``batches``."""
    return prune_model(model, _spec("wanda", sparsity, n_m, scope), batches, target_modules=target_modules)


def _spec(method: str, sparsity: float, n_m: Optional[tuple[int, int]], scope: Literal["row", "layer"]) -> PruneSpec:
    """``n_m`` wins over ``sparsity`` (an N:M pattern fixes the sparsity)."""
    n, m = n_m if n_m is not None else (None, None)
    return PruneSpec(method, None if n_m else sparsity, n, m, scope)


def prune_model(
    model: nn.Module, spec: PruneSpec, batches: Optional[Iterable[Batch]] = None, target_modules: Targets = None
) -> SparsityReport:
    """Prune ``model`` in place following ``spec``; Wanda needs calibration ``batches``. Returns the report."""
    layers = list(target_linears(model, target_modules))
    if not layers:
        raise ValueError(f"no linear layer matches target_modules={target_modules!r}")
    for name, module in layers:
        _check_prunable(name, module)
    report = _report(spec)
    if spec.method == "magnitude":
        _apply(layers, spec, report)
        return report
    batches = list(batches or [])
    if not batches:
        raise ValueError("Wanda pruning needs calibration batches (dicts of model inputs such as input_ids)")
    for block in _blocks(layers):
        _apply(block, spec, report, _input_norms(model, block, batches))
    return report


_BLOCK = re.compile(r"^(.*?\.\d+)\.")


def _blocks(layers: list[tuple[str, nn.Module]]) -> list[list[tuple[str, nn.Module]]]:
    """Group layers by their repeated block (``...layers.<i>.``) in model order; a layer outside blocks is alone."""
    groups: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, module in layers:
        match = _BLOCK.match(name)
        groups.setdefault(match.group(1) if match else name, []).append((name, module))
    return list(groups.values())


class _BlockDone(Exception):
    """Raised by the calibration hooks to end a forward once a block's inputs are all recorded."""


@torch.no_grad()
def _input_norms(
    model: nn.Module, layers: list[tuple[str, nn.Module]], batches: list[Batch]
) -> dict[str, torch.Tensor]:
    """``‖X[:, j]‖₂`` of every input feature of ``layers`` over all tokens of ``batches`` (float32).

    Each forward stops as soon as every layer of the block has seen its input: nothing after the block can change
    those inputs, so the norms are those of a full forward at a fraction of its cost.
    """
    squares: dict[str, torch.Tensor] = {}
    seen: set[str] = set()

    def hook_for(name: str):
        def hook(_module: nn.Module, args: tuple, _output: torch.Tensor) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            total = x.square().sum(0)
            squares[name] = squares[name] + total if name in squares else total
            seen.add(name)
            if len(seen) == len(layers):
                raise _BlockDone

        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in layers]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        for batch in batches:
            seen.clear()
            try:
                model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
            except _BlockDone:
                pass
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: squares[name].sqrt() for name, _ in layers}


# ---- command-line helpers --------------------------------------------------------------------------------------------
def calibration_batches(tokenizer, texts: Iterable[str], n: int = 16, max_length: int = 128) -> list[dict]:
    """Up to ``n`` unpadded one-text batches of ``texts`` (e.g. training prompts) for Wanda's input norms."""
    batches = []
    for text in list(texts)[:n]:
        batches.append(dict(tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)))
    return batches


def merged_sparsity(peft_model: nn.Module, n_m: Optional[tuple[int, int]] = None) -> tuple[SparsityReport, bool]:
    """``merge_and_unload`` ``peft_model`` (in place) and measure the merged weights; also whether every zero of the
    base survived the merge. Keeps one boolean ``weight == 0`` per target layer while merging."""
    zeros = zero_sets(peft_model)
    merged = peft_model.merge_and_unload()
    return measure_sparsity(merged, n_m=n_m), zeros_kept(zeros, merged)
