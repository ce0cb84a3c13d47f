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
from .arithmetic import (
    SparseDelta,
    adapter_deltas,
    add_sparse_adapter,
    add_sparse_soup,
    add_weighted_sparse_adapter,
    combine_deltas,
)
from .calibrate import calibrate
from .callbacks import ScheduleContext, SparsePeftCallback, before_optimizer_step, begin_step, refresh_masks
from .compat import delete_adapter
from .groups import param_groups, use_param_groups
from .optim import SparseSM3
from .prune import PruneSpec, magnitude_prune, measure_sparsity, parse_prune_spec, prune_model, wanda_prune
from .registry import install_io_guards, register_method
from .tuners.diff_pruning.config import DiffPruningConfig
from .tuners.diff_pruning.layer import DiffPruningLinear
from .tuners.diff_pruning.model import DiffPruningModel
from .tuners.lift.config import LiftConfig
from .tuners.lift.layer import LiftLinear
from .tuners.lift.model import LiftModel
from .tuners.lors.config import LorsConfig
from .tuners.lors.init import lors_gradient_init
from .tuners.lors.layer import LorsLinear
from .tuners.lors.model import LorsModel
from .tuners.rosa import (
    RosaConfig,
    RosaLinear,
    RosaModel,
    load_rosa_masks,
    rosa_param_groups,
    save_rosa_masks,
    use_rosa_learning_rates,
)
from .tuners.s2ft.config import S2ftConfig
from .tuners.s2ft.layer import S2FTLinear
from .tuners.s2ft.model import S2FTModel, calibrate_s2ft
from .tuners.smt.config import SmtConfig
from .tuners.smt.layer import SmtLinear
from .tuners.smt.model import SmtModel
from .tuners.snell.config import SnellConfig
from .tuners.snell.layer import SnellLinear
from .tuners.snell.model import SnellModel
from .tuners.spiel.config import SpielConfig
from .tuners.spiel.layer import SpielLinear
from .tuners.spiel.model import SpielModel
from .tuners.spp.config import SppConfig
from .tuners.spp.layer import SppLinear
from .tuners.spp.model import SppModel

METHODS: dict[str, tuple[type, type]] = {
    "smt": (SmtConfig, SmtModel),
    "s2ft": (S2ftConfig, S2FTModel),
    "snell": (SnellConfig, SnellModel),
    "diff_pruning": (DiffPruningConfig, DiffPruningModel),
    "lift": (LiftConfig, LiftModel),
    "spiel": (SpielConfig, SpielModel),
    "spp": (SppConfig, SppModel),
    "lors": (LorsConfig, LorsModel),
    "rosa": (RosaConfig, RosaModel),
}

for _name, (_config_cls, _model_cls) in METHODS.items():
    register_method(_name, _config_cls, _model_cls)
install_io_guards()

__all__ = [
    "METHODS",
    "AutoPeftModelForCausalLM",
    "DiffPruningConfig",
    "DiffPruningLinear",
    "DiffPruningModel",
    "LiftConfig",
    "LiftLinear",
    "LiftModel",
    "LorsConfig",
    "LorsLinear",
    "LorsModel",
    "PeftModel",
    "PruneSpec",
    "RosaConfig",
    "RosaLinear",
    "RosaModel",
    "S2FTLinear",
    "S2FTModel",
    "S2ftConfig",
    "ScheduleContext",
    "SmtConfig",
    "SmtLinear",
    "SmtModel",
    "SnellConfig",
    "SnellLinear",
    "SnellModel",
    "SparseDelta",
    "SparsePeftCallback",
    "SparseSM3",
    "SpielConfig",
    "SpielLinear",
    "SpielModel",
    "SppConfig",
    "SppLinear",
    "SppModel",
    "__version__",
    "adapter_deltas",
    "add_sparse_adapter",
    "add_sparse_soup",
    "add_weighted_sparse_adapter",
    "before_optimizer_step",
    "begin_step",
    "calibrate",
    "calibrate_s2ft",
    "combine_deltas",
    "delete_adapter",
    "load_rosa_masks",
    "lors_gradient_init",
    "magnitude_prune",
    "measure_sparsity",
    "param_groups",
    "parse_prune_spec",
    "prune_model",
    "refresh_masks",
    "rosa_param_groups",
    "save_rosa_masks",
    "use_param_groups",
    "use_rosa_learning_rates",
    "wanda_prune",
]

#: Earlier public names, still importable with a FutureWarning.
_RENAMED_EXPORTS = {"S2FTConfig": "S2ftConfig"}


def __getattr__(name: str):
    if name in _RENAMED_EXPORTS:
        import warnings

        new = _RENAMED_EXPORTS[name]
        warnings.warn(f"sparse_peft.{name} is now sparse_peft.{new}; the old name will be removed", FutureWarning, 2)
        return globals()[new]
    raise AttributeError(f"module 'sparse_peft' has no attribute {name!r}")
