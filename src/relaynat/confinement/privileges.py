"""Who a confined relay is: the ids it drops to and the capabilities it keeps.

`runas_ids` turns `--runas USER|UID[:GID]` (or None) into the uid and gid to become:
`nobody` when the process is root, as passt does; no change otherwise (an
unprivileged process may take no other id). `drop_ids` becomes them, keeping the
permitted capabilities across the change (PR_SET_KEEPCAPS), so that the caller can
then keep exactly those the features in use need (`keep_only`): without it the kernel
clears every capability of a process whose uids all become non-zero (capabilities(7),
"Effect of user ID changes on capabilities").

The capability calls (capget/capset, PR_CAPBSET_DROP, PR_CAP_AMBIENT) are not in
Python's `os` module: they go through libc with ctypes.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Collection

from relaynat.config import ConfigError
from relaynat.netns.syscalls import (
    PR_CAP_AMBIENT,
    PR_CAP_AMBIENT_CLEAR_ALL,
    PR_CAPBSET_DROP,
    PR_SET_KEEPCAPS,
    capget,
    capset,
    prctl,
)

#: Capability numbers (include/uapi/linux/capability.h) of the ones a relay may keep.
CAP_KILL = 5
CAP_SETPCAP = 8
CAP_NET_BIND_SERVICE = 10
CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
CAP_SYS_ADMIN = 21
CAP_NAMES = {CAP_KILL: "CAP_KILL", CAP_NET_BIND_SERVICE: "CAP_NET_BIND_SERVICE",
             CAP_NET_ADMIN: "CAP_NET_ADMIN", CAP_NET_RAW: "CAP_NET_RAW",
             CAP_SETPCAP: "CAP_SETPCAP", CAP_SYS_ADMIN: "CAP_SYS_ADMIN"}

#: `nobody`'s ids where the user database has no `nobody` (passt falls back the same).
NOBODY = (65534, 65534)


def _id_of(kind: str, text: str) -> int:
    if text.isdigit():
        value = int(text)
        if value >= 0xFFFFFFFF:  # (uid_t) -1 means "no change"
            raise ConfigError(f"--runas: {kind} id {value} is out of range")
        return value
    try:
        return pwd.getpwnam(text).pw_uid if kind == "user" else grp.getgrnam(text).gr_gid
    except KeyError:
        raise ConfigError(f"--runas: no {kind} named {text!r}") from None


def runas_ids(spec: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """The (uid, gid) a confined relay becomes, or None to keep its own.

    `spec`: "USER", "UID", "USER:GROUP", "UID:GID" or a (uid, gid) pair; a lone user
    takes its primary group from the user database (a uid it does not know: the gid of
    the same number). None: `nobody` when this process is root, else its own ids.
    Root itself is refused: a relay that stays root would keep every file in reach of
    a bug. An unprivileged process may not become another user (ConfigError)."""
    root = os.geteuid() == 0
    if spec is None:
        if not root:
            return None
        try:
            entry = pwd.getpwnam("nobody")
        except KeyError:
            return NOBODY
        return entry.pw_uid, entry.pw_gid
    if isinstance(spec, tuple):
        uid, gid = spec
    else:
        user, sep, group = spec.partition(":")
        if not user or (sep and not group):
            raise ConfigError(f"--runas {spec!r}: expected USER, UID, USER:GROUP or UID:GID")
        uid = _id_of("user", user)
        if sep:
            gid = _id_of("group", group)
        else:
            try:
                gid = pwd.getpwuid(uid).pw_gid
            except KeyError:
                gid = uid
    if uid == 0 or gid == 0:
        raise ConfigError("--runas: a confined relay does not stay root or group root "
                          "(give --no-confine to run unconfined)")
    if not root and (uid, gid) != (os.getuid(), os.getgid()):
        raise ConfigError("--runas: becoming another user needs root")
    return None if not root else (uid, gid)


def drop_bounding_set(keep: Collection[int], last: int) -> None:
    """Drop every capability up to `last` but `keep` from the bounding set and clear
    the ambient set, so that nothing this process could still execute gains one back.
    Needs CAP_SETPCAP (dropped last, unless kept)."""
    for number in sorted(range(last + 1), key=lambda n: n == CAP_SETPCAP):
        if number not in keep:
            prctl(PR_CAPBSET_DROP, number, f"PR_CAPBSET_DROP {number}")
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, "PR_CAP_AMBIENT_CLEAR_ALL")


def drop_ids(uid: int, gid: int) -> None:
    """Become `uid`/`gid` with no supplementary group, in all threads (glibc applies
    set*id to every thread), keeping the permitted capabilities for `keep_only`."""
    prctl(PR_SET_KEEPCAPS, 1, "PR_SET_KEEPCAPS")
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    prctl(PR_SET_KEEPCAPS, 0, "PR_SET_KEEPCAPS")


def permitted() -> set[int]:
    """The capabilities this thread may hold."""
    data = capget()
    return {32 * word + bit for word, cap in enumerate(data) for bit in range(32)
            if cap.permitted >> bit & 1}


def keep_only(keep: Collection[int]) -> None:
    """Effective and permitted sets become `keep` (those of it this thread holds), the
    inheritable set empty: capset(2) of the calling thread, the only one confinement
    lets run."""
    data = capget()
    mask = sum(1 << number for number in keep)
    for word, cap in enumerate(data):
        cap.permitted &= (mask >> (32 * word)) & 0xFFFFFFFF
        cap.effective = cap.permitted
        cap.inheritable = 0
    capset(data)

