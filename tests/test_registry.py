"""Registration with PEFT from outside: real enum members, idempotent, no hijacking, loud self-check."""

from __future__ import annotations

import importlib

import peft
import pytest
from conftest import run_python
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import sparse_peft
from sparse_peft import LiftConfig, LiftModel
from sparse_peft.registry import RegistrationError, _self_check, add_peft_type, register_method


def test_real_enum_member_and_mappings():
    member = PeftType.SPARSE_PEFT_LIFT
    assert PeftType("SPARSE_PEFT_LIFT") is member and PeftType["SPARSE_PEFT_LIFT"] is member
    assert member in list(PeftType) and member.value == "SPARSE_PEFT_LIFT"
    assert PEFT_TYPE_TO_CONFIG_MAPPING[member] is LiftConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[member] is LiftModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[member] == "sparse_peft_lift_" == LiftModel.prefix
    assert LiftConfig().peft_type is member


def test_reimport_and_reregister_are_harmless():
    importlib.reload(sparse_peft)
    assert register_method("lift", LiftConfig, LiftModel) is PeftType.SPARSE_PEFT_LIFT
    assert add_peft_type("SPARSE_PEFT_LIFT") is PeftType.SPARSE_PEFT_LIFT
    assert list(PeftType).count(PeftType.SPARSE_PEFT_LIFT) == 1


def test_taken_name_is_not_hijacked():
    class OtherConfig(LiftConfig):
        pass

    with pytest.raises(RegistrationError, match="already registered by .*LiftConfig"):
        register_method("lift", OtherConfig, LiftModel)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.SPARSE_PEFT_LIFT] is LiftConfig


def test_taken_prefix_is_refused(monkeypatch):
    monkeypatch.setitem(PEFT_TYPE_TO_PREFIX_MAPPING, PeftType.LORA, "sparse_peft_clash_")
    with pytest.raises(RegistrationError, match="prefix 'sparse_peft_clash_' is already used"):
        register_method("clash", LiftConfig, LiftModel)


def test_self_check_fails_loudly():
    with pytest.raises(RegistrationError, match="enum internals"):
        _self_check(PeftType.SPARSE_PEFT_LIFT, "SOMETHING_ELSE")


def test_type_values_are_namespaced_and_lower_case_rejected():
    assert all(name.startswith("SPARSE_PEFT_") for name in PeftType.__members__ if "SPARSE" in name)
    with pytest.raises(ValueError, match="upper case"):
        add_peft_type("sparse_peft_x")


def test_reexports_are_pefts_own_classes():
    assert sparse_peft.PeftModel is peft.PeftModel
    assert sparse_peft.AutoPeftModelForCausalLM is peft.AutoPeftModelForCausalLM


def test_importing_a_loader_from_sparse_peft_registers_in_a_fresh_process():
    result = run_python(
        "from sparse_peft import PeftModel\nfrom peft.utils import PeftType\nprint(PeftType.SPARSE_PEFT_LIFT.value)"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "SPARSE_PEFT_LIFT"
