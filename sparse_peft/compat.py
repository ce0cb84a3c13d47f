"""Known conflicts between upstream releases, and the mends that work around them from here.

Each :class:`Conflict` names the upstream combination, what it breaks and what to do instead; ``sparse-peft env``
prints the ones that apply to the running environment, and the tests turn each into a strict, version-conditioned
``xfail`` (never a skip), so the day upstream fixes it the xfail fails and the entry is removed.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass

from packaging.version import Version
from torch import nn


def installed_version(distribution: str) -> Version | None:
    """The installed version of ``distribution`` (local labels such as ``+cpu`` kept), or ``None``."""
    try:
        return Version(importlib.metadata.version(distribution))
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class Conflict:
    """An upstream combination that breaks a feature we cannot mend inside upstream's own code."""

    name: str
    applies: Callable[[], bool]
    breaks: str
    instead: str

    def message(self) -> str:
        return f"{self.name}: {self.breaks} Instead: {self.instead}"


def _transformers_needs_newer_peft() -> bool:
    transformers, peft = installed_version("transformers"), installed_version("peft")
    return transformers is not None and peft is not None and transformers >= Version("5.24") and peft < Version("0.22")


TRANSFORMERS_ADAPTER_API = Conflict(
    name="transformers >= 5.24 with PEFT < 0.22",
    applies=_transformers_needs_newer_peft,
    breaks=(
        "transformers' own adapter methods on a plain transformers model (add_adapter, set_adapter, "
        "enable_adapters, disable_adapters, active_adapters, get_adapter_state_dict, delete_adapter) raise "
        "'please use a version >= 0.22.0' of PEFT, and no such PEFT release exists yet; load_adapter and every "
        "PeftModel path still work."
    ),
    instead=(
        "wrap the model with PeftModel.from_pretrained, or call sparse_peft.delete_adapter(model, name) on a model "
        "that used load_adapter; or install the tested set (pip install -c constraints.txt ...), which has "
        "transformers 5.23."
    ),
)

CONFLICTS: tuple[Conflict, ...] = (TRANSFORMERS_ADAPTER_API,)


def active_conflicts() -> list[Conflict]:
    """The known conflicts that apply to the installed versions."""
    return [conflict for conflict in CONFLICTS if conflict.applies()]


def delete_adapter(model: nn.Module, adapter_names: str | list[str]) -> None:
    """Delete adapters from a ``PeftModel`` or from a transformers model that loaded them with ``load_adapter``.

    Does what transformers' ``PreTrainedModel.delete_adapter`` does (remove the adapter's layers and parameters
    through ``peft.functional.delete_adapter``, drop its config, clear the loaded flag once none is left) without
    transformers' version gate, which from transformers 5.24 refuses every PEFT release before 0.22 (see
    :data:`TRANSFORMERS_ADAPTER_API`).
    """
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        raise ValueError("no adapter is loaded on this model: load one with load_adapter or PeftModel.from_pretrained")
    missing = [name for name in names if name not in configs]
    if missing:
        raise ValueError(f"adapter(s) {', '.join(missing)} not found; loaded: {', '.join(configs)}")
    from peft import PeftModel

    if isinstance(model, PeftModel):
        for name in names:
            model.delete_adapter(name)
        return
    from peft.functional import delete_adapter as peft_delete_adapter

    for name in names:
        prefix = f"{configs[name].peft_type.value.lower()}_"
        peft_delete_adapter(model, adapter_name=name, prefix=prefix)
        configs.pop(name, None)
    if not configs:
        del model.peft_config
        model._hf_peft_config_loaded = False
