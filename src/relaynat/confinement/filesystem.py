"""Leaving the filesystem: a mount namespace of this process's own whose root is an
empty, read-only tmpfs, as passt's isolate_prefork() makes it.

1. unshare(CLONE_NEWNS) (with CLONE_NEWUSER first when the process is not privileged:
   only a user namespace of its own gives it CAP_SYS_ADMIN over a mount namespace;
   its own ids are mapped to themselves, user_namespaces(7));
2. "/" made recursively private and unbindable, so nothing done here propagates back
   to the host's mount namespace (mount_namespaces(7));
3. a tmpfs of two inodes and no blocks, read-only, nodev, noexec, nosuid, mounted on a
   directory that exists everywhere (/tmp) and made the root with pivot_root(".", "."),
   which stacks the old root on the new one; umount2(".", MNT_DETACH) then lets the
   old root go (pivot_root(2), "pivot_root(".", ".")").

Afterwards no path leads to a host file: open(2), connect(2) to a socket path,
execve(2) all find an empty directory. What the relay reads later is reached
through descriptors opened before (resolv.conf's directory, confinement/__init__.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from relaynat.netns.syscalls import CLONE_NEWNS, CLONE_NEWUSER, map_ids, unshare

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REC = 0x4000
MS_UNBINDABLE = 1 << 17
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8
#: x86_64 and aarch64 both name it so in libc; syscall(2) by number is per arch.
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
#: Where the empty tmpfs is mounted before it becomes the root (in our own namespace).
_MOUNT_POINT = "/tmp"


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    _check(_libc.mount(source.encode(), target.encode(),
                       fstype.encode() if fstype else None, ctypes.c_ulong(flags),
                       data.encode() if data else None), f"mount {target}")


def _own_user_namespace() -> None:
    """A user namespace mapping this process's ids to themselves (the one map an
    unprivileged process may write), in which it may make a mount namespace."""
    ids = (os.getuid(), os.getgid())
    unshare(CLONE_NEWUSER)
    map_ids("self", ids, ids)


def leave_filesystem(privileged: bool) -> None:
    """Make an empty read-only tmpfs this process's root, in a mount namespace of its
    own (module docstring); `privileged`: it has CAP_SYS_ADMIN, else it first makes a
    user namespace. Must run while the process has one thread (unshare(2) of a user
    namespace refuses otherwise, and a mount namespace is per thread)."""
    if not privileged:
        _own_user_namespace()
    unshare(CLONE_NEWNS)
    _mount("", "/", None, MS_UNBINDABLE | MS_REC)
    _mount("", _MOUNT_POINT, "tmpfs", MS_NODEV | MS_NOEXEC | MS_NOSUID | MS_RDONLY,
           "nr_inodes=2,nr_blocks=0")
    os.chdir(_MOUNT_POINT)
    number = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if number is None:
        raise OSError(0, f"pivot_root: no syscall number known for {os.uname().machine}")
    _check(_libc.syscall(ctypes.c_long(number), b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", ctypes.c_int(MNT_DETACH | UMOUNT_NOFOLLOW)), "umount2")
    os.chdir("/")


def root_is_empty() -> bool:
    """Whether "/" lists nothing (what confinement leaves)."""
    return not os.listdir("/")
