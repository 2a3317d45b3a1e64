"""The package's layers, checked on its import graph (docs/architecture.md draws them).

Each module belongs to a layer; it may import modules of its own layer or lower ones,
never higher (runtime and annotation-only imports alike). The sans-I/O core (the
top-level modules but the shell's: relay.py, relay_moving.py, relay_dispatch.py,
event_hub.py and guests.py; and link/) imports no I/O module of the
standard library, so hypothesis drives it without sockets or an event loop. The
runtime import graph (imports under `if TYPE_CHECKING:` left out: they never execute)
has no cycle. Each rule is also shown to fail on a violation planted in a copy.
"""

from __future__ import annotations

import ast
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

#: Lowest first. The core and link/ are sans-I/O; transports/ move frames; host/ is the
#: host-socket shell; relay.py and guests.py compose them; netns/ starts guests; control/
#: and moving/ drive a running relay from outside; confinement/ confines its process
#: once they are set up; cli/ and testing/ sit on top.
LAYERS = ("core", "link", "transports", "host", "shell", "netns", "control", "moving",
          "confinement", "top")
SHELL_MODULES = {"relaynat.relay", "relaynat.relay_moving", "relaynat.relay_dispatch",
                 "relaynat.event_hub", "relaynat.guests", "relaynat.audit"}
TOP_PACKAGES = {"cli", "testing"}
#: What the core may not import: the standard library's sockets, event loops, polling,
#: processes and threads. Time, logging and file parsing (a policy file) are allowed.
IO_MODULES = {"socket", "asyncio", "select", "selectors", "fcntl", "subprocess",
              "threading", "signal", "ctypes", "uvloop", "termios"}
#: The package itself (`relaynat`): its lazy façade and `__version__`, importable from
#: anywhere; `__main__` is the interpreter's entry point, imported by nothing.
UNLAYERED = {"relaynat", "relaynat.__main__"}


def layer_of(module: str) -> str:
    """The layer of `module` (a subpackage's `__init__` is its package's)."""
    name = module.split(".")[1]
    if module in SHELL_MODULES:
        return "shell"
    if name in TOP_PACKAGES:
        return "top"
    return name if name in LAYERS else "core"


@dataclass(frozen=True)
class Import:
    source: str
    target: str
    line: int
    runtime: bool  # not under `if TYPE_CHECKING:`


def modules(src: Path) -> dict[str, Path]:
    found = {}
    for path in sorted((src / "relaynat").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(module: str, path: Path, known: dict[str, Path]) -> Iterator[Import]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def walk(node: ast.AST, runtime: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for stmt in child.body:
                    yield from walk_stmt(stmt, False)
                for stmt in child.orelse:
                    yield from walk_stmt(stmt, runtime)
            else:
                yield from walk_stmt(child, runtime)

    def walk_stmt(node: ast.AST, runtime: bool) -> Iterator[Import]:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, node.lineno, runtime)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                # `from relaynat.host import pump` imports the module relaynat.host.pump.
                candidate = f"{base}.{alias.name}"
                yield Import(module, candidate if candidate in known else base,
                             node.lineno, runtime)
        yield from walk(node, runtime)

    yield from walk(ast.parse(path.read_text(), str(path)), True)


def all_imports(known: dict[str, Path]) -> list[Import]:
    """Every import of the modules `known` (from `modules`)."""
    return [imp for name, path in known.items() for imp in imports_of(name, path, known)]


def layer_violations(src: Path) -> list[str]:
    known = modules(src)
    found = []
    for imp in all_imports(known):
        if imp.source in UNLAYERED:
            continue
        here = layer_of(imp.source)
        if imp.target in known and imp.target not in UNLAYERED:
            there = layer_of(imp.target)
            if LAYERS.index(there) > LAYERS.index(here):
                found.append(f"{imp.source}:{imp.line} ({here}) imports {imp.target} "
                             f"({there}), a higher layer")
        elif here in ("core", "link") and imp.target.split(".")[0] in IO_MODULES:
            found.append(f"{imp.source}:{imp.line} ({here}) imports {imp.target}: the "
                         f"core does no I/O")
    return found


def import_cycles(src: Path) -> list[list[str]]:
    known = modules(src)
    graph: dict[str, set[str]] = {name: set() for name in known}
    for imp in all_imports(known):
        if imp.runtime and imp.target in known and imp.target != imp.source:
            graph[imp.source].add(imp.target)
    # Tarjan's strongly connected components: each component of two or more modules
    # (or one importing itself) is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return cycles


def test_every_module_has_a_layer() -> None:
    assert {"relaynat.relay", "relaynat.nat_entry", "relaynat.host.tcp_relay"} <= set(
        modules(SRC)), f"no package sources under {SRC}"
    for name in modules(SRC):
        if name not in UNLAYERED:
            assert layer_of(name) in LAYERS, f"{name} is in no layer"


def test_no_module_imports_a_higher_layer() -> None:
    assert len(all_imports(modules(SRC))) > 200, "the import graph was not read"
    assert layer_violations(SRC) == []


def test_the_import_graph_has_no_cycle() -> None:
    assert import_cycles(SRC) == []


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    shutil.copytree(SRC / "relaynat", tmp_path / "relaynat",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _plant(tree: Path, module: str, line: str) -> None:
    path = tree / (module.replace(".", "/") + ".py")
    path.write_text(path.read_text() + f"\n{line}\n")


@pytest.mark.parametrize(("module", "line"), [
    ("relaynat.window", "import socket"),
    ("relaynat.link.dhcp", "import asyncio"),
    ("relaynat.wire", "from select import epoll"),
    ("relaynat.nat_entry", "from relaynat.host import tcp_flow"),
    ("relaynat.policy", "from relaynat.relay import Relay"),
    ("relaynat.host.pump", "from relaynat.moving.handover import Source"),
    ("relaynat.transports.tap", "from relaynat.netns.guest import NamespaceGuest"),
])
def test_a_planted_layer_violation_is_found(tree: Path, module: str, line: str) -> None:
    assert layer_violations(tree) == []
    _plant(tree, module, line)
    (violation,) = layer_violations(tree)
    assert violation.startswith(f"{module}:")


def test_a_planted_annotation_only_violation_is_found(tree: Path) -> None:
    _plant(tree, "relaynat.udp_flow", "from typing import TYPE_CHECKING\n"
           "if TYPE_CHECKING:\n    from relaynat.host.udp_relay import UdpRelay")
    assert [v.split(":")[0] for v in layer_violations(tree)] == ["relaynat.udp_flow"]


def test_a_planted_cycle_is_found(tree: Path) -> None:
    assert import_cycles(tree) == []
    # Same layer, so only the cycle check can see it.
    _plant(tree, "relaynat.wire", "from relaynat import packet_builder")
    assert import_cycles(tree) == [["relaynat.packet_builder", "relaynat.wire"]]


def test_an_annotation_only_cycle_is_not_one(tree: Path) -> None:
    # `if TYPE_CHECKING:` imports never run: naming a type from a module that imports
    # this one is no cycle.
    _plant(tree, "relaynat.wire", "from typing import TYPE_CHECKING\n"
           "if TYPE_CHECKING:\n    from relaynat.packet_builder import ip_frame")
    assert import_cycles(tree) == []
