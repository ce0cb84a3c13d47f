"""sparse_peft: sparse parameter-efficient fine-tuning methods for Hugging Face PEFT.

``import sparse_peft`` registers every method with PEFT, so the usual workflow works unchanged::

    import sparse_peft
    from peft import get_peft_model
    model = get_peft_model(base, sparse_peft.LiftConfig(target_modules="all-linear"))

``sparse_peft.PeftModel`` and ``sparse_peft.AutoPeftModelForCausalLM`` are PEFT's own loaders, re-exported so that
importing them from here guarantees the registration has happened.
"""

from __future__ import annotations

from peft import AutoPeftModelForCausalLM, PeftModel

from ._version import __version__
from .callbacks import ScheduleContext, SparsePeftCallback, before_optimizer_step, begin_step, refresh_masks
from .optim import SparseSM3
from .registry import install_io_guards, register_method
from .tuners.lift.config import LiftConfig
from .tuners.lift.layer import LiftLinear
from .tuners.lift.model import LiftModel
from .tuners.spiel.config import SpielConfig
from .tuners.spiel.layer import SpielLinear
from .tuners.spiel.model import SpielModel

METHODS: dict[str, tuple[type, type]] = {
    "lift": (LiftConfig, LiftModel),
    "spiel": (SpielConfig, SpielModel),
}

for _name, (_config_cls, _model_cls) in METHODS.items():
    register_method(_name, _config_cls, _model_cls)
install_io_guards()

__all__ = [
    "METHODS",
    "AutoPeftModelForCausalLM",
    "LiftConfig",
    "LiftLinear",
    "LiftModel",
    "PeftModel",
    "ScheduleContext",
    "SparsePeftCallback",
    "SparseSM3",
    "SpielConfig",
    "SpielLinear",
    "SpielModel",
    "__version__",
    "before_optimizer_step",
    "begin_step",
    "refresh_masks",
]
