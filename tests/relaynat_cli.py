"""Running the real `relaynat` command from tests and reading its `--stats` output.

`--stats` prints one `counter value` pair per line on stderr when the relay exits;
every integration test that checks counters reads them through `parse_stats`.

The command of `relaynat run` is root of its own user namespace, which is an
unprivileged id outside (`nobody`, as the suite runs as root): it runs the programs and
opens the files that id may, no others. `guest_python` is an interpreter it can run;
guest_fs.py has a directory it may write in.
"""

from __future__ import annotations

import functools
import shutil
import signal
import subprocess
import sys

from relaynat.namespace import command_ids


def relaynat_run(*command: str, options: tuple[str, ...] = (), timeout: float = 120,
                 ) -> subprocess.CompletedProcess[str]:
    """`relaynat run --stats [options] -- command`, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "relaynat", "run", "--stats", *options, "--", *command],
        capture_output=True, text=True, timeout=timeout)


@functools.cache
def guest_python() -> str:
    """A Python 3.11+ that the command of `relaynat run` may execute: this one, unless
    it lives where the command's id may not go (a venv made from an interpreter under
    /root, mode 0700), else the system's. Tried by running it as that id."""
    uid, gid = command_ids()
    for candidate in (sys.executable, shutil.which("python3", path="/usr/local/bin:/usr/bin")):
        if candidate is None:
            continue
        try:
            tried = subprocess.run(
                [candidate, "-c", "import sys; sys.exit(sys.version_info < (3, 11))"],
                user=uid, group=gid, extra_groups=[], cwd="/", capture_output=True, timeout=30)
        except PermissionError:
            continue
        if tried.returncode == 0:
            return candidate
    raise RuntimeError(f"no Python 3.11 that uid {uid} may run (for relaynat run's guests)")


def parse_stats(text: str) -> dict[str, int]:
    """The `--stats` counters found in `text` (other lines are ignored)."""
    stats = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            stats[parts[0]] = int(parts[1])
    return stats


def stop_and_stats(proc: subprocess.Popen[str]) -> tuple[dict[str, int], str]:
    """SIGTERM a `relaynat serve --stats` process; its counters and whole stderr."""
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    return parse_stats(err), err
