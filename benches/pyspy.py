"""Sampling profiles of the relaynat process during a workload (run.py --py-spy DIR).

(Not named profile.py: that would shadow the standard library module cProfile imports.)

py-spy (the bench extra) attaches to the running relay with `--nonblocking`, so the relay
is not paused while sampled; the raw collapsed stacks go to DIR/<workload>.txt and a
summary of where the time went (self time per function, and inclusive time of the
relay's own functions) to DIR/<workload>.top.txt. Only relaynat is profiled: the other
relays are C programs (use perf for those).
"""

from __future__ import annotations

import collections
import contextlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from common import spawned

TOP = 25


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


@contextlib.contextmanager
def profiled(pid: int | None, out: Path | None, name: str, seconds: float) -> Iterator[None]:
    """Sample `pid` for `seconds` while the body runs (no-op without `out` or py-spy)."""
    exe = py_spy()
    if pid is None or out is None or exe is None:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    raw = out / f"{name}.txt"
    argv = [exe, "record", "--nonblocking", "-p", str(pid), "-d", str(max(1, int(seconds))),
            "-r", "250", "-f", "raw", "-o", str(raw)]
    with spawned(argv) as rec:
        yield
        with contextlib.suppress(subprocess.TimeoutExpired):
            rec.popen.wait(timeout=seconds + 10)  # let it write the file before the kill
    if raw.exists():
        (out / f"{name}.top.txt").write_text(summarise(raw))


def summarise(raw: Path) -> str:
    """Self time per function and inclusive time per relaynat function, in % of samples."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            if "relaynat/" in frame:
                inclusive[frame] += n
    if not total:
        return "no samples\n"
    lines = [f"{total} samples", "", "self time:"]
    lines += [f"{100 * n / total:5.1f}%  {f}" for f, n in own.most_common(TOP)]
    lines += ["", "inclusive (relaynat frames):"]
    lines += [f"{100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(TOP)]
    return "\n".join(lines) + "\n"
