"""Small Linux namespace helpers shared by the CLI, the demo, tests and benchmarks.

`unshare(2)`, `setns(2)` and `prctl(2)` are not in Python 3.11's `os` module, so they
are called through libc. Network namespaces are per thread: call these before any
thread starts (or from the thread that will do all the socket work).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess

# Namespace flags of clone(2)/unshare(2) (include/uapi/linux/sched.h).
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

#: prctl(2) option (include/uapi/linux/prctl.h).
PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def unshare(flags: int) -> None:
    """unshare(2); raises OSError with the errno on failure."""
    if _libc.unshare(ctypes.c_int(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(0x{flags:x}): {os.strerror(err)}")


def setns(fd: int, nstype: int = 0) -> None:
    """setns(2) into the namespace behind `fd`."""
    if _libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def set_parent_death_signal(signum: int) -> None:
    """prctl(PR_SET_PDEATHSIG): the kernel sends `signum` to this process when its
    parent exits."""
    if _libc.prctl(ctypes.c_int(PR_SET_PDEATHSIG), ctypes.c_ulong(signum), ctypes.c_ulong(0),
                   ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")


def map_root(pid: int | str, uid: int, gid: int) -> None:
    """Map root of the user namespace `pid` ("self" or a process id) is in to `uid` and
    `gid` of the parent user namespace, and nothing else (user_namespaces(7)).

    setgroups is denied first: the kernel requires it before an unprivileged process
    writes gid_map, and it keeps root inside from calling setgroups(2) at all, so it
    can never drop a group that a file's mode denies it by."""
    for name, line in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"),
                       ("gid_map", f"0 {gid} 1")):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(line)


def isolate_network() -> None:
    """Move this process into a fresh network namespace with only `lo`, brought up.

    Used so that a relay's host side, a test or a benchmark can reach nothing but
    loopback and the namespaces it creates itself.
    """
    unshare(CLONE_NEWNET)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
