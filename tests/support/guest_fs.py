"""The `guest_dir` fixture: a directory the command of `relaynat run` may write in.

That command is root of its own user namespace, an unprivileged id outside (`nobody`,
as the suite runs as root), so pytest's temporary directories (root's, mode 0700) are
closed to it. A module that uses the fixture names this one in `pytest_plugins`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from relaynat.netns.guest import command_ids


@pytest.fixture
def guest_dir() -> Iterator[Path]:
    """A new directory owned by the id that root of `relaynat run`'s command is outside
    its user namespace (mode 0755 in /tmp, which anyone may search): the command writes
    its files there and reads what the test put there; the test, as root, does both."""
    path = Path(tempfile.mkdtemp(prefix="relaynat-guest-"))
    try:
        path.chmod(0o755)
        os.chown(path, *command_ids())
        yield path
    finally:
        shutil.rmtree(path)
