"""The project's ruff configuration forbids reaching into another object's private
attributes in src/ (SLF001): a private access planted in a copy is reported by the
same plain `ruff check` that tests/checks/test_api_surface.py runs on the tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _ruff(project: Path, *paths: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", *paths],
                          cwd=project, capture_output=True,
                          text=True, timeout=120, check=False)


def test_a_planted_private_access_is_reported(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "src", tmp_path / "src",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "src" / "relaynat" / "moving" / "handover.py"
    assert _ruff(tmp_path, "src").returncode == 0
    target.write_text(target.read_text()
                      + "\n\ndef _planted(relay: Relay) -> object:\n    return relay._loop\n")
    done = _ruff(tmp_path, "src")
    assert done.returncode == 1
    assert "SLF001" in done.stdout and "handover.py" in done.stdout, done.stdout
