"""PEFT glue shared by every sparse_peft method: the config base, the tuner base and the Linear check."""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import PeftType, resolve_quantization_backend
from torch import nn

from .._version import __version__

#: The project's vocabulary, one name per idea across methods: ``r`` (a LoRA-equivalent rank), ``density`` (the
#: fraction of each matrix that trains), ``window_steps`` (optimizer steps of gradient statistics before a selection),
#: ``seed``. :func:`renamed_fields` keeps the earlier names working.
VOCABULARY = ("r", "density", "window_steps", "seed")


def renamed_fields(**renames: str) -> Callable[[type], type]:
    """Class decorator (above ``@dataclass``): the config still takes each field's earlier name, with a
    ``FutureWarning``, as a keyword (so ``adapter_config.json`` files saved by earlier releases keep loading) and as a
    read-only attribute. ``renames``: ``earlier name -> field name``."""

    def wrap(cls: type) -> type:
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise ValueError(f"{cls.__name__} got {new}= and its earlier name {old}=; pass {new}= only")
                    _warn_renamed(cls.__name__, old, new)
                    kwargs[new] = kwargs.pop(old)
            init(self, *args, **kwargs)

        cls.__init__ = __init__
        cls.renamed = {**getattr(cls, "renamed", {}), **renames}
        for old, new in renames.items():
            reader = functools.partial(_read_renamed, old=old, new=new)
            setattr(cls, old, property(reader, doc=f"Earlier name of {new}."))
        return cls

    return wrap


def current_field_names(config_cls: type, fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` with earlier field names of ``config_cls`` replaced by the current ones (with the warning), e.g.
    before merging a user's fields over defaults that use the current names."""
    renames = getattr(config_cls, "renamed", {})
    result = {}
    for key, value in fields.items():
        if key in renames:
            _warn_renamed(config_cls.__name__, key, renames[key])
        result[renames.get(key, key)] = value
    return result


def _read_renamed(config: Any, old: str, new: str) -> Any:
    _warn_renamed(type(config).__name__, old, new)
    return getattr(config, new)


def _warn_renamed(owner: str, old: str, new: str) -> None:
    warnings.warn(f"{owner}.{old} is now {owner}.{new}; the old name will be removed", FutureWarning, stacklevel=4)


@dataclass
class SparseConfig(PeftConfig):
    """Fields every sparse_peft method shares (PEFT's usual targeting fields plus provenance).

    Subclasses set the class variable ``method`` (e.g. ``"lift"``); the PEFT type is ``SPARSE_PEFT_<METHOD>``.
    """

    method: ClassVar[str] = ""
    #: Declarative checks of a config's own fields, run once by ``__post_init__`` (an unset optional field, None,
    #: always passes): positive integers, fractions in ``(0, 1]``, positive numbers, fields limited to a few values,
    #: and groups of fields of which at least one must be set (``("density", "rank")``: the budget).
    positive_ints: ClassVar[tuple[str, ...]] = ()
    fractions: ClassVar[tuple[str, ...]] = ()
    positive_numbers: ClassVar[tuple[str, ...]] = ()
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {}
    needs_one_of: ClassVar[tuple[str, ...]] = ()
    #: Whether a fresh adapter leaves the model's outputs unchanged (False for SNELL, whose kernel update has no
    #: trainable identity point); DPO with ``peft_config`` needs it for its reference (adapter disabled) to match.
    identity_at_init: ClassVar[bool] = True

    target_modules: Optional[Union[list[str], str]] = field(
        default="all-linear",
        metadata={"help": "Module names or a regex to adapt; 'all-linear' = every linear layer except the LM head."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex to leave alone."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt these layer indices."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list, used with layers_to_transform."}
    )
    target_parameters: Optional[list[str]] = field(
        default=None, metadata={"help": "Unsupported by sparse_peft methods; must stay None."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules trained densely and saved in full, e.g. a classifier head."}
    )
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(
        default=None, metadata={"help": "Token rows of the embedding to train (set by TRL when it adds tokens)."}
    )
    bias: str = field(default="none", metadata={"help": "'none', 'all' or '<prefix>only': which biases to train."})
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: the adapter starts as the identity (zero delta). False: random, for tests."},
    )
    seed: int = field(default=0, metadata={"help": "Seed for tie-breaking and any random selection."})
    frozen_counts: dict[str, int] = field(
        default_factory=dict,
        metadata={
            "help": "Filled in during training: per module, how many learned entries left the active mask and are "
            "kept frozen (LIFT refreshes). Saved so that loaders can allocate the right sizes; do not set by hand."
        },
    )
    sparse_peft_version: str = field(
        default=__version__, metadata={"help": "Version of sparse_peft that created the adapter (provenance)."}
    )

    @property
    def starts_as_identity(self) -> bool:
        """Whether a fresh adapter of this config leaves the model's outputs unchanged."""
        return type(self).identity_at_init

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = getattr(PeftType, f"SPARSE_PEFT_{self.method.upper()}")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, set(value))
        if self.target_parameters:
            raise ValueError(f"{type(self).__name__}.target_parameters is not supported; use target_modules instead")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(f"{type(self).__name__}.layers_pattern needs layers_to_transform as well")
        self._check_declared_fields()

    def _check_declared_fields(self) -> None:
        """The checks the class declares in ``positive_ints``, ``fractions``, ``positive_numbers``, ``choices`` and
        ``needs_one_of``; each error names the config, the field, the value and what is allowed."""
        owner = type(self).__name__
        for name in self.positive_ints:
            self._check_positive(owner, name, getattr(self, name))
        for name in self.fractions:
            self._check_fraction(owner, name, getattr(self, name))
        for name in self.positive_numbers:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ValueError(f"{owner}.{name} must be a positive number, got {value!r}")
        for name, allowed in self.choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{owner}.{name} must be one of {', '.join(map(repr, allowed))}, got {getattr(self, name)!r}"
                )
        if self.needs_one_of and all(getattr(self, name) is None for name in self.needs_one_of):
            raise ValueError(f"{owner} needs {' or '.join(self.needs_one_of)} to size its trainable budget")

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Write ``adapter_config.json`` like PEFT does, but atomically (temporary file, then one rename)."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!r} is a file; pass a directory")
        os.makedirs(save_directory, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=save_directory, prefix=".tmp-config-") as staging:
            super().save_pretrained(staging, **kwargs)
            for name in os.listdir(staging):
                os.replace(os.path.join(staging, name), os.path.join(save_directory, name))

    @staticmethod
    def _check_fraction(owner: str, name: str, value: Optional[float]) -> None:
        if value is not None and not 0.0 < value <= 1.0:
            raise ValueError(
                f"{owner}.{name} must be in (0, 1], got {value}; e.g. {name}=0.01 trains 1% of each matrix"
            )

    @staticmethod
    def _check_positive(owner: str, name: str, value: Optional[int]) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"{owner}.{name} must be a positive integer, got {value!r}")


_LOADING: ContextVar[bool] = ContextVar("sparse_peft_loading", default=False)


@contextlib.contextmanager
def loading_checkpoint() -> Iterator[None]:
    """Marks adapters created inside it as about to be overwritten by a checkpoint (see :func:`from_checkpoint`).

    The registry enters it around ``PeftModel.from_pretrained`` and ``PeftModel.load_adapter``, so loading with
    ``is_trainable=True`` runs no selection either.
    """
    token = _LOADING.set(True)
    try:
        yield
    finally:
        _LOADING.reset(token)


def from_checkpoint(config: PeftConfig) -> bool:
    """True when a new adapter's positions will come from a saved file: inference mode (PEFT's and transformers'
    loaders set it unless ``is_trainable``) or inside :func:`loading_checkpoint`. Layers then allocate placeholder
    positions instead of running their selection (an SVD, gradient statistics, a mask file), and skip checks that
    only the selection needs, so a base of other shapes fails on the checkpoint's shape check naming the layer."""
    return bool(getattr(config, "inference_mode", False)) or _LOADING.get()


def linear_base(target: nn.Module) -> nn.Module:
    """The innermost base layer of ``target`` (unwrapping other tuner layers)."""
    return target.get_base_layer() if isinstance(target, BaseTunerLayer) else target


def check_linear(target: nn.Module, key: str, method: str) -> None:
    """Raise a ``TypeError`` naming ``key`` unless ``target`` is an ``nn.Linear`` or a quantized linear layer."""
    base = linear_base(target)
    backend = resolve_quantization_backend(base)
    if isinstance(base, nn.Linear) or (backend is not None and getattr(backend, "layer_type", None) == "linear"):
        return
    raise TypeError(
        f"{method} can only adapt linear layers, but target module {key!r} is a {type(base).__name__}. Remove it from "
        f"target_modules (or add it to exclude_modules); target_modules='all-linear' selects every linear layer."
    )


class SparseTuner(BaseTuner):
    """Base tuner: wraps each matched linear layer in ``layer_cls`` and validates checkpoints on load.

    Subclasses set ``prefix``, ``tuner_layer_cls`` and ``method_name``.
    """

    method_name: str = ""
    target_module_mapping: ClassVar[dict[str, list[str]]] = {}

    def _create_and_replace(
        self,
        config: SparseConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, config)
            return
        check_linear(target, current_key, self.method_name)
        new_module = self.tuner_layer_cls(target, adapter_name, config, module_name=current_key, **self._layer_kwargs())
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _layer_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for new layers that depend on the whole model (e.g. S²FT's attention shape)."""
        return {}

    def _check_new_adapter_config(self, config: PeftConfig) -> None:
        super()._check_new_adapter_config(config)
        if getattr(config, "target_parameters", None):
            raise ValueError(f"{self.method_name} does not support target_parameters")

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: PeftConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        for name, module in model.named_modules():
            prepare = getattr(module, "prepare_load", None)
            if isinstance(module, BaseTunerLayer) and prepare is not None:
                prepare(name, adapter_name, remapped)
        _check_adapter_shapes(model, remapped)
        return remapped


def _check_adapter_shapes(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Every adapter tensor of the checkpoint must have the shape this base model gives it (the layer-specific
    checks of ``prepare_load`` ran first); otherwise a ``ValueError`` names the layer and the fix, instead of torch's
    ``load_state_dict`` size-mismatch list."""
    current = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for key, saved in state_dict.items():
        tensor = current.get(key)
        if tensor is None or tensor.shape == saved.shape:
            continue
        layers = {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer) and key.startswith(f"{n}.")}
        where = max(layers, key=len) if layers else key.rsplit(".", 2)[0]
        shape = getattr(layers.get(where), "shape", None)  # (out, in) of the base weight
        base_shape = f" of shape {tuple(shape)}" if shape is not None else ""
        raise ValueError(
            f"adapter entry {key} holds shape {tuple(saved.shape)} but the layer {where}{base_shape} of this base "
            f"model expects {tuple(tensor.shape)}: the adapter was trained on a base model with other layer shapes "
            f"(or another rank). Load it into the base model it was trained on."
        )
