"""The docs stay true to the tree: docs/architecture.md's module map names every module
of the package and nothing that is not there, every relative link in the README and
docs/ leads to a file of the repository, every repository path a tracked file names (a
comment's `tests/unit/test_wire.py`) exists, and nothing cites a document outside the
repository."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "relaynat"
MAP_ENTRY = re.compile(r"^- `([\w/]+\.py)`", re.MULTILINE)
#: A backticked path anywhere in the text: a module of the package, or a repository
#: path when it starts with one of the repository's top-level folders.
PATH = re.compile(r"`((?:[\w.-]+/)*[\w.-]+\.py)`")
REPOSITORY_FOLDERS = ("tests/", "benches/", "fuzz/", "examples/", "src/")
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")
#: A path into the repository: not part of a longer path or a URL, nor the label of a
#: link to another project's file (`[docs/usage.md](https://...)`).
REPOSITORY_PATH = re.compile(
    r"(?<![\w/.-])((?:tests|benches|fuzz|examples|docs|src/relaynat)/[\w/.-]*\w"
    r"\.(?:py|sh|md|png))(?!\]\(https?:)")


def _tracked_texts(*suffixes: str) -> Iterator[tuple[str, str]]:
    """(path, text) of every file git tracks whose name ends with one of `suffixes`."""
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             check=True).stdout.decode().split("\0")
    for name in filter(None, listing):
        path = ROOT / name
        if name.endswith(suffixes) and path.is_file():
            yield name, path.read_text(errors="replace")


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


def test_paths_named_in_tracked_files_exist() -> None:
    named = 0
    gone = []
    for name, text in _tracked_texts(".py", ".md", ".sh", ".toml"):
        for number, line in enumerate(text.splitlines(), 1):
            for target in REPOSITORY_PATH.findall(line):
                named += 1
                if not (ROOT / target).exists():
                    gone.append(f"{name}:{number} {target}")
    assert named > 50, "no repository paths found: is this a git checkout?"
    assert gone == [], f"{len(gone)} paths to nothing"


def test_nothing_points_at_a_document_outside_the_repository() -> None:
    # The repository stands alone: what a comment or doc cites must be in it.
    outside = ("DESIGN.md", "STYLE.md", "../shared")
    hits = [f"{name}: {word}"
            for name, text in _tracked_texts(".py", ".md", ".sh", ".toml", ".txt")
            if name != "tests/checks/test_docs.py" for word in outside if word in text]
    assert not hits, hits
