"""`Relay.stats()`'s names stay in step: those the code can produce, those
`relaynat.counters` documents (COUNTERS, PATTERNS) and the tables of docs/stats.md.

The names are read from the package's syntax trees, not by running it. A counter is
produced where one is stored or bumped: a subscript of something named `stats`,
`_stats` or `counters` assigned or augmented (`stats["frames_in"] += 1`,
`self._stats[name] += n`). Its key is followed through what the code does with names:
string constants, conditional expressions, `+`, f-strings (a part that is not a
constant becomes `{}`, an open-ended pattern such as `policy_denied_rule{}`), local
variables (loops over literal tuples included), module constants (imported ones too),
literal dicts subscripted or `.get`, a function's parameter (its default and whatever
every call passes for it, so `relay.count("stream_clients")` reaches `Relay.count`'s
`self._stats[name]`), and `exc.reason`: the reason of every `MalformedFrame` raised
where that exception can come from. A key it cannot follow fails the test: a counter
must be named so that a reader can list it.

The link servers' own counters (link/dhcp.py, link/ndp.py, link/dhcpv6.py) reach
`stats()` prefixed by service, as `LinkServices.counters()` does; each catches its own
`MalformedFrame`s. The transports' counters are their own `stats()`, which
`Relay.stats()` does not include.
"""

from __future__ import annotations

import ast
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "relaynat"
DOC = ROOT / "docs" / "stats.md"

#: What a counter is stored into.
SINKS = {"stats", "_stats", "counters"}
#: The link servers whose `counters` `LinkServices.counters()` reports, by prefix.
LINK_PREFIX = {"link/dhcp.py": "dhcp_", "link/ndp.py": "ndp_", "link/dhcpv6.py": "dhcp6_"}
#: Their counters are the transport's own stats(), not the relay's.
NOT_RELAY = ("transports/",)
#: A placeholder for the open-ended part of a pattern name.
OPEN = "{}"
DOC_ROW = re.compile(r"^\| `([^`]+)` \| (.+?) \|$", re.MULTILINE)


class Unresolved(Exception):
    pass


@dataclass
class Module:
    rel: str
    tree: ast.Module
    parents: dict[ast.AST, ast.AST] = field(default_factory=dict)
    imported_modules: set[str] = field(default_factory=set)
    imported_names: dict[str, str] = field(default_factory=dict)  # name -> module rel


def _rel_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "relaynat":
        return None
    return "/".join(parts[1:]) + ".py"


def load(src: Path) -> dict[str, Module]:
    found = {}
    for path in sorted(src.rglob("*.py")):
        rel = str(path.relative_to(src))
        mod = Module(rel, ast.parse(path.read_text(), rel))
        for node in ast.walk(mod.tree):
            for child in ast.iter_child_nodes(node):
                mod.parents[child] = node
            if isinstance(node, ast.Import):
                mod.imported_modules.update((a.asname or a.name).split(".")[0]
                                            for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                target = _rel_of(node.module)
                for alias in node.names:
                    if target is not None:
                        mod.imported_names[alias.asname or alias.name] = target
        found[rel] = mod
    return found


def _func_of(mod: Module, node: ast.AST) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    while node in mod.parents:
        node = mod.parents[node]
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            return node
    return None


def _const(node: ast.expr) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    raise Unresolved(ast.unparse(node))


class Names:
    """Every name `stats()` can report, as the source produces them."""

    def __init__(self, src: Path) -> None:
        self.modules = load(src)
        self._visiting: set[tuple[int, str]] = set()
        self._call_sites: dict[str, list[tuple[Module, ast.Call]]] = {}
        for mod in self.modules.values():
            for node in ast.walk(mod.tree):
                if isinstance(node, ast.Call) and (name := _name_of(node.func)) is not None:
                    self._call_sites.setdefault(name, []).append((mod, node))
        self.reasons = {rel: self._reasons(mod) for rel, mod in self.modules.items()}
        self.produced: dict[str, str] = {}  # name -> where (the first place seen)
        self.unresolved: list[str] = []
        for mod in self.modules.values():
            if mod.rel.startswith(NOT_RELAY):
                continue
            for node in ast.walk(mod.tree):
                targets: list[ast.expr] = []
                if isinstance(node, ast.AugAssign):
                    targets = [node.target]
                elif isinstance(node, ast.Assign):
                    targets = node.targets
                for target in targets:
                    if isinstance(target, ast.Subscript) and _sink(target.value):
                        self._sink(mod, target)

    def _sink(self, mod: Module, target: ast.Subscript) -> None:
        prefix = LINK_PREFIX.get(mod.rel, "") if _name_of(target.value) == "counters" else ""
        where = f"{mod.rel}:{target.lineno}"
        try:
            names = self.values(mod, target.slice)
        except Unresolved as exc:
            self.unresolved.append(f"{where}: {ast.unparse(target)} (cannot follow {exc})")
            return
        for name in names:
            self.produced.setdefault(prefix + name, where)

    def _reasons(self, mod: Module) -> set[str]:
        out = set()
        for node in ast.walk(mod.tree):
            if isinstance(node, ast.Call) and _name_of(node.func) == "MalformedFrame" \
                    and node.args:
                out |= self.values(mod, node.args[0])
        return out

    # -- following a key --------------------------------------------------------------

    def values(self, mod: Module, node: ast.expr) -> set[str]:
        if isinstance(node, ast.Constant):
            return {_const(node)}
        if isinstance(node, ast.IfExp):
            return self.values(mod, node.body) | self.values(mod, node.orelse)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return {a + b for a in self.values(mod, node.left)
                    for b in self.values(mod, node.right)}
        if isinstance(node, ast.JoinedStr):
            out = {""}
            for part in node.values:
                if isinstance(part, ast.FormattedValue):
                    try:
                        pieces = self.values(mod, part.value)
                    except Unresolved:
                        pieces = {OPEN}
                else:
                    pieces = {_const(part)}
                out = {a + b for a in out for b in pieces}
            return out
        if isinstance(node, ast.Attribute) and node.attr == "reason":
            if mod.rel in LINK_PREFIX:
                return self.reasons[mod.rel]
            return set().union(*(r for rel, r in self.reasons.items()
                                 if rel not in LINK_PREFIX))
        if isinstance(node, ast.Name):
            return self._name(mod, node)
        if isinstance(node, ast.Subscript):
            return self._dict_values(mod, node.value)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "get"):
            out = self._dict_values(mod, node.func.value)
            for arg in node.args[1:2]:
                out |= self.values(mod, arg)
            return out
        raise Unresolved(ast.unparse(node))

    def _dict_values(self, mod: Module, node: ast.expr) -> set[str]:
        literal = self._literal(mod, node)
        if not isinstance(literal, ast.Dict):
            raise Unresolved(ast.unparse(node))
        out: set[str] = set()
        for value in literal.values:
            out |= self.values(mod, value)
        return out

    def _literal(self, mod: Module, node: ast.expr) -> ast.expr | None:
        """The literal a name is bound to (once, in its function or its module)."""
        if not isinstance(node, ast.Name):
            return node
        func = _func_of(mod, node)
        scopes: list[ast.AST] = [func] if func is not None else []
        for scope in [*scopes, mod.tree]:
            bound = [a.value for a in _assignments(scope, node.id)
                     if isinstance(a, ast.Assign | ast.AnnAssign) and a.value is not None]
            if bound:
                return bound[0] if len(bound) == 1 else None
        return None

    def _name(self, mod: Module, node: ast.Name) -> set[str]:
        func = _func_of(mod, node)
        if func is not None:
            out: set[str] = set()
            found = False
            for binding in _assignments(func, node.id):
                found = True
                out |= self._binding(mod, binding, node.id)
            params = func.args.posonlyargs + func.args.args + func.args.kwonlyargs
            if any(p.arg == node.id for p in params):
                found = True
                out |= self._parameter(mod, func, node.id)
            if found:
                return out
        bound = [a for a in _assignments(mod.tree, node.id) if isinstance(a, ast.Assign)]
        if bound:
            return set().union(*(self.values(mod, a.value) for a in bound))
        if node.id in mod.imported_names and mod.imported_names[node.id] in self.modules:
            there = self.modules[mod.imported_names[node.id]]
            return self._name(there, ast.Name(node.id, ast.Load()))
        raise Unresolved(node.id)

    def _binding(self, mod: Module, binding: ast.AST, name: str) -> set[str]:
        if isinstance(binding, ast.Assign | ast.AnnAssign) and binding.value is not None:
            return self.values(mod, binding.value)
        if isinstance(binding, ast.For) and isinstance(binding.target, ast.Tuple):
            # `for name, part in parts`, `parts` a literal of tuples: each tuple's item.
            index = [isinstance(e, ast.Name) and e.id == name for e in binding.target.elts]
            rows = self._literal(mod, binding.iter)
            if isinstance(rows, ast.Tuple | ast.List) and True in index:
                i = index.index(True)
                out: set[str] = set()
                for row in rows.elts:
                    if not isinstance(row, ast.Tuple | ast.List):
                        raise Unresolved(ast.unparse(row))
                    out |= self.values(mod, row.elts[i])
                return out
        raise Unresolved(f"{name} bound by {ast.unparse(binding).splitlines()[0]}")

    def _parameter(self, mod: Module, func: ast.FunctionDef | ast.AsyncFunctionDef,
                   name: str) -> set[str]:
        key = (id(func), name)
        if key in self._visiting:
            return set()
        self._visiting.add(key)
        try:
            return self._calls(mod, func, name)
        finally:
            self._visiting.discard(key)

    def _calls(self, mod: Module, func: ast.FunctionDef | ast.AsyncFunctionDef,
               name: str) -> set[str]:
        args = func.args
        positional = [p.arg for p in args.posonlyargs + args.args]
        out: set[str] = set()
        defaults = dict(zip(positional[len(positional) - len(args.defaults):], args.defaults,
                            strict=True))
        defaults.update((p.arg, d) for p, d in zip(args.kwonlyargs, args.kw_defaults,
                                                   strict=True) if d is not None)
        if name in defaults:
            out |= self.values(mod, defaults[name])
        method = isinstance(mod.parents.get(func), ast.ClassDef) and positional[:1] in (
            ["self"], ["cls"])
        index = positional.index(name) - method if name in positional else None
        for caller, call in self._call_sites.get(func.name, []):
            if method != isinstance(call.func, ast.Attribute):
                continue
            receiver = call.func.value if isinstance(call.func, ast.Attribute) else None
            if isinstance(receiver, ast.Name) and receiver.id in caller.imported_modules:
                continue  # itertools.count(), not ours
            for kw in call.keywords:
                if kw.arg == name:
                    out |= self.values(caller, kw.value)
            if index is not None and index < len(call.args):
                arg = call.args[index]
                if isinstance(arg, ast.Starred):
                    raise Unresolved(ast.unparse(call))
                out |= self.values(caller, arg)
        return out


def _name_of(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _sink(node: ast.expr) -> bool:
    return _name_of(node) in SINKS


def _assignments(scope: ast.AST, name: str) -> Iterator[ast.AST]:
    """Statements that bind `name` in `scope` (not in functions nested in it)."""
    todo = list(ast.iter_child_nodes(scope))
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda):
            continue
        todo.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Assign):
            if any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                yield node
        elif isinstance(node, ast.AnnAssign | ast.AugAssign):
            if isinstance(node.target, ast.Name) and node.target.id == name:
                yield node
        elif isinstance(node, ast.For | ast.comprehension) and any(
                isinstance(t, ast.Name) and t.id == name for t in ast.walk(node.target)):
            yield node


# -- what relaynat.counters and docs/stats.md say ---------------------------------------

def _pattern(name: str) -> str:
    """`policy_denied_rule{N}` as the source's `policy_denied_rule{}`."""
    return re.sub(r"\{[^}]*\}", OPEN, name)


def _matches(pattern: str, name: str) -> bool:
    return re.fullmatch(".+".join(map(re.escape, pattern.split(OPEN))), name) is not None


def disagreements(src: Path, counters: dict[str, str], patterns: dict[str, str],
                  doc: str) -> list[str]:
    """What is out of step between the code under `src`, COUNTERS and PATTERNS, and
    docs/stats.md's text `doc`; [] when nothing."""
    names = Names(src)
    problems = list(names.unresolved)
    fixed = {n: w for n, w in names.produced.items() if OPEN not in n}
    open_ = {n: w for n, w in names.produced.items() if OPEN in n}
    documented_patterns = {_pattern(p) for p in patterns}
    for name, where in sorted(fixed.items()):
        if name not in counters:
            problems.append(f"{where} produces {name!r}, which COUNTERS lacks")
    for pattern, where in sorted(open_.items()):
        if pattern.replace(OPEN, "") == "":
            problems.append(f"{where} produces names it does not say (a pattern of nothing)")
        elif pattern not in documented_patterns:
            problems.append(f"{where} produces {pattern!r}, which PATTERNS lacks")
    for name in counters:
        if name not in fixed and not any(_matches(p, name) for p in open_):
            problems.append(f"COUNTERS has {name!r}, which no code produces")
    for pattern in patterns:
        if _pattern(pattern) not in open_:
            problems.append(f"PATTERNS has {pattern!r}, which no code produces")
    rows = DOC_ROW.findall(doc)
    in_doc = dict(rows)
    if len(in_doc) != len(rows):
        problems.append("docs/stats.md lists a name twice")
    for name, meaning in {**counters, **patterns}.items():
        if name not in in_doc:
            problems.append(f"docs/stats.md lacks {name!r}")
        elif in_doc[name] != meaning:
            problems.append(f"docs/stats.md says of {name!r} {in_doc[name]!r}, "
                            f"relaynat.counters {meaning!r}")
    for name in in_doc:
        if name not in counters and name not in patterns:
            problems.append(f"docs/stats.md lists {name!r}, which relaynat.counters lacks")
    return problems


def _documented() -> tuple[dict[str, str], dict[str, str]]:
    from relaynat.counters import COUNTERS, PATTERNS
    return dict(COUNTERS), dict(PATTERNS)


def test_the_counters_the_code_produces_are_the_documented_ones() -> None:
    counters, patterns = _documented()
    assert len(counters) > 150, "the source's counters were not found"
    assert disagreements(SRC, counters, patterns, DOC.read_text()) == []


def test_the_link_prefixes_are_those_of_link_services() -> None:
    """LINK_PREFIX says what `LinkServices.counters()` does: each server's counters
    under its prefix, the server built from its module's class."""
    mod = load(SRC)["link/services.py"]
    method = next(n for n in ast.walk(mod.tree)
                  if isinstance(n, ast.FunctionDef) and n.name == "counters")
    pairs = [(e.elts[0].value, e.elts[1]) for e in ast.walk(method)
             if isinstance(e, ast.Tuple) and len(e.elts) == 2
             and isinstance(e.elts[0], ast.Constant) and isinstance(e.elts[1], ast.Attribute)]
    assert 'f"{prefix}_{key}"' in ast.unparse(method).replace("'", '"')
    built = {ast.unparse(a.targets[0]): a.value for a in ast.walk(mod.tree)
             if isinstance(a, ast.Assign) and isinstance(a.value, ast.Call)}
    found = {}
    for prefix, counters in pairs:
        assert isinstance(counters.value, ast.Attribute) and counters.attr == "counters"
        server = built[ast.unparse(counters.value)]
        assert isinstance(server, ast.Call) and isinstance(server.func, ast.Name)
        found[mod.imported_names[server.func.id]] = f"{prefix}_"
    assert found == LINK_PREFIX


# -- the check fails when something is out of step -----------------------------------------

@pytest.fixture()
def planted(tmp_path: Path) -> Path:
    copy = tmp_path / "relaynat"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def _plant(src: Path, rel: str, old: str, new: str) -> None:
    path = src / rel
    text = path.read_text()
    assert old in text, (rel, old)
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize(("rel", "old", "new", "expect"), [
    # A new counter bumped directly.
    ("relay.py", 'stats["frames_in"] += 1',
     'stats["frames_in"] += 1\n        stats["frames_planted"] += 1',
     "produces 'frames_planted', which COUNTERS lacks"),
    # A new malformed-frame reason, counted as drop_<reason>.
    ("wire.py", 'raise MalformedFrame("arp_format")', 'raise MalformedFrame("arp_planted")',
     "produces 'drop_arp_planted', which COUNTERS lacks"),
    # A new name passed through Relay.count.
    ("transports/stream.py", 'relay.count("stream_clients")',
     'relay.count("stream_planted")', "produces 'stream_planted', which COUNTERS lacks"),
    # A link server's counter, prefixed.
    ("link/ndp.py", 'self.counters["ns_answered"] += 1', 'self.counters["ns_planted"] += 1',
     "produces 'ndp_ns_planted', which COUNTERS lacks"),
    # A counter that is no longer produced.
    ("host/udp_relay.py", 'stats["udp_to_guest"] += 1', "pass",
     "COUNTERS has 'udp_to_guest', which no code produces"),
    # A name the check cannot follow.
    ("relay.py", 'stats["frames_in"] += 1', 'stats[str(frame[0])] += 1',
     "cannot follow"),
])
def test_the_check_fails_on_a_counter_out_of_step(planted: Path, rel: str, old: str,
                                                  new: str, expect: str) -> None:
    counters, patterns = _documented()
    doc = DOC.read_text()
    _plant(planted, rel, old, new)
    problems = disagreements(planted, counters, patterns, doc)
    assert any(expect in p for p in problems), problems


def test_the_check_fails_on_docs_out_of_step() -> None:
    counters, patterns = _documented()
    doc = DOC.read_text()
    row = f"| `frames_in` | {counters['frames_in']} |"
    assert row in doc
    problems = disagreements(SRC, counters, patterns, doc.replace(row, ""))
    assert problems == ["docs/stats.md lacks 'frames_in'"]
    problems = disagreements(SRC, counters, patterns,
                             doc.replace(row, "| `frames_in` | Frames. |"))
    assert len(problems) == 1 and "docs/stats.md says of 'frames_in'" in problems[0]
    problems = disagreements(SRC, counters, patterns, doc + "| `frames_planted` | x |\n")
    assert problems == ["docs/stats.md lists 'frames_planted', which relaynat.counters lacks"]
