"""Confinement: what a relay process gives up once its guests are set up, as passt
does before it reads a guest frame.

`confine(*relays, ...)` runs, in this order, in a process that has one thread:

1. `prepare` callables (sockets or files the caller still has to open with the
   process's full privileges: a socket factory of a guest's namespace, say), then each
   relay's `prepare_confinement` (resolv.conf read through its directory's descriptor
   from now on);
2. the filesystem is left: an empty read-only tmpfs becomes the root of a mount
   namespace of the process's own (confinement/filesystem.py);
3. the bounding set keeps only the capabilities to keep, the ambient set is cleared;
4. as root: the process becomes `runas` (`nobody` by default), no supplementary group;
   CAP_NET_RAW is held a moment longer, for the relays to open their raw ICMP sockets
   as the new user would need them (ping sockets refused to its group); then the
   effective and permitted sets become exactly `keep`;
5. no_new_privs; a Landlock domain where the kernel has one (confinement/landlock.py);
6. the seccomp allowlist (confinement/seccomp_filter.py), in every thread.

A step that fails raises `ConfinementError` and the caller must not go on serving:
half a confinement is not one (the CLI exits). Which feature keeps which capability
is the caller's to say (`keep`); the CLI's choices are in docs/confinement.md.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from relaynat.confinement import filesystem, landlock, privileges, seccomp_filter
from relaynat.confinement.privileges import CAP_NAMES, CAP_NET_RAW, CAP_SYS_ADMIN
from relaynat.errors import Error
from relaynat.netns import syscalls

if TYPE_CHECKING:
    from relaynat.guests import Guests
    from relaynat.relay import Relay

#: Capability names `confine(keep=...)` takes, with their numbers.
CAPABILITIES = {"CAP_KILL": privileges.CAP_KILL,
                "CAP_NET_BIND_SERVICE": privileges.CAP_NET_BIND_SERVICE,
                "CAP_NET_ADMIN": privileges.CAP_NET_ADMIN,
                "CAP_NET_RAW": privileges.CAP_NET_RAW}


class ConfinementError(Error, RuntimeError):
    """Confinement could not be completed; the process must not serve guests."""


@dataclass(frozen=True)
class Confined:
    """What `confine` did: the ids the process has now, the capabilities it kept, the
    Landlock ABI used (0: the kernel has none) and the seccomp action."""

    uid: int
    gid: int
    capabilities: tuple[str, ...]
    landlock_abi: int
    on_violation: str

    def describe(self) -> str:
        """One line saying what the process holds now, for the log."""
        caps = ", ".join(self.capabilities) or "none"
        wall = f"Landlock ABI {self.landlock_abi}" if self.landlock_abi else "no Landlock"
        return (f"confined: uid {self.uid} gid {self.gid}, capabilities {caps}, empty "
                f"root, no_new_privs, seccomp ({self.on_violation} on violation), {wall}")


#: How long `confine` waits for threads that were joined to leave /proc/self/task.
THREADS_GONE_S = 2.0


def _threads() -> list[str]:
    """This process's threads, once those already ending are gone: `Thread.join()` and
    an executor's shutdown return when the thread's Python state is released, a moment
    before the kernel reaps the thread itself, and that moment grows with the load."""
    deadline = time.monotonic() + THREADS_GONE_S
    while True:
        threads = os.listdir("/proc/self/task")
        if len(threads) == 1 or time.monotonic() >= deadline:
            return threads
        time.sleep(0.01)


def _relays_of(targets: Iterable[Relay | Guests]) -> list[Relay]:
    from relaynat.guests import Guests

    relays: list[Relay] = []
    for target in targets:
        if isinstance(target, Guests):
            relays.extend(target[name] for name in target)
        else:
            relays.append(target)
    return relays


def _mapped(ids: tuple[int, int]) -> bool:
    """Whether this process's user namespace maps `ids` (uid, gid): a user namespace
    made with one mapping (`unshare -r`, a rootless container engine without
    subordinate ids) has no `nobody` to become (setresuid(2): EINVAL)."""
    for name, wanted in (("uid_map", ids[0]), ("gid_map", ids[1])):
        with open(f"/proc/self/{name}") as f:
            ranges = [tuple(int(n) for n in line.split()) for line in f if line.strip()]
        if not any(inside <= wanted < inside + count for inside, _, count in ranges):
            return False
    return True


def _keep_numbers(keep: Iterable[str]) -> set[int]:
    numbers = set()
    for name in keep:
        key = name.upper() if name.upper().startswith("CAP_") else f"CAP_{name.upper()}"
        if key not in CAPABILITIES:
            raise ConfinementError(f"keep: {name!r} is not a capability a relay may keep "
                                   f"({', '.join(CAPABILITIES)})")
        numbers.add(CAPABILITIES[key])
    return numbers


def confine(*targets: Relay | Guests, runas: str | tuple[int, int] | None = None,
            keep: Collection[str] = (), prepare: Iterable[Callable[[], object]] = (),
            on_violation: str = "kill") -> Confined:
    """Confine this process once its relays (`targets`: `Relay`s or `Guests`, started)
    are set up: see the module docstring for the steps. `runas`: "USER", "UID",
    "USER:GROUP", "UID:GID" or a pair of ids, by default `nobody` when root (no change
    otherwise); `keep`: the capabilities to keep (names from CAPABILITIES: "CAP_KILL",
    "CAP_NET_BIND_SERVICE", "CAP_NET_ADMIN", "CAP_NET_RAW"), none by default;
    `prepare`: callables to run first, with every privilege; `on_violation`: "kill"
    (the process, SECCOMP_RET_KILL_PROCESS) or "log" (the kernel logs the call and
    lets it run: for tracing the list, not a confinement).

    After it, the process cannot open a host file, make a netlink or packet socket,
    execute a program, start a process (threads only), or regain a privilege; relays
    added later cannot open a raw ICMP socket or a pcap file. Raises ConfinementError
    (nothing must be served then) or, for a bad `runas`, ConfigError."""
    if on_violation not in ("kill", "log"):
        raise ConfinementError(f"on_violation: {on_violation!r} is not kill or log")
    keep_set = _keep_numbers(keep)
    ids = privileges.runas_ids(runas)
    if runas is None and ids is not None and not _mapped(ids):
        # Root of a user namespace that does not map `nobody` (one mapping root alone)
        # cannot become it, and is an unprivileged user outside: it keeps its ids, as
        # passt keeps them in any user namespace but the initial one, and drops every
        # capability it holds there all the same.
        ids = None
    threads = _threads()
    if len(threads) > 1:
        raise ConfinementError(f"confine: the process runs {len(threads)} threads; "
                               "confinement applies to one (an executor, asyncio's child "
                               "watcher threads, OpenBLAS: docs/confinement.md, From Python)")
    relays = _relays_of(targets)
    try:
        for step in prepare:
            step()
        readable = [fd for relay in relays for fd in relay.prepare_confinement()]
        holds = privileges.permitted()
        last = syscalls.last_capability()
        filesystem.leave_filesystem(privileged=CAP_SYS_ADMIN in holds)
        privileges.drop_bounding_set(keep_set, last)
        if ids is not None:
            privileges.drop_ids(*ids)
        # Raw ICMP sockets opened as the user the relay now is, while CAP_NET_RAW is
        # still held: whether ping sockets are refused depends on the group.
        privileges.keep_only(keep_set | {CAP_NET_RAW})
        for relay in relays:
            relay.prepare_raw_icmp()
        privileges.keep_only(keep_set)
        syscalls.set_no_new_privs()
        abi = landlock.restrict(readable)
        seccomp_filter.install(on_violation)
        syscalls.mark_confined()
    except OSError as exc:
        raise ConfinementError(f"confinement failed: {exc}") from None
    kept = privileges.permitted()
    return Confined(os.getuid(), os.getgid(),
                    tuple(CAP_NAMES.get(n, str(n)) for n in sorted(kept)), abi, on_violation)
