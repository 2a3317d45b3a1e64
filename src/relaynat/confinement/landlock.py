"""Landlock (landlock(7)), where the kernel has it: a second wall behind the empty root.

The domain handles every filesystem access right the running ABI knows, and allows
only reading files beneath the directories given (resolv.conf's, reached through a
descriptor opened before the root went away): were a path ever to lead back to a host
file (a descriptor leaked in, a mount the filter missed), opening, writing, creating,
removing or executing it is still refused. From ABI 6 it also scopes abstract unix
sockets (no connecting to a host service listening on one, e.g. an X server or a
D-Bus bus). Signals are not scoped: the relay signals its command's processes.

The syscalls are called by number through libc's syscall(2) (Python has no wrapper);
they are the same on every architecture (asm-generic numbers, 444 to 446).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Iterable

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

_SYS_CREATE_RULESET = 444
_SYS_ADD_RULE = 445
_SYS_RESTRICT_SELF = 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1

ACCESS_FS_EXECUTE = 1 << 0
ACCESS_FS_READ_FILE = 1 << 2
#: The filesystem rights each ABI version handles (the kernel refuses unknown bits):
#: v1 thirteen, v2 REFER, v3 TRUNCATE, v5 IOCTL_DEV.
_FS_BITS = {1: 13, 2: 14, 3: 15, 4: 15, 5: 16}
_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0


class _RulesetAttr(ctypes.Structure):
    _fields_ = (("handled_access_fs", ctypes.c_uint64),
                ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64))


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = (("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))


def abi_version() -> int:
    """The Landlock ABI the kernel offers, 0 when it has none (not built, or not in
    the `lsm=` list)."""
    version = _libc.syscall(ctypes.c_long(_SYS_CREATE_RULESET), None, ctypes.c_size_t(0),
                            ctypes.c_uint32(_CREATE_RULESET_VERSION))
    return max(int(version), 0)


def restrict(readable_dirs: Iterable[int]) -> int:
    """Enter a Landlock domain that allows reading files beneath the directories open
    as `readable_dirs` (descriptors) and nothing else of the filesystem; needs
    no_new_privs. Returns the ABI used, 0 when the kernel has no Landlock (nothing
    done). Affects the calling thread and the threads it starts later."""
    abi = abi_version()
    if abi == 0:
        return 0
    attr = _RulesetAttr((1 << _FS_BITS.get(abi, 16)) - 1, 0,
                        _SCOPE_ABSTRACT_UNIX_SOCKET if abi >= 6 else 0)
    # The kernel takes the struct's size as the caller knows it: v1 to v5 know one
    # field (v4's network field left out: the relay connects anywhere), v6 three.
    size = ctypes.sizeof(attr) if abi >= 6 else 8
    ruleset = _libc.syscall(ctypes.c_long(_SYS_CREATE_RULESET), ctypes.byref(attr),
                            ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"landlock_create_ruleset: {os.strerror(err)}")
    try:
        for fd in readable_dirs:
            rule = _PathBeneathAttr(ACCESS_FS_READ_FILE, fd)
            if _libc.syscall(ctypes.c_long(_SYS_ADD_RULE), ctypes.c_int(ruleset),
                             ctypes.c_int(_RULE_PATH_BENEATH), ctypes.byref(rule),
                             ctypes.c_uint32(0)) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"landlock_add_rule: {os.strerror(err)}")
        if _libc.syscall(ctypes.c_long(_SYS_RESTRICT_SELF), ctypes.c_int(ruleset),
                         ctypes.c_uint32(0)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"landlock_restrict_self: {os.strerror(err)}")
    finally:
        os.close(ruleset)
    return abi
