"""The docs stay true to the tree: docs/architecture.md's module map names every module
of the package and nothing that is not there, and every relative link in the README
and docs/ leads to a file of the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "relaynat"
MAP_ENTRY = re.compile(r"^- `([\w/]+\.py)`", re.MULTILINE)
#: A backticked path anywhere in the text: a module of the package, or a repository
#: path when it starts with one of the repository's top-level folders.
PATH = re.compile(r"`((?:[\w.-]+/)*[\w.-]+\.py)`")
REPOSITORY_FOLDERS = ("tests/", "benches/", "fuzz/", "examples/", "src/")
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


def _module_map() -> str:
    text = (ROOT / "docs" / "architecture.md").read_text()
    return text.split("\n## Module map\n", 1)[1]


def test_the_module_map_lists_every_module_once() -> None:
    listed = MAP_ENTRY.findall(_module_map())
    modules = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py"))
    assert len(modules) > 60, f"no package sources under {PACKAGE}"
    assert sorted(listed) == modules


def test_every_path_the_architecture_names_exists() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    named = PATH.findall(text)
    assert len(named) > 60
    missing = [path for path in named
               if not (ROOT / path if path.startswith(REPOSITORY_FOLDERS)
                       else PACKAGE / path).is_file()]
    assert missing == []


def test_relative_links_lead_to_files() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in LINK.findall(page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []
