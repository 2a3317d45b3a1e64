"""The test lanes stay what tests/README.md says they are.

tests/unit/ runs as an unprivileged user with no namespaces, so nothing in it may be
marked integration or vm, or import what needs root (the sysctl and guest-directory
helpers, relaynat.netns) or a lane above it. Every test under tests/integration/ and
tests/vm/ carries its lane's markers (conftest.py adds them by directory), and every
test file sits in a lane.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
LANES = ("unit", "integration", "vm", "checks")
#: What a unit test may not import: other lanes' tests, and what needs root or a
#: namespace (sysctls of the suite's private namespace, the guests' writable directory,
#: namespace guests themselves).
UNIT_MAY_NOT_IMPORT = ("integration", "vm", "checks", "support.sysctl", "support.guest_fs",
                       "relaynat.netns")


def _collected(*args: str) -> list[str]:
    """The node ids `pytest --collect-only` selects with these arguments."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                          "-p", "no:cacheprovider", *args],
                         cwd=TESTS.parent, capture_output=True, text=True, timeout=120)
    # 0: some collected, 5: none selected; anything else is a collection error.
    assert out.returncode in (0, 5), out.stdout[-3000:] + out.stderr[-3000:]
    return [line for line in out.stdout.splitlines() if "::" in line]


def test_every_test_file_is_in_a_lane_and_each_lane_is_a_package() -> None:
    strays = [str(p.relative_to(TESTS)) for p in TESTS.rglob("test_*.py")
              if p.relative_to(TESTS).parts[0] not in LANES]
    assert not strays, f"test files outside tests/{{{','.join(LANES)}}}/: {strays}"
    for lane in (*LANES, "support"):
        assert (TESTS / lane / "__init__.py").is_file(), lane


def test_nothing_in_the_unit_lane_is_marked_integration_or_vm() -> None:
    assert _collected("tests/unit", "-m", "integration or vm") == []


def test_every_integration_and_vm_test_carries_its_markers() -> None:
    assert _collected("tests/integration", "tests/vm", "-m", "not integration") == []
    assert _collected("tests/vm", "-m", "not vm") == []
    assert _collected("tests/vm"), "the vm lane collected nothing"


@pytest.mark.parametrize("path", sorted((TESTS / "unit").glob("*.py")), ids=lambda p: p.name)
def test_a_unit_test_imports_nothing_that_needs_root_or_a_namespace(path: Path) -> None:
    tree = ast.parse(path.read_text())
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for a in node.names]
    bad = [name for name in imported
           if any(name == b or name.startswith(b + ".") for b in UNIT_MAY_NOT_IMPORT)]
    assert not bad, f"{path.name} imports {bad}: it belongs in tests/integration/"
    plugins = [node for node in ast.walk(tree) if isinstance(node, ast.Name)
               and node.id == "pytest_plugins"]
    assert not plugins, f"{path.name} loads pytest plugins (guest_fs needs root)"
