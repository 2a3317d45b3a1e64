"""A process as /proc shows it: its status fields, and whether its seccomp filter is on.

The confinement tests read a relay's ids, capabilities and seccomp mode with `status`,
and the harnesses wait with `wait_confined` until a relay that confines itself has done
so. A `serve` relay binds its socket files before it confines itself (the filesystem
is out of reach after), so a socket file's appearance says nothing of the confinement
yet: the janitor's start and the raw ICMP sockets change the relay's descriptors after
it, and anything measured of the relay before `Seccomp: 2` is not the relay that serves.
"""

from __future__ import annotations

import subprocess

from support.faultkit import wait_until


def status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict of its fields (values stripped)."""
    with open(f"/proc/{pid}/status") as f:
        return {key: value.strip() for key, _, value in (line.partition(":") for line in f)}


def seccomp_mode(pid: int) -> str:
    """The process's seccomp mode ("0" none, "2" a filter), or "" once it is gone."""
    try:
        return status(pid).get("Seccomp", "")
    except OSError:
        return ""


def wait_confined(proc: subprocess.Popen,  # type: ignore[type-arg]
                  timeout_s: float = 30) -> dict[str, str]:
    """The process's status once its seccomp filter is on (the last step of the
    relay's confinement); AssertionError if it exits first or takes `timeout_s`."""
    wait_until(lambda: seccomp_mode(proc.pid) == "2", timeout_s,
               "the relay's seccomp filter", proc)
    return status(proc.pid)
