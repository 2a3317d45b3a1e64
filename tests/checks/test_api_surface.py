"""The public API: `relaynat.__all__` resolves and is documented, the package passes
`mypy --strict` (pyproject.toml's [tool.mypy]) and ships its types (PEP 561), the code
passes `ruff check`, and pdoc renders the API pages without a warning. mypy, ruff and
pdoc come with the `test` extra.
"""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pdoc.doc

import relaynat

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
    done = _run("-m", "pdoc", "relaynat", "relaynat.testing", "-o", str(out))
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
