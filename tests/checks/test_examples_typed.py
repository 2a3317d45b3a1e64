"""The Python examples in examples/ pass `mypy --strict` against the installed relaynat,
as a user's own launcher would: mypy runs outside this checkout (no pyproject.toml
settings, no `mypy_path`), so it finds relaynat only as an installed package and trusts
its annotations only through its py.typed (PEP 561)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PROGRAMS = sorted(EXAMPLES.glob("*.py"))


def test_there_are_python_examples() -> None:
    names = {p.name for p in PROGRAMS}
    assert {"qemu_launcher.py", "sandbox_runtime.py"} <= names, names


def test_examples_pass_mypy_strict_against_the_installed_package(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-color-output",
         "--cache-dir", str(tmp_path / "cache"), "--python-executable", sys.executable,
         *map(str, PROGRAMS)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"mypy failed:\n{done.stdout}{done.stderr}"
