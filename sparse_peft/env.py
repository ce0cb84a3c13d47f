"""``sparse-peft env``: the versions that matter for a bug report, checked against the tested set.

The tested set is ``constraints.txt`` at the project root (what ``.ci/run`` and the README install through); the
package ships a copy, ``sparse_peft/constraints.txt``, so an installed wheel can check itself. A test keeps the two
equal.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import os
import platform
import sys
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import Version

from .compat import active_conflicts, installed_version
from .sparse.io import atomic_write

#: the packages whose versions ``sparse-peft env`` reports, in that order
REPORTED = ("torch", "peft", "transformers", "trl", "accelerate", "bitsandbytes", "datasets", "gguf", "safetensors")
#: never pinned by ``--freeze``: installers and the project itself (as in ``pip freeze``)
_NOT_PINNED = frozenset({"pip", "setuptools", "wheel", "distribute", "sparse-peft"})

FREEZE_HEADER = """\
# The tested set: the exact versions the test suite passed with (Python {python}, {machine}).
# Install through it so a fresh machine reproduces this set whatever the registries publish next:
#   pip install torch=={torch} && pip install -c constraints.txt -e ".[dev]"
# Refresh (README, "The tested set"): in a new virtual environment install the newest releases, run the suite,
# and only if it passes write the new set with `sparse-peft env --freeze constraints.txt`.
# sparse_peft/constraints.txt is the copy shipped in the package for `sparse-peft env`; a test keeps them equal.
"""


def parse_pins(text: str) -> dict[str, Version]:
    """``{canonical name: version}`` of every ``name==version`` line of a constraints file.

    Comments and blank lines are skipped; any other line is an error that names it (a tested set pins exactly).
    """
    pins: dict[str, Version] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not name.strip() or not version.strip():
            raise ValueError(f"constraints line {number} is not 'name==version': {raw!r}")
        pins[canonicalize_name(name.strip())] = Version(version.strip())
    return pins


def tested_set() -> dict[str, Version]:
    """The pins shipped with the package (``sparse_peft/constraints.txt``)."""
    text = importlib.resources.files("sparse_peft").joinpath("constraints.txt").read_text(encoding="utf-8")
    return parse_pins(text)


def same_release(installed: Version, pinned: Version) -> bool:
    """Equal as ``==`` compares them: a pin without a local label admits any (``2.13.0`` admits ``2.13.0+cpu``)."""
    return installed == pinned if pinned.local else Version(installed.public) == pinned


def outside_tested_set(pins: dict[str, Version], names: tuple[str, ...] = REPORTED) -> list[str]:
    """One warning line per reported package that is missing or not at its tested version."""
    warnings = []
    for name in names:
        pinned = pins.get(canonicalize_name(name))
        installed = installed_version(name)
        if pinned is None:
            warnings.append(f"WARNING: {name} is not in the tested set")
        elif installed is None:
            warnings.append(f"WARNING: {name} is not installed (tested: {pinned})")
        elif not same_release(installed, pinned):
            warnings.append(f"WARNING: {name} {installed} is outside the tested set (tested: {pinned})")
    return warnings


def _accelerator() -> str:
    import torch

    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        return f"CUDA {torch.version.cuda}: {names}"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "MPS"
    return "none (CPU only)"


def report_lines() -> list[str]:
    """The report ``sparse-peft env`` prints: versions, machine, then every warning and known conflict."""
    from ._version import __version__

    lines = [
        f"- sparse_peft version: {__version__}",
        f"- Platform: {platform.platform()}",
        f"- Python version: {platform.python_version()}",
        f"- CPU cores: {os.cpu_count()}",
        f"- Accelerator: {_accelerator()}",
    ]
    lines += [f"- {name} version: {installed_version(name) or 'not installed'}" for name in REPORTED]
    pins = tested_set()
    warnings = outside_tested_set(pins)
    lines.append("")
    lines += warnings or ["All reported packages are at their tested versions (sparse_peft/constraints.txt)."]
    lines += [f"KNOWN CONFLICT: {conflict.message()}" for conflict in active_conflicts()]
    return lines


def freeze_text() -> str:
    """The running environment as a tested set: every installed distribution but installers and this project."""
    pins = {}
    for dist in importlib.metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"] or "")
        if name and name not in _NOT_PINNED:
            version = Version(dist.version)
            # torch's local label (+cpu) names a build, not a release: `torch==2.13.0` admits it
            pins[name] = version.public if name == "torch" else str(version)
    torch_version = pins.get("torch", "?")
    header = FREEZE_HEADER.format(python=platform.python_version(), machine=platform.machine(), torch=torch_version)
    return header + "".join(f"{name}=={pins[name]}\n" for name in sorted(pins))


def freeze(path: str | Path) -> None:
    """Write :func:`freeze_text` to ``path`` atomically (a new file or a complete replacement, never half)."""
    text = freeze_text()
    parse_pins(text)  # a freeze must read back as a tested set

    def write(tmp: str) -> None:
        Path(tmp).write_text(text, encoding="utf-8")

    atomic_write(str(path), write)


def main(freeze_path: str | None = None) -> int:
    if freeze_path is not None:
        freeze(freeze_path)
        print(f"tested set written to {freeze_path}; copy it to sparse_peft/constraints.txt too", file=sys.stderr)
        return 0
    print("\n".join(report_lines()))
    return 0
