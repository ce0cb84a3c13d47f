"""Configuration of S²FT: structured sparse fine-tuning of whole heads and channels."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional, Union

from ..base import SparseConfig

ROLES = ("v", "o", "up", "down")
STRATEGIES = ("random", "weight", "activation", "gradient")


@dataclass
class S2ftConfig(SparseConfig):
    """S²FT (Yang et al., NeurIPS 2024, "S²FT: Efficient, Scalable and Generalizable LLM Fine-tuning by Structured
    Sparsity").

    Per transformer layer S²FT trains whole attention heads, as rows of ``W_v`` and columns of ``W_o``, and whole
    FFN channels, as rows of ``W_up`` and columns of ``W_down``; Q, K and gate are never trained. Each target module
    plays one role (``module_roles``: last name component -> ``"v"``, ``"o"``, ``"up"`` or ``"down"``) and trains
    ``max(1, round(ratio·units))`` units of that role in every layer:

    * ``v``: units are KV heads (``head_dim`` rows each);
    * ``o``: units are query heads (``head_dim`` columns of ``W_o`` each; ``o_unit="head"``, the default), or KV
      groups, the ``num_attention_heads / num_key_value_heads`` query heads that read one KV head
      (``o_unit="kv_group"``, ``group·head_dim`` columns each). Nothing is permuted, so O columns can be chosen per
      query head even on grouped-query models (the reference co-permutes V and O heads to make the slices
      contiguous, which on GQA models only works per KV group);
    * ``up`` / ``down``: units are FFN channels (one row / one column).

    ``selection``: ``"random"`` (seeded per layer, the released default), ``"weight"`` (norm of the unit's weights),
    ``"activation"`` (norm of the unit's output rows / input columns) or ``"gradient"`` (norm of the unit's
    accumulated weight gradient); ``select_largest=False`` takes the smallest scores. ``activation`` and
    ``gradient`` need the calibration pass (:func:`sparse_peft.calibrate`, which
    :class:`sparse_peft.SparsePeftCallback` runs on the first training batches) before training; until then the
    units are the random ones.
    """

    method: ClassVar[str] = "s2ft"
    fractions: ClassVar[tuple[str, ...]] = ("v_ratio", "o_ratio", "up_ratio", "down_ratio")
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {"selection": STRATEGIES, "o_unit": ("head", "kv_group")}

    target_modules: Optional[Union[list[str], str]] = field(
        default_factory=lambda: ["v_proj", "o_proj", "up_proj", "down_proj"],
        metadata={"help": "Modules to train slices of; each needs a role in module_roles."},
    )
    module_roles: dict[str, str] = field(
        default_factory=lambda: {"v_proj": "v", "o_proj": "o", "up_proj": "up", "down_proj": "down"},
        metadata={"help": "Last module-name component -> role: 'v' (head rows), 'o' (head columns), 'up', 'down'."},
    )
    v_ratio: float = field(default=0.05, metadata={"help": "Fraction of KV heads per layer trained in W_v."})
    o_ratio: float = field(default=0.05, metadata={"help": "Fraction of O units (heads) per layer trained in W_o."})
    o_unit: Literal["head", "kv_group"] = field(
        default="head", metadata={"help": "O units: 'head' (one query head's columns) or 'kv_group'."}
    )
    up_ratio: float = field(default=0.02, metadata={"help": "Fraction of FFN channels per layer trained in W_up."})
    down_ratio: float = field(default=0.02, metadata={"help": "Fraction of FFN channels per layer in W_down."})
    selection: Literal["random", "weight", "activation", "gradient"] = field(
        default="random", metadata={"help": "How heads/channels are chosen: random, weight, activation, gradient."}
    )
    select_largest: bool = field(default=True, metadata={"help": "Take the largest scores (False: smallest)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        bad = {k: v for k, v in self.module_roles.items() if v not in ROLES}
        if bad:
            raise ValueError(f"{owner}.module_roles maps {bad} to unknown roles; use one of {ROLES}")

    def ratio(self, role: str) -> float:
        return getattr(self, f"{role}_ratio")
