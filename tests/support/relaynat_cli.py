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
import signal
import subprocess
import sys

from relaynat.netns.guest import python_for_command


def relaynat_run(*command: str, options: tuple[str, ...] = (), timeout: float = 120,
                 ) -> subprocess.CompletedProcess[str]:
    """`relaynat run --stats [options] -- command`, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "relaynat", "run", "--stats", *options, "--", *command],
        capture_output=True, text=True, timeout=timeout)


@functools.cache
def guest_python() -> str:
    """A Python 3.11+ that the command of `relaynat run` may execute."""
    return python_for_command()


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
