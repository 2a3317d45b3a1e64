"""`relaynat demo`, the README's first command, as a user runs it: the real CLI, its
own private namespace, a namespace guest downloading from host loopback through the
relay. The guest is an unprivileged id outside its user namespace, so this also checks
that the demo finds an interpreter and a directory that id may use.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_demo_downloads_intact() -> None:
    done = subprocess.run([sys.executable, "-m", "relaynat", "demo", "--size-mib", "16"],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    server = re.search(r"sha256 ([0-9a-f]{64})", done.stdout)
    guest = re.search(r"guest:  sha256 ([0-9a-f]{64}) \(match\)", done.stdout)
    assert server and guest, done.stdout
    assert server.group(1) == guest.group(1)
    assert "Traceback" not in done.stderr, done.stderr
