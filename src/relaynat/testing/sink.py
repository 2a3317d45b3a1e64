"""The kit's sink: one loopback port, TCP and UDP, where generated traffic goes.

The relay maps the gateway to the host's loopback, so a frame to the gateway's port N
reaches 127.0.0.1:N (or [::1]:N) on the machine running the test. A strategy that drew
N at random would send its bytes to whatever the developer runs there (a database, an
SSH server, a development web server). The strategies therefore address TCP and UDP to
the sink by default: a port number the kit binds itself, on 127.0.0.1 and ::1, for TCP
(listening) and UDP, and keeps for the life of the process. A strategy draws its frames
before the `InMemoryGuest` that sends them exists, so the port has to outlive both; it
is bound on the first draw or guest that needs it.

While an `InMemoryGuest` runs it serves the sink on its event loop: TCP connections are
accepted and what arrives on them is read and thrown away (an EOF is answered with a
close, so a guest's FIN completes), datagrams are read and thrown away, nothing is ever
sent back. When the last running guest closes, the connections accepted meanwhile are
closed; the port stays bound, so nothing else can take it between two examples.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import socket

__all__ = ["Sink", "sink"]

#: Connections the kernel may queue before the sink accepts them (the relay opens one
#: per guest flow, and a strategy's frames may open many before the loop turns).
_BACKLOG = 512
#: Datagrams read per wakeup, so a flood of them does not hold the loop.
_DATAGRAMS_PER_WAKEUP = 64
#: Attempts at a port free on both addresses for both protocols.
_BIND_ATTEMPTS = 64


class Sink:
    """TCP and UDP sockets bound to one `port` on 127.0.0.1 and (where the host has
    IPv6) ::1, served by the running `InMemoryGuest`s (`acquire`/`release`)."""

    def __init__(self) -> None:
        self.port, self._tcp, self._udp = _bind_one_port()
        self._users = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conns: set[socket.socket] = set()

    @property
    def addresses(self) -> tuple[str, ...]:
        """The loopback addresses the port is bound on ("127.0.0.1", and "::1" unless
        the host has no IPv6)."""
        return tuple(s.getsockname()[0] for s in self._tcp)

    def acquire(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve the sink on `loop` until the matching `release` (the first user's loop
        serves all: one process, one port)."""
        self._users += 1
        if self._users > 1:
            return
        self._loop = loop
        for sock in self._tcp:
            loop.add_reader(sock.fileno(), self._accept, sock)
        for sock in self._udp:
            loop.add_reader(sock.fileno(), self._discard, sock)

    def release(self) -> None:
        """One user is done; the last one stops serving and closes the connections."""
        if self._users == 0:
            return
        self._users -= 1
        if self._users:
            return
        loop, self._loop = self._loop, None
        assert loop is not None
        if not loop.is_closed():
            for sock in (*self._tcp, *self._udp, *self._conns):
                with contextlib.suppress(ValueError, OSError):
                    loop.remove_reader(sock.fileno())
        for conn in self._conns:
            conn.close()
        self._conns.clear()
        for listener in self._tcp:  # and those the kernel queued, not yet accepted
            with contextlib.suppress(OSError):
                while True:
                    listener.accept()[0].close()

    def _accept(self, listener: socket.socket) -> None:
        assert self._loop is not None
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        conn.setblocking(False)
        self._conns.add(conn)
        self._loop.add_reader(conn.fileno(), self._drain, conn)

    def _drain(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""  # reset by the relay: done with it
        if data:
            return
        assert self._loop is not None
        self._loop.remove_reader(conn.fileno())
        self._conns.discard(conn)
        conn.close()

    @staticmethod
    def _discard(sock: socket.socket) -> None:
        for _ in range(_DATAGRAMS_PER_WAKEUP):
            try:
                sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # an error queued for the socket (ICMP): read past it


@functools.cache
def sink() -> Sink:
    """The process's sink, bound on first use."""
    return Sink()


def _bind_one_port() -> tuple[int, tuple[socket.socket, ...], tuple[socket.socket, ...]]:
    """A port free for TCP and UDP on 127.0.0.1 and ::1 (::1 left out where the host
    has no IPv6), with the sockets bound to it: (port, TCP listeners, UDP sockets)."""
    for _ in range(_BIND_ATTEMPTS):
        first = _socket(socket.AF_INET, socket.SOCK_STREAM)
        first.bind(("127.0.0.1", 0))
        port = first.getsockname()[1]
        bound = [first]
        try:
            bound.append(_bound(socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1", port))
            with contextlib.suppress(_NoIpv6):
                bound.append(_bound(socket.AF_INET6, socket.SOCK_STREAM, "::1", port))
                bound.append(_bound(socket.AF_INET6, socket.SOCK_DGRAM, "::1", port))
        except OSError as exc:
            for sock in bound:
                sock.close()
            if exc.errno == errno.EADDRINUSE:
                continue  # taken on another address or protocol: try another port
            raise
        tcp = tuple(s for s in bound if s.type == socket.SOCK_STREAM)
        for sock in tcp:
            sock.listen(_BACKLOG)
        return port, tcp, tuple(s for s in bound if s.type == socket.SOCK_DGRAM)
    raise OSError(errno.EADDRINUSE, "no loopback port is free for both TCP and UDP")


class _NoIpv6(Exception):
    """::1 cannot be bound: the host has no IPv6 (or no IPv6 loopback)."""


def _socket(family: int, kind: int) -> socket.socket:
    sock = socket.socket(family, kind)
    sock.setblocking(False)
    return sock


def _bound(family: int, kind: int, addr: str, port: int) -> socket.socket:
    try:
        sock = _socket(family, kind)
    except OSError as exc:
        if exc.errno == errno.EAFNOSUPPORT:
            raise _NoIpv6 from None
        raise
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((addr, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRNOTAVAIL and family == socket.AF_INET6:
            raise _NoIpv6 from None
        raise
    return sock
