"""RoSA: robust adaptation, a LoRA plus a sparse delta (Nikdan et al., ICML 2024)."""

from .config import RosaConfig
from .layer import RosaLinear
from .model import RosaModel, load_rosa_masks, rosa_param_groups, save_rosa_masks, use_rosa_learning_rates

__all__ = [
    "RosaConfig",
    "RosaLinear",
    "RosaModel",
    "load_rosa_masks",
    "rosa_param_groups",
    "save_rosa_masks",
    "use_rosa_learning_rates",
]
