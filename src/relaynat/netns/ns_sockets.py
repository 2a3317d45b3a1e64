"""Sockets of the guest's network namespace for a relay that lives outside it: the
factory behind spliced forwards (host/splice.py).

A socket belongs to the network namespace where socket(2) ran, whichever thread or
process later connects, binds or accepts on it. So one small process, started when the
guest is set up, enters the guest's network namespace (by descriptor: the user
namespace owning it first when the relay is not root, as the namespace child does)
and from then on answers the relay's requests for fresh TCP sockets by passing them
back over a unix socketpair with SCM_RIGHTS. The listeners of `-T`/`-U` (the guest's
loopback ports forwarded to the host's) are bound there once, at start, and handed
over the same way.

Once those are bound the process keeps no privilege: as root it becomes `nobody`, in a
user namespace it drops every capability, and no_new_privs is set. Making a socket
needs none. The relay itself needs nothing after start either (no setns, no fork):
it only sends a request and receives descriptors (sendmsg, recvmsg), so it may drop
its own privileges and confine itself afterwards.

The process ends when the relay closes its end of the socketpair, and when the relay
dies (PR_SET_PDEATHSIG). Run as `python -m relaynat.netns.ns_sockets SPEC FD` by
`NamespaceSockets.start`.
"""

from __future__ import annotations

import array
import contextlib
import json
import logging
import os
import pwd
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from relaynat.errors import Error
from relaynat.netns.syscalls import (
    CLONE_NEWNET,
    CLONE_NEWUSER,
    drop_capabilities,
    may_start_processes,
    set_no_new_privs,
    set_parent_death_signal,
    set_undumpable,
    setns,
)

if TYPE_CHECKING:
    from relaynat.relay import Relay

log = logging.getLogger("relaynat.netns")

#: Sockets asked for at once: one round trip to the factory serves this many clients.
BATCH = 32
#: SCM_RIGHTS carries at most 253 descriptors per message (SCM_MAX_FD).
_MAX_FDS_PER_MESSAGE = 250
#: How long the relay waits for the factory's answer before it gives up on it.
_ANSWER_TIMEOUT_S = 5.0
_FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}
_NOBODY = 65534


class NamespaceSocketsError(Error, RuntimeError):
    """The socket factory could not be started; the message says why."""


@dataclass(frozen=True, slots=True)
class GuestListener:
    """A socket bound in the guest's namespace at start: `proto` "tcp" (listening) or
    "udp", on the guest's loopback of `family` (4 or 6), `port`."""

    proto: str
    family: int
    port: int


class NamespaceSockets:
    """The relay's end of the factory: `take(family)` gives a fresh non-blocking TCP
    socket of the guest's namespace, or None once the factory is gone (the caller
    falls back to another path); `listeners` are the sockets bound at start, in the
    order asked for (None where binding failed, `errors` saying why)."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket,
                 listeners: list[socket.socket | None], errors: list[str]) -> None:
        self._proc = proc
        self._sock = sock
        self.listeners = listeners
        self.errors = errors
        self._pool: dict[int, list[socket.socket]] = {4: [], 6: []}
        self._broken = False

    @classmethod
    def start(cls, netns_fd: int, userns_fd: int | None = None,
              listen: Sequence[GuestListener] = ()) -> NamespaceSockets:
        """Start the factory in the network namespace of `netns_fd` (entering the user
        namespace of `userns_fd` first, if given), binding `listen` there. Raises
        NamespaceSocketsError saying why it could not."""
        if not may_start_processes():
            raise NamespaceSocketsError("this process is confined (relaynat.confine): "
                                        "start the socket factory before confine()")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        spec = {"netns": netns_fd, "userns": userns_fd,
                "listen": [[x.proto, x.family, x.port] for x in listen]}
        fds = [theirs.fileno(), netns_fd] + ([] if userns_fd is None else [userns_fd])
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "relaynat.netns.ns_sockets", json.dumps(spec),
                 str(theirs.fileno())], pass_fds=fds, stdin=subprocess.DEVNULL,
                # A session of its own: a terminal's ^C and ^\ go to its foreground
                # process group, the command's to decide on, not to the factory.
                start_new_session=True)
        except OSError as exc:
            ours.close()
            raise NamespaceSocketsError(f"cannot start the namespace socket factory: "
                                        f"{exc}") from None
        finally:
            theirs.close()
        ours.settimeout(_ANSWER_TIMEOUT_S)
        try:
            header, got = _receive(ours, len(listen))
            if header.get("error"):
                raise NamespaceSocketsError(f"namespace socket factory: {header['error']}")
            bound: list[socket.socket | None] = []
            kinds = iter(got)
            for ok in header["bound"]:
                bound.append(socket.socket(fileno=next(kinds)) if ok else None)
        except (OSError, ValueError, KeyError, StopIteration, NamespaceSocketsError) as exc:
            ours.close()
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()
            if isinstance(exc, NamespaceSocketsError):
                raise
            raise NamespaceSocketsError(f"namespace socket factory did not answer: "
                                        f"{exc}") from None
        for s in bound:
            if s is not None:
                s.setblocking(False)
        return cls(proc, ours, bound, list(header.get("errors", [])))

    def take(self, family: int) -> socket.socket | None:
        """A fresh non-blocking TCP socket of the guest's namespace, `family` 4 or 6."""
        pool = self._pool[family]
        if not pool and not self._broken:
            try:
                self._sock.send(f"tcp{family} {BATCH}".encode())
                _, fds = _receive(self._sock, BATCH)
            except (OSError, ValueError) as exc:
                log.warning("namespace socket factory gone (%s): forwards take the TAP", exc)
                self._broken = True
                return None
            for fd in fds:
                try:
                    sock = socket.socket(fileno=fd)
                except OSError:  # ENOTSOCK: not what was asked for
                    os.close(fd)
                    continue
                if sock.type != socket.SOCK_STREAM or sock.family != _FAMILIES[family]:
                    sock.close()
                    continue
                pool.append(sock)
        return pool.pop() if pool else None

    def close(self) -> None:
        """Close the pool and the socketpair; the factory exits on end of file."""
        for pool in self._pool.values():
            for s in pool:
                s.close()
            pool.clear()
        self._sock.close()
        try:
            self._proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def for_guest(pid: int | None, netns_fd: int | None = None, userns_fd: int | None = None,
              listen: Sequence[GuestListener] = ()) -> NamespaceSockets:
    """The factory for a namespace guest: that of process `pid` (a `NamespaceGuest`'s
    outer process, which lives in the guest's network namespace, with the user
    namespace owning it entered first when this process is not root: only there does it
    hold CAP_SYS_ADMIN over that network namespace, setns(2)), or the open namespace
    `netns_fd` (and `userns_fd`) of a joined target (netns/join.py)."""
    opened: list[int] = []
    try:
        if netns_fd is None:
            if pid is None:
                raise NamespaceSocketsError("no guest namespace to make sockets in")
            try:
                netns_fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
                opened.append(netns_fd)
                if os.geteuid() != 0:
                    userns_fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
                    opened.append(userns_fd)
            except OSError as exc:
                raise NamespaceSocketsError(f"cannot open the guest's namespace: "
                                            f"{exc.strerror}") from None
        return NamespaceSockets.start(netns_fd, userns_fd, listen)
    finally:
        for fd in opened:
            os.close(fd)


def serve(relay: Relay, factory: NamespaceSockets,
          loopback: Sequence[tuple[GuestListener, int]]) -> None:
    """Splice `relay`'s forwards with `factory`'s sockets, and forward each guest
    listener of `loopback` (in the order `factory` was started with, each with its host
    port) to the host's loopback."""
    relay.splice_forwards(factory)
    for (wanted, host_port), sock in zip(loopback, factory.listeners, strict=True):
        if sock is not None:
            relay.add_loopback_forward(wanted.proto, sock, host_port)


def _receive(sock: socket.socket, most: int) -> tuple[dict[str, Any], list[int]]:
    """One answer: a JSON header and up to `most` descriptors, over as many messages as
    SCM_RIGHTS needs (the header says how many follow)."""
    fds: list[int] = []
    header: dict[str, Any] | None = None
    messages = 1
    while messages:
        msg, ancdata, _flags, _addr = sock.recvmsg(
            65536, socket.CMSG_SPACE(_MAX_FDS_PER_MESSAGE * 4))
        if not msg:
            raise OSError("end of file")
        got = array.array("i")
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got.frombytes(data[: len(data) - len(data) % got.itemsize])
        fds.extend(got)
        if header is None:
            header = json.loads(msg)
            assert isinstance(header, dict)
            messages = int(header.get("messages", 1))
        messages -= 1
    assert header is not None
    if len(fds) > max(most, 1) + _MAX_FDS_PER_MESSAGE:
        for fd in fds:
            os.close(fd)
        raise ValueError("more descriptors than asked for")
    return header, fds


def _send(sock: socket.socket, header: dict[str, Any], fds: list[int]) -> None:
    chunks = [fds[i:i + _MAX_FDS_PER_MESSAGE]
              for i in range(0, len(fds), _MAX_FDS_PER_MESSAGE)] or [[]]
    header = {**header, "messages": len(chunks)}
    for n, chunk in enumerate(chunks):
        body = json.dumps(header).encode() if n == 0 else b"{}"
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", chunk))] if chunk else []
        sock.sendmsg([body], anc)


# -- the factory's side ------------------------------------------------------------------

def _bind(proto: str, family: int, port: int) -> socket.socket:
    af = _FAMILIES[family]
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(af, kind | socket.SOCK_CLOEXEC)
    try:
        if af == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1" if family == 4 else "::1", port))
        if kind == socket.SOCK_STREAM:
            s.listen(128)
    except OSError:
        s.close()
        raise
    return s


def _drop_privileges() -> None:
    """Keep nothing beyond making sockets: as root, become nobody (which clears every
    capability, capabilities(7)) where this user namespace maps nobody; else drop every
    capability held. no_new_privs either way."""
    dropped = False
    if os.geteuid() == 0:
        try:
            uid, gid = pwd.getpwnam("nobody")[2:4]
        except KeyError:
            uid = gid = _NOBODY
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            dropped = True
        except OSError:  # EINVAL: nobody is not mapped here; EPERM: setgroups denied
            pass
    if not dropped:
        drop_capabilities()
    set_no_new_privs()


def _factory_main(argv: list[str]) -> int:
    set_parent_death_signal(signal.SIGKILL)
    # Its uid may be the guest's root outside (an unprivileged relay's): not traceable by
    # the guest's processes for that, since the relay believes what it hands over.
    set_undumpable()
    spec = json.loads(argv[0])
    sock = socket.socket(fileno=int(argv[1]))
    try:
        if spec["userns"] is not None:
            setns(spec["userns"], CLONE_NEWUSER)
        setns(spec["netns"], CLONE_NEWNET)
        for fd in (spec["netns"], spec["userns"]):
            if fd is not None:
                os.close(fd)
    except OSError as exc:
        _send(sock, {"error": f"cannot enter the guest's namespace: {exc}"}, [])
        return 1
    bound: list[bool] = []
    errors: list[str] = []
    fds: list[int] = []
    held: list[socket.socket] = []
    for proto, family, port in spec["listen"]:
        where = f"{proto} {'127.0.0.1' if family == 4 else '[::1]'}:{port}"
        try:
            s = _bind(proto, family, port)
        except OSError as exc:
            bound.append(False)
            errors.append(f"cannot bind {where} in the guest's namespace: {exc.strerror}")
            continue
        bound.append(True)
        held.append(s)
        fds.append(s.fileno())
    try:
        _drop_privileges()
    except OSError as exc:
        _send(sock, {"error": f"cannot drop privileges: {exc}"}, [])
        return 1
    _send(sock, {"bound": bound, "errors": errors}, fds)
    for s in held:
        s.close()
    while True:
        try:
            request = sock.recv(64)
        except OSError:
            return 0
        if not request:
            return 0
        kind, _, count = request.decode(errors="replace").partition(" ")
        family = {"tcp4": 4, "tcp6": 6}.get(kind)
        if family is None or not count.isdigit():
            return 1
        made = []
        try:
            for _ in range(min(int(count), BATCH)):
                made.append(socket.socket(_FAMILIES[family], socket.SOCK_STREAM
                                          | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC))
        except OSError:
            pass  # out of descriptors: hand over what there is
        try:
            _send(sock, {}, [s.fileno() for s in made])
        except OSError:
            return 0
        finally:
            for s in made:
                s.close()


if __name__ == "__main__":
    sys.exit(_factory_main(sys.argv[1:]))
