"""The target of `relaynat run --netns TARGET`: an existing network namespace to serve,
as `pasta PID` and `pasta --netns PATH` take it.

TARGET is a process id (all digits: that process's network namespace, and relaynat
without a command ends when the process does), a path (anything with a `/`:
`/run/netns/NAME`, `/proc/PID/ns/net`, a bind mount of one) or an `ip netns` name
(`/run/netns/NAME`). It is opened here, in the relay's process, and checked to be a
network namespace (ioctl NS_GET_NSTYPE, ioctl_ns(2)) before anything starts; the
namespace child (child.py) then enters it by that descriptor, so a name or a PID that
changes meaning after the check is never followed.

Entering a network namespace takes CAP_SYS_ADMIN in the user namespace that owns it
(setns(2)). Root of the host's user namespace holds it over every namespace; an
unprivileged caller has it only inside a user namespace it owns (rootlesskit's, podman's,
`unshare -Urn`'s), so the child enters that user namespace first (ioctl NS_GET_USERNS),
as slirp4netns does.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
from dataclasses import dataclass

from relaynat.config import ConfigError
from relaynat.netns.syscalls import CLONE_NEWNET

#: ioctl_ns(2) requests: _IO(0xb7, 1) and _IO(0xb7, 3) (include/uapi/linux/nsfs.h).
NS_GET_USERNS = 0xB701
NS_GET_NSTYPE = 0xB703

#: Namespace types by clone flag, for the message about a namespace of another kind.
_NS_KINDS = {0x00020000: "mount", 0x04000000: "UTS", 0x08000000: "IPC",
             0x10000000: "user", 0x20000000: "PID", 0x00000080: "time",
             0x02000000: "cgroup"}

#: Where `ip netns add NAME` binds a namespace (ip-netns(8)).
NETNS_RUN_DIR = "/run/netns"


@dataclass
class JoinTarget:
    """An open network namespace to serve: `netns_fd` (its nsfs file), `userns_fd` (the
    user namespace owning it, to enter first; None when this process may enter the
    network namespace as it is), `pidfd` (the target process, for a PID TARGET) and
    `name`, the TARGET as given."""

    name: str
    netns_fd: int
    userns_fd: int | None = None
    pidfd: int | None = None

    def fds(self) -> list[int]:
        """The namespace descriptors the child needs."""
        return [self.netns_fd] + ([] if self.userns_fd is None else [self.userns_fd])

    def close(self) -> None:
        """Close the descriptors it holds (the namespace itself lives on)."""
        for fd in (self.netns_fd, self.userns_fd, self.pidfd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.userns_fd = self.pidfd = None

    def alive(self) -> bool:
        """The target process still runs (always True for a path or a name)."""
        if self.pidfd is None:
            return True
        try:
            signal.pidfd_send_signal(self.pidfd, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # another user's process, alive
        return True


def _open_ns(path: str, what: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"--netns {what}: {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"--netns {what}: cannot open {path}: {exc.strerror}") from None
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.ENOTTY, errno.EINVAL):
            raise ConfigError(f"--netns {what}: {path} is not a namespace file (give a PID, "
                              "/proc/PID/ns/net, /run/netns/NAME or an ip netns name)") from None
        raise ConfigError(f"--netns {what}: {path}: {exc.strerror}") from None
    if kind != CLONE_NEWNET:
        os.close(fd)
        raise ConfigError(f"--netns {what}: {path} is a {_NS_KINDS.get(kind, 'non-network')} "
                          "namespace, not a network namespace")
    return fd


def _owner_to_enter(netns_fd: int, what: str) -> int | None:
    """The user namespace owning the network namespace, when this process must enter it
    to enter the network namespace: it is not root (of the host's user namespace, which
    holds every capability over every namespace) and the owner is not its own."""
    if os.geteuid() == 0:
        return None
    try:
        owner = fcntl.ioctl(netns_fd, NS_GET_USERNS)
    except OSError as exc:
        # EPERM: the owner is outside this process's user namespace (an ancestor's).
        raise ConfigError(f"--netns {what}: cannot find the user namespace that owns it: "
                          f"{exc.strerror}") from None
    if os.fstat(owner).st_ino == os.stat("/proc/self/ns/user").st_ino:
        os.close(owner)
        return None
    return owner


def resolve_target(text: str) -> JoinTarget:
    """Open and check TARGET; raises ConfigError with the reason it is refused."""
    if not text:
        raise ConfigError("--netns: give a PID, a path or an ip netns name")
    pidfd = None
    if text.isdigit():
        pid = int(text)
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise ConfigError(f"--netns {text}: no process {pid}") from None
        except OSError as exc:
            raise ConfigError(f"--netns {text}: process {pid}: {exc.strerror}") from None
        path = f"/proc/{pid}/ns/net"
    elif "/" in text:
        path = text
    elif text in (".", ".."):
        raise ConfigError(f"--netns {text}: not an ip netns name")
    else:
        path = os.path.join(NETNS_RUN_DIR, text)
        if not os.path.exists(path):
            raise ConfigError(f"--netns {text}: no network namespace named {text!r} "
                              f"(none at {path}; ip netns list shows them)")
    try:
        netns_fd = _open_ns(path, text)
    except BaseException:
        if pidfd is not None:
            os.close(pidfd)
        raise
    target = JoinTarget(text, netns_fd, pidfd=pidfd)
    try:
        st, own = os.fstat(netns_fd), os.stat("/proc/self/ns/net")
        if (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino):
            # The relay's host sockets live in its own namespace: a guest link there,
            # addressed with a default route via the gateway, would take the host's own
            # routes over (and a typo'd PID of a host process lands here).
            raise ConfigError(f"--netns {text}: that is relaynat's own network namespace; "
                              "give the guest's")
        if not target.alive():
            # Opened /proc/PID/ns/net after the pidfd: the process that owned PID then
            # has exited, and the namespace may be another process's that took the PID.
            raise ConfigError(f"--netns {text}: process {text} exited")
        target.userns_fd = _owner_to_enter(netns_fd, text)
    except BaseException:
        target.close()
        raise
    return target
