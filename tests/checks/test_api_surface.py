"""The public API: `relaynat.__all__` resolves and is documented, the package passes
`mypy --strict` (pyproject.toml's [tool.mypy]) and ships its types (PEP 561), the code
passes `ruff check`, pdoc renders the API pages without a warning, every exception is a
`relaynat.Error`, and the documents' examples import only the public API. mypy, ruff
and pdoc come with the `test` extra.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pdoc.doc

import relaynat
import relaynat.testing

ROOT = Path(__file__).resolve().parents[2]
#: The directory holding the relaynat under test, first on the children's path, so
#: mypy and pdoc see the same sources as this process.
SRC = Path(relaynat.__file__).resolve().parent.parent


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


def _public_names() -> dict[str, object]:
    return {name: getattr(relaynat, name) for name in relaynat.__all__}


def test_mypy_strict_passes_on_the_package(tmp_path: Path) -> None:
    # pyproject.toml's [tool.mypy] makes this `mypy --strict src/relaynat`; a fresh cache
    # keeps runs independent of each other (about 10 s on two cores).
    done = _run("-m", "mypy", "--cache-dir", str(tmp_path / "cache"), "--no-color-output")
    assert done.returncode == 0, f"mypy failed:\n{done.stdout}{done.stderr}"
    assert "Success: no issues found" in done.stdout, done.stdout


def test_ruff_passes_on_sources_and_tests() -> None:
    # pyproject.toml's [tool.ruff]: the same check a developer runs before committing.
    done = _run("-m", "ruff", "check", "--no-cache", "src", "tests", "benches", "fuzz",
                "examples")
    assert done.returncode == 0, f"ruff failed:\n{done.stdout}{done.stderr}"


def test_the_wheel_ships_its_types(tmp_path: Path) -> None:
    # PEP 561: without py.typed a user's mypy treats an installed relaynat as untyped.
    assert (SRC / "relaynat" / "py.typed").is_file()
    # Built from a copy: setuptools writes build/ and *.egg-info beside the sources.
    project = tmp_path / "project"
    shutil.copytree(SRC / "relaynat", project / "src" / "relaynat",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
                           str(project)], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "dist").glob("relaynat-*.whl")
    assert "relaynat/py.typed" in zipfile.ZipFile(wheel).namelist()


def test_every_public_name_resolves_and_has_a_docstring() -> None:
    names = _public_names()
    assert names, "relaynat.__all__ is empty"
    undocumented = []
    for name, obj in names.items():
        if not (inspect.getdoc(obj) or "").strip():
            undocumented.append(name)
        if not inspect.isclass(obj) or issubclass(obj, BaseException):
            continue
        # Every public method and property the class defines itself (its own or, for a
        # transport, the FrameTransport protocol's docstring, which getdoc finds).
        for attr, value in vars(obj).items():
            member = callable(value) or isinstance(value, (property, classmethod))
            if attr.startswith("_") or not member:
                continue
            if not (inspect.getdoc(getattr(obj, attr)) or "").strip():
                undocumented.append(f"{name}.{attr}")
    assert not undocumented, f"public API without a docstring: {undocumented}"


#: Modules whose pages pdoc renders: the public API and the testing kit's modules.
API_MODULES = ("relaynat", "relaynat.testing", "relaynat.testing.frames",
               "relaynat.testing.strategies", "relaynat.testing.sink")


def _own_docstring(obj: object) -> str:
    """The docstring `obj` was written with: a dataclass without one gets its signature
    as __doc__, which documents nothing."""
    doc = inspect.getdoc(obj) or ""
    if inspect.isclass(obj) and doc.startswith(f"{obj.__name__}("):
        return ""
    return doc.strip()


def test_every_testing_kit_name_is_documented() -> None:
    """What a test of the kit touches: relaynat.testing's names (the replies' types
    among them) and the public functions and classes of its modules."""
    undocumented = []
    for name in relaynat.testing.__all__:
        obj = getattr(relaynat.testing, name)
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and not _own_docstring(obj):
            undocumented.append(name)
    for module_name in API_MODULES[2:]:
        module = importlib.import_module(module_name)
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
                continue
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and not _own_docstring(obj):
                undocumented.append(f"{module_name}.{name}")
    assert not undocumented, f"testing kit without a docstring: {undocumented}"


#: Each public exception and the builtin base it had before `relaynat.Error`, which it
#: keeps so that an `except ValueError` written then goes on catching it.
BUILTIN_BASES: dict[str, type[BaseException]] = {
    "ConfigError": ValueError,
    "FlowStateError": ValueError,
    "ForwardError": ValueError,
    "HandoverError": Exception,
    "InterfaceError": OSError,
    "NamespaceSetupError": RuntimeError,
    "ConfinementError": RuntimeError,
    "RelayClosedError": RuntimeError,
    "RepairError": OSError,
}


def test_every_public_exception_is_an_error_and_keeps_its_builtin_base() -> None:
    public = {name for name, obj in _public_names().items()
              if inspect.isclass(obj) and issubclass(obj, BaseException)}
    assert public == {"Error", *BUILTIN_BASES}, sorted(public)
    assert issubclass(relaynat.Error, Exception)
    for name, base in BUILTIN_BASES.items():
        cls = getattr(relaynat, name)
        assert issubclass(cls, relaynat.Error), f"{name} is not a relaynat.Error"
        assert issubclass(cls, base), f"{name} is no longer a {base.__name__}"
    try:
        raise relaynat.ConfigError("mtu: too small")
    except ValueError as exc:  # caught as before relaynat.Error existed
        assert isinstance(exc, relaynat.Error)


def test_every_exception_class_in_the_package_is_an_error() -> None:
    """Internal ones too: an exception that escapes through the public API (a testing
    kit's `MalformedFrame`, a control request's error) is caught by `except Error`."""
    strays = []
    for info in pkgutil.walk_packages(relaynat.__path__, "relaynat."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException)
                    and obj.__module__ == info.name and not issubclass(obj, relaynat.Error)
                    and not name.startswith("_")):
                strays.append(f"{info.name}.{name}")
    assert not strays, f"exceptions that are not a relaynat.Error: {strays}"


def test_relay_config_fields_are_documented() -> None:
    _public_names()  # the lazy names load on access; pdoc reads the module's dict
    config = pdoc.doc.Module(relaynat).get("RelayConfig")
    assert isinstance(config, pdoc.doc.Class)
    fields = {m.name: m.docstring for m in config.members.values()
              if isinstance(m, pdoc.doc.Variable) and not m.name.startswith("_")}
    assert "mtu" in fields and "max_tcp_flows" in fields, sorted(fields)
    assert not [n for n, doc in fields.items() if not doc.strip()], fields


def test_pdoc_renders_the_api_without_warnings(tmp_path: Path) -> None:
    out = tmp_path / "api"
    done = _run("-m", "pdoc", *API_MODULES, "-o", str(out))
    # pdoc reports everything it could not render (unresolvable annotations, names in
    # __all__ that do not resolve, failed imports) as Python warnings on stderr.
    assert done.returncode == 0 and not done.stderr.strip(), \
        f"pdoc failed or warned:\n{done.stdout}{done.stderr}"
    page = (out / "relaynat.html").read_text()
    for name in relaynat.__all__:
        assert f'id="{name}"' in page, f"{name} has no section in relaynat.html"
    first_line = inspect.getdoc(relaynat.Relay).splitlines()[0]
    assert first_line in page, "Relay's docstring is not on its page"
    # A field's attribute docstring, and a method's, rendered under their class.
    assert 'id="RelayConfig.mtu"' in page and "The link MTU DHCP" in page
    assert 'id="Relay.add_forward"' in page
    testing = (out / "relaynat" / "testing.html").read_text()
    assert 'id="InMemoryGuest"' in testing and 'id="valid_frames"' in testing
    # The replies' types have sections, fields included, on the kit's page.
    for name in ("Reply", "EthernetFrame", "ArpPacket", "Ipv4Packet", "Ipv6Packet",
                 "TcpSegment", "UdpDatagram", "MalformedFrame", "SYN", "ACK"):
        assert f'id="{name}"' in testing, f"{name} has no section in relaynat/testing.html"
    assert 'id="TcpSegment.flags"' in testing and 'id="Reply.tcp"' in testing
    frames = (out / "relaynat" / "testing" / "frames.html").read_text()
    for name in ("LabeledFrame", "LabeledFrame.expect", "tcp_segment", "truncated", "SYN"):
        assert f'id="{name}"' in frames, f"{name} has no section in frames.html"
    assert 'id="broken_frames"' in (out / "relaynat" / "testing" / "strategies.html").read_text()
    assert 'id="Sink"' in (out / "relaynat" / "testing" / "sink.html").read_text()


def test_importing_relaynat_loads_no_relay_machinery() -> None:
    # The public names load their modules on first access (PEP 562), so that the
    # namespace child and the CLI's control client start without numpy, dpkt, asyncio.
    done = _run("-c", "import sys, relaynat; relaynat.RelayConfig; print(sorted("
                "m for m in ('numpy', 'dpkt', 'asyncio', 'relaynat.relay') if m in sys.modules))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
    done = _run("-c", "import sys; from relaynat import Relay; print('relaynat.relay' in "
                "sys.modules, Relay.__module__)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "relaynat.relay"], done.stdout


def test_readme_programs_type_check_against_the_api(tmp_path: Path) -> None:
    # The README's complete programs (those that end in asyncio.run) must keep matching
    # the API they show; fragments between them are not programs and are left out.
    text = (ROOT / "README.md").read_text()
    blocks = [block.split("```", 1)[0] for block in text.split("```python\n")[1:]]
    programs = [block for block in blocks if "asyncio.run(" in block]
    assert len(programs) >= 2, "the README lost its embedding programs"
    files = []
    for i, program in enumerate(programs):
        files.append(tmp_path / f"readme_{i}.py")
        files[-1].write_text(program)
    done = _run("-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"),
                "--no-color-output", *map(str, files))
    assert done.returncode == 0, f"README programs fail mypy:\n{done.stdout}{done.stderr}"


#: Where a document's example may import from: the public API and the testing kit.
PUBLIC_MODULES = frozenset({"relaynat", "relaynat.testing"})
_IMPORT = re.compile(r"^\s*(?:from\s+(relaynat[\w.]*)\s+import|import\s+(relaynat[\w.]*))",
                     re.MULTILINE)


def _example_code() -> dict[str, str]:
    """Every example a reader may copy: the Python blocks of README.md, docs/ and
    examples/ documents, and the files in examples/ (scripts may embed Python)."""
    code: dict[str, str] = {}
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
                 *sorted((ROOT / "examples").glob("*.md"))]
    for path in documents:
        blocks = re.findall(r"^```(?:python|py|pycon)\n(.*?)^```", path.read_text(),
                            re.MULTILINE | re.DOTALL)
        for i, block in enumerate(blocks):
            code[f"{path.relative_to(ROOT)} block {i + 1}"] = block
    for path in sorted((ROOT / "examples").iterdir()):
        if path.is_file() and path.suffix != ".md":
            code[str(path.relative_to(ROOT))] = path.read_text()
    return code


def test_examples_import_only_the_public_api() -> None:
    code = _example_code()
    assert any("README.md" in where for where in code), "no README examples were read"
    internal = [f"{where}: {module}" for where, text in code.items()
                for match in _IMPORT.finditer(text)
                if (module := match.group(1) or match.group(2)) not in PUBLIC_MODULES]
    assert not internal, ("examples importing internal modules (import the name from "
                          f"relaynat or relaynat.testing): {internal}")


def test_the_example_check_sees_an_internal_import() -> None:
    planted = "```python\nfrom relaynat.relay import Relay\nfrom relaynat import Policy\n```\n"
    blocks = re.findall(r"^```(?:python|py|pycon)\n(.*?)^```", planted, re.MULTILINE | re.DOTALL)
    found = [m.group(1) or m.group(2) for block in blocks for m in _IMPORT.finditer(block)]
    assert found == ["relaynat.relay", "relaynat"]
