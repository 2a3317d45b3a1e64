"""Small Linux namespace and capability helpers shared by the CLI, the demo, tests and
benchmarks.

`unshare(2)`, `setns(2)`, `prctl(2)` and `capget(2)`/`capset(2)` are not in Python
3.11's `os` module, so they are called through libc. Network namespaces are per
thread: call these before any thread starts (or from the thread that will do all the
socket work).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
from collections.abc import Collection, Mapping

# Namespace flags of clone(2)/unshare(2) (include/uapi/linux/sched.h).
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

#: prctl(2) options (include/uapi/linux/prctl.h).
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

#: Capability numbers by name (include/uapi/linux/capability.h, Linux 5.9 and later).
CAPABILITIES: Mapping[str, int] = {
    name: number for number, name in enumerate((
        "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER",
        "CAP_FSETID", "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP",
        "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST",
        "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE",
        "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT",
        "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE",
        "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE",
        "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN",
        "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
        "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE"))}

#: capget(2)/capset(2) ABI version 3: two 32-bit words per set.
_CAP_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class CapSets(ctypes.Structure):
    """One 32-bit word of the effective, permitted and inheritable sets (capget(2))."""

    _fields_ = (("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32))


def prctl(option: int, arg2: int, what: str) -> int:
    """prctl(2) with one argument, its result; OSError naming `what` on failure."""
    result = _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(0),
                         ctypes.c_ulong(0), ctypes.c_ulong(0))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({what}): {os.strerror(err)}")
    return int(result)


def capget() -> ctypes.Array[CapSets]:
    """This thread's capability sets: two words, capabilities 0-31 and 32-63."""
    header = _CapHeader(_CAP_VERSION_3, 0)
    data = (CapSets * 2)()
    if _libc.capget(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capget: {os.strerror(err)}")
    return data


def capset(data: ctypes.Array[CapSets]) -> None:
    """Set this thread's capability sets to `data` (as `capget` returns them)."""
    header = _CapHeader(_CAP_VERSION_3, 0)
    if _libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


#: Set once this process is confined (relaynat.confine): its seccomp filter kills it at
#: the first new process (clone(2) without CLONE_THREAD), so what would start one asks
#: `may_start_processes` first and refuses with a message instead.
_confined = False


def mark_confined() -> None:
    """Note that this process is confined from now on (relaynat.confine)."""
    global _confined
    _confined = True


def may_start_processes() -> bool:
    """False once the process is confined: starting a process would end it."""
    return not _confined


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
    prctl(PR_SET_PDEATHSIG, signum, "PR_SET_PDEATHSIG")


def set_dumpable() -> None:
    """prctl(PR_SET_DUMPABLE, 1): a process whose ids changed is not dumpable, and its
    /proc/PID files are then root's (proc(5)), its uid_map too, closed to it; execve(2)
    of an ordinary program makes it dumpable again anyway."""
    prctl(PR_SET_DUMPABLE, 1, "PR_SET_DUMPABLE")


def set_undumpable() -> None:
    """prctl(PR_SET_DUMPABLE, 0): only a process with CAP_SYS_PTRACE over this one's
    user namespace may ptrace it or open its /proc/PID files (ptrace(2)), not one that
    merely has the same uid."""
    prctl(PR_SET_DUMPABLE, 0, "PR_SET_DUMPABLE")


def map_ids(pid: int | str, inside: tuple[int, int], outside: tuple[int, int]) -> None:
    """Map the uid and gid `inside` the user namespace `pid` ("self" or a process id) is
    in to the uid and gid `outside`, of the parent user namespace, and nothing else
    (user_namespaces(7)).

    setgroups is denied first: the kernel requires it before an unprivileged process
    writes gid_map, and it keeps the namespace's processes from calling setgroups(2) at
    all, so they can never drop a group that a file's mode denies them by."""
    for name, line in (("setgroups", "deny"), ("uid_map", f"{inside[0]} {outside[0]} 1"),
                       ("gid_map", f"{inside[1]} {outside[1]} 1")):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(line)


def map_root(pid: int | str, uid: int, gid: int) -> None:
    """Map root of the user namespace `pid` is in to `uid` and `gid` of the parent user
    namespace, and nothing else (`map_ids`)."""
    map_ids(pid, (0, 0), (uid, gid))


def last_capability() -> int:
    """The highest capability number the running kernel knows."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def limit_capabilities(keep: Collection[int]) -> None:
    """Let this process and whatever it executes hold at most the capabilities `keep`
    (numbers), for good: every other one leaves the bounding set, the inheritable and
    ambient sets, and no_new_privs is set.

    On execve(2) a process gets (inheritable & file inheritable) | (file permitted &
    bounding) | ambient, root counting as a file with every bit set (capabilities(7)):
    with the bounding and inheritable sets cut to `keep` and no ambient one, that is
    `keep` at most, whatever it runs. A capability dropped from the bounding set
    cannot come back, and no_new_privs keeps set-user-ID and file capabilities from
    changing its ids or sets. Needs CAP_SETPCAP (to drop from the bounding set)."""
    for number in range(last_capability() + 1):
        if number not in keep:
            prctl(PR_CAPBSET_DROP, number, f"PR_CAPBSET_DROP {number}")
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, "PR_CAP_AMBIENT_CLEAR_ALL")
    data = capget()
    mask = sum(1 << number for number in keep)
    for word, cap in enumerate(data):
        cap.inheritable &= (mask >> (32 * word)) & 0xFFFFFFFF
    capset(data)
    prctl(PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")


def isolate_network() -> None:
    """Move this process into a fresh network namespace with only `lo`, brought up.

    Used so that a relay's host side, a test or a benchmark can reach nothing but
    loopback and the namespaces it creates itself.
    """
    unshare(CLONE_NEWNET)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


def set_no_new_privs() -> None:
    """prctl(PR_SET_NO_NEW_PRIVS): nothing this process executes gains privileges."""
    prctl(PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")


def drop_capabilities() -> None:
    """Clear this process's effective, permitted and inheritable capability sets
    (capset(2)): it keeps its ids but may do nothing a capability allows, in any user
    namespace."""
    capset((CapSets * 2)())
