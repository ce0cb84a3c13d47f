"""The one place that touches PEFT internals: PeftType members, method registration, atomic adapter writes.

PEFT 0.21 has no plugin discovery. A method becomes a first-class PEFT method when

1. ``peft.utils.PeftType`` has a real enum member for it (transformers calls ``peft_type.value``), and
2. ``peft.utils.register_peft_method`` has put its config, tuner and prefix into PEFT's four mappings.

``PeftType`` is a ``(str, Enum)`` that cannot be subclassed, so :func:`add_peft_type` binds a new member the way the
enum machinery itself does, then verifies every lookup PEFT, transformers, ``copy`` and ``pickle`` use, so a change
of enum internals in a future Python fails loudly at import instead of misbehaving later.

Our type values are namespaced (``SPARSE_PEFT_LIFT``) so they cannot collide with a method upstream PEFT may add, and
so that a bare ``KeyError: 'SPARSE_PEFT_LIFT'`` from a process that forgot ``import sparse_peft`` names its cause.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import warnings
from collections.abc import Callable
from typing import Any

from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.utils import PeftType, register_peft_method

from .sparse.io import atomic_write

NAMESPACE = "SPARSE_PEFT_"


class RegistrationError(RuntimeError):
    """A PEFT type name or prefix is already taken by someone else."""


def _bind_member(value: str) -> PeftType:
    member = str.__new__(PeftType, value)
    member._name_ = value
    member._value_ = value
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    add_member = getattr(type(PeftType), "_add_member_", None)
    if add_member is not None:  # CPython >= 3.12 binds the attribute and _member_map_ itself
        add_member(PeftType, value, member)
    else:  # CPython 3.10 / 3.11: what enum's member descriptor does at class creation
        type.__setattr__(PeftType, value, member)
        PeftType._member_map_[value] = member
    PeftType._member_names_.append(value)
    PeftType._value2member_map_[value] = member
    return member


def _self_check(member: PeftType, value: str) -> None:
    checks = {
        "PeftType(value)": lambda: PeftType(value) is member,
        "PeftType[value]": lambda: PeftType[value] is member,
        "getattr(PeftType, value)": lambda: getattr(PeftType, value) is member,
        "member in list(PeftType)": lambda: member in list(PeftType),
        "member == value": lambda: member == value and member.value == value,
    }
    failed = [name for name, check in checks.items() if not _safe(check)]
    if failed:
        raise RegistrationError(
            f"sparse_peft could not add {value!r} to peft.utils.PeftType: {', '.join(failed)} failed. The enum "
            f"internals of this combination (Python {platform.python_version()}, "
            f"peft {importlib.metadata.version('peft')}) differ from the tested ones (CPython 3.10-3.13, peft 0.21; "
            "see `sparse-peft env`)."
        )


def _safe(check: Callable[[], bool]) -> bool:
    try:
        return bool(check())
    except Exception:
        return False


def add_peft_type(value: str) -> PeftType:
    """Add ``value`` as a member of ``peft.utils.PeftType`` (idempotent) and verify it."""
    if value != value.upper():
        raise ValueError(f"PEFT type values are upper case, got {value!r}")
    member = PeftType._value2member_map_.get(value)
    if member is None:
        if value in PeftType.__dict__:
            raise RegistrationError(f"peft.utils.PeftType already has an attribute named {value!r}")
        member = _bind_member(value)
    _self_check(member, value)
    return member


def register_method(name: str, config_cls: type, model_cls: type) -> PeftType:
    """Register a method as ``SPARSE_PEFT_<NAME>`` with prefix ``sparse_peft_<name>_``.

    Re-registering the same classes is a no-op (re-import, ``importlib.reload``); a type or prefix that someone else
    already registered raises :class:`RegistrationError` instead of being hijacked.
    """
    method = f"{NAMESPACE}{name}".lower()
    peft_type = add_peft_type(method.upper())
    prefix = f"{method}_"
    existing = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if existing is not None:
        if _same_class(existing, config_cls) and _same_class(PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type), model_cls):
            PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
            PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
            return peft_type
        raise RegistrationError(
            f"PEFT type {peft_type.value} is already registered by {existing.__module__}.{existing.__qualname__}; "
            f"uninstall the conflicting package or do not import both"
        )
    owner = next((t for t, p in PEFT_TYPE_TO_PREFIX_MAPPING.items() if p == prefix), None)
    if owner is not None:  # PEFT itself only checks the keys, not the prefixes
        raise RegistrationError(f"adapter prefix {prefix!r} is already used by PEFT type {owner}")
    if peft_type in PEFT_TYPE_TO_MIXED_MODEL_MAPPING:
        raise RegistrationError(f"PEFT type {peft_type.value} already has a mixed-model entry")
    register_peft_method(name=method, config_cls=config_cls, model_cls=model_cls, prefix=prefix)
    return peft_type


def _same_class(a: type | None, b: type) -> bool:
    """Equal, or the same class re-created by a module reload."""
    return a is b or (a is not None and (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__))


def _atomic_safe_save(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def save_file(tensors: dict, filename: str, *args: Any, **kwargs: Any) -> None:
        atomic_write(str(filename), lambda tmp: original(tensors, tmp, *args, **kwargs))

    save_file._sparse_peft_atomic = True  # type: ignore[attr-defined]
    return save_file


def _clear_load_errors(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def load_file(filename: str, *args: Any, **kwargs: Any) -> dict:
        try:
            return original(filename, *args, **kwargs)
        except Exception as error:  # safetensors raises its own SafetensorError type
            if type(error).__name__ != "SafetensorError":
                raise
            raise ValueError(
                f"adapter weights file {filename!r} is corrupted or truncated ({error}). Re-save the adapter, or "
                f"load it from an earlier checkpoint directory; adapter files written by sparse_peft are replaced "
                f"atomically, so a partial file points to a copy or a transfer that did not finish."
            ) from error

    load_file._sparse_peft_atomic = True  # type: ignore[attr-defined]
    return load_file


def _while_loading(original: Callable[..., Any]) -> Callable[..., Any]:
    """Run a PEFT loader inside :func:`~sparse_peft.tuners.base.loading_checkpoint`: the adapters it creates take
    their positions from the file, so no selection runs, with ``is_trainable=True`` too."""
    from .tuners.base import loading_checkpoint

    @functools.wraps(original)
    def load(*args: Any, **kwargs: Any) -> Any:
        with loading_checkpoint():
            return original(*args, **kwargs)

    load._sparse_peft_atomic = True  # type: ignore[attr-defined]
    return load


def _install_loading_guards() -> None:
    import peft.peft_model

    cls = peft.peft_model.PeftModel
    if not getattr(cls.from_pretrained, "_sparse_peft_atomic", False):
        cls.from_pretrained = classmethod(_while_loading(cls.from_pretrained.__func__))
    if not getattr(cls.load_adapter, "_sparse_peft_atomic", False):
        cls.load_adapter = _while_loading(cls.load_adapter)


MODEL_CARD_NOTE = (
    "## Loading this adapter\n\n"
    "This adapter uses a sparse fine-tuning method from [sparse_peft](https://pypi.org/project/sparse-peft/). "
    "Loading it needs `pip install sparse_peft` and `import sparse_peft` before `PeftModel.from_pretrained` "
    "(the import registers the method with PEFT):\n\n"
    "```python\nimport sparse_peft\nfrom peft import PeftModel\n\n"
    'model = PeftModel.from_pretrained(base_model, "path/to/this/adapter")\n```\n'
)


def _model_card_note(original: Callable[..., Any]) -> Callable[..., Any]:
    """After PEFT writes the model card, add the line saying the adapter needs sparse_peft (sparse adapters only)."""

    @functools.wraps(original)
    def create_or_update_model_card(self: Any, output_dir: str) -> None:
        original(self, output_dir)
        configs = getattr(self, "peft_config", {}) or {}
        types = [getattr(c.peft_type, "value", c.peft_type) for c in configs.values() if hasattr(c, "peft_type")]
        if not any(str(t).startswith("SPARSE_PEFT_") for t in types):
            return
        filename = os.path.join(output_dir, "README.md")
        text = open(filename, encoding="utf-8").read() if os.path.exists(filename) else ""
        if "pip install sparse_peft" in text:
            return
        updated = text.rstrip("\n") + "\n\n" + MODEL_CARD_NOTE

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as handle:
                handle.write(updated)

        atomic_write(filename, write)

    create_or_update_model_card._sparse_peft_atomic = True  # type: ignore[attr-defined]
    return create_or_update_model_card


def install_io_guards() -> None:
    """Make PEFT's adapter writes atomic and its corrupted-file errors explicit (idempotent).

    PEFT writes ``adapter_model.safetensors`` straight to its final name; we route its ``safe_save_file`` through
    :func:`atomic_write` and its ``safe_load_file`` through an error that names the file and the fix, and add to the
    model card of sparse adapters that loading them needs ``import sparse_peft``; ``PeftModel.from_pretrained`` and
    ``load_adapter`` run inside :func:`~sparse_peft.tuners.base.loading_checkpoint`. The wrappers keep behaviour
    identical otherwise. If PEFT's internals move, this warns and leaves PEFT untouched.
    """
    import peft.peft_model
    import peft.utils.save_and_load

    targets = [
        (peft.peft_model, "safe_save_file", _atomic_safe_save),
        (peft.utils.save_and_load, "safe_load_file", _clear_load_errors),
        (peft.peft_model.PeftModel, "create_or_update_model_card", _model_card_note),
    ]
    for module, attr, wrap in targets:
        original = getattr(module, attr, None)
        if original is None:
            warnings.warn(
                f"sparse_peft: {module.__name__}.{attr} not found; adapter I/O guards not installed", stacklevel=2
            )
            continue
        if not getattr(original, "_sparse_peft_atomic", False):
            setattr(module, attr, wrap(original))
    _install_loading_guards()
