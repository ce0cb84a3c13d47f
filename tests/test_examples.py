"""Every script in ``examples/`` runs to its own successful check, on the tiny model (``SPARSE_PEFT_EXAMPLE_TINY=1``).

Each example runs in a fresh interpreter, as a user runs it, with nothing downloaded; it exits with 0 only when its
own check passes and then prints ``OK <name>: ...``. A static test makes sure that no example goes without a test, a
documented run command or a README entry.
"""

from __future__ import annotations

import ast
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

EXAMPLES = REPO / "examples"

#: Examples run as ``python examples/<name>.py OUT`` with nothing special needed.
PLAIN = ("sft_trl", "dpo_wrapped", "prune_spp_merge", "plain_loop", "combine_adapters", "convert_to_lora")


def example_env() -> dict[str, str]:
    return {
        **os.environ,
        "SPARSE_PEFT_EXAMPLE_TINY": "1",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(REPO),  # this checkout's sparse_peft, whatever is installed
    }


def check(result: subprocess.CompletedProcess, name: str) -> None:
    output = result.stdout[-3000:] + result.stderr[-5000:]
    assert result.returncode == 0, output
    assert f"OK {name}:" in result.stdout, output


def run_example(name: str, out: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, str(EXAMPLES / f"{name}.py"), str(out)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=example_env(), cwd=REPO)


@pytest.mark.parametrize("name", PLAIN)
def test_example_runs(name, tmp_path):
    check(run_example(name, tmp_path / "out"), name)


def test_qlora_4bit(tmp_path):
    pytest.importorskip("bitsandbytes")
    check(run_example("qlora_4bit", tmp_path / "out"), "qlora_4bit")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_accelerate_ddp(tmp_path):
    """The documented command, two processes over gloo on the CPU (a free port, so other launches cannot collide)."""
    accelerate = shutil.which("accelerate")
    if accelerate is None:
        pytest.fail("the accelerate command is not installed (it is a dependency of sparse_peft)")
    command = [
        accelerate, "launch", "--config_file", str(EXAMPLES / "accelerate_config.yaml"),
        "--main_process_port", str(_free_port()), str(EXAMPLES / "accelerate_ddp.py"), str(tmp_path / "out"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=example_env(), cwd=REPO)
    check(result, "accelerate_ddp")
    assert "processes: 2, wrapped as DistributedDataParallel" in result.stdout, result.stdout[-3000:]


def example_names() -> list[str]:
    return sorted(p.stem for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))


def test_every_example_has_a_test_a_run_command_and_a_readme_entry():
    names = example_names()
    assert names, f"no examples found in {EXAMPLES}"
    untested = [n for n in names if n not in PLAIN and f"test_{n}" not in globals()]
    assert not untested, f"examples without a test in tests/test_examples.py: {untested}"
    gone = [n for n in PLAIN if n not in names]
    assert not gone, f"tests/test_examples.py runs examples that do not exist: {gone}"
    readme = (REPO / "README.md").read_text()
    for name in names:
        tree = ast.parse((EXAMPLES / f"{name}.py").read_text())
        doc = ast.get_docstring(tree) or ""
        assert f"examples/{name}.py" in doc, f"{name}.py: its docstring does not say how to run it"
        assert "SPARSE_PEFT_EXAMPLE_TINY=1" in doc, f"{name}.py: its docstring does not mention the tiny mode"
        functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        assert "main" in functions and "__main__" in (EXAMPLES / f"{name}.py").read_text(), name
        assert f"(examples/{name}.py)" in readme, f"README.md does not link examples/{name}.py"
