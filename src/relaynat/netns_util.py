"""Small Linux namespace helpers shared by the CLI, the demo, tests and benchmarks.

`unshare(2)` and `setns(2)` are not in Python 3.11's `os` module, so they are called
through libc. Network namespaces are per thread: call these before any thread starts
(or from the thread that will do all the socket work).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000

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


def isolate_network() -> None:
    """Move this process into a fresh network namespace with only `lo`, brought up.

    Used so that a relay's host side, a test or a benchmark can reach nothing but
    loopback and the namespaces it creates itself (see the network rule in DESIGN.md).
    """
    unshare(CLONE_NEWNET)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
