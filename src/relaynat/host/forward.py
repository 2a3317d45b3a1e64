"""Inbound port forwarding: host ports whose connections the relay opens toward the guest.

A TCP forward is a listening socket on the host side. Each accepted connection becomes
an inbound flow (`TcpRelay.open_inbound`): the relay SYNs the guest from the gateway
address (as passt does by default: the guest sees the connection come from the host
through its router), and from then on the flow is relayed by the same core and window
rules as an outbound one. A client on an IPv4 address reaches the guest over IPv4,
one on IPv6 over IPv6 (passt's rule), unless the guest runs only the other family.

A UDP forward is a bound socket. Each new client (address and port) becomes an
inbound UDP flow toward the guest (`UdpRelay.on_forwarded`), and the guest's replies
go back to that client through the same socket, so they come from the port the client
sent to. Inbound UDP flows end after `udp_inbound_timeout_s` without traffic.

With `inbound_source="client"`, the guest sees the client's real address instead of
the gateway's (addressing.py says when it cannot).

When the guest is a network namespace the relay can make sockets in
(`Relay.splice_forwards`), a TCP client on the host's loopback is spliced to the
guest's loopback instead (host/splice.py), as pasta does: no TCP of the relay's own.

Host port 0 asks the kernel for a free port; `Forward.host_port` is the one it chose,
and listing the forwards reports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv6Address, ip_address

from relaynat.errors import Error
from relaynat.guest_log import guest_logger
from relaynat.host.sockets import size_udp_rcvbuf

log = guest_logger("relaynat.forward")

#: Connections accepted (or datagrams read) per forward per wakeup before other work
#: gets its turn.
_ACCEPTS_PER_WAKEUP = 64
#: After accept() fails for want of descriptors, the pause before trying again
#: (asyncio's ACCEPT_RETRY_DELAY).
_ACCEPT_RETRY_S = 1.0
#: Largest UDP payload over IPv6 (65535 minus the UDP header); IPv4's is smaller.
_DATAGRAM_MAX = 65527
_V4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"
_V6_LOOPBACK = bytes(15) + b"\x01"

#: Opens the guest side of an accepted TCP connection: (socket, client address packed,
#: client port, guest port) -> True if a flow was opened (the callee owns the socket
#: either way).
InboundOpener = Callable[[socket.socket, bytes, int, int], bool]
#: A host client's inet socket address as accept() and recvfrom() give it: (host, port),
#: then flowinfo and scope id for IPv6.
SockAddr = tuple[str, int, *tuple[int, ...]]
#: Takes one datagram a host client sent to a UDP forward: (forward, payload, the
#: client's socket address as recvfrom gave it).
DatagramSink = Callable[["Forward", bytes, SockAddr], None]
#: Splices an accepted TCP client on the host's loopback to the guest's loopback:
#: (socket, IPv6 client, guest port) -> True if it took the client (host/splice.py).
SpliceOpener = Callable[[socket.socket, bool, int], bool]


class ForwardError(Error, ValueError):
    """A forward cannot be added or removed; the message says why."""


@dataclass(slots=True, eq=False)
class Forward:
    """One inbound forward, as `Relay.add_forward` returns it and `Relay.forwards`
    lists it."""

    proto: str
    """"tcp" or "udp"."""
    host_addr: str | None
    """Listening address on the host; None: every address of both families."""
    host_port: int
    """The host port; the one the kernel chose when 0 was asked for."""
    guest_port: int
    """The guest's port the connections and datagrams go to."""
    interface: str | None = None
    """Listen on this interface only (SO_BINDTODEVICE), passt's ADDR%IF."""
    sock: socket.socket | None = field(default=None, repr=False)
    """The listening (TCP) or bound (UDP) host socket; None once removed."""
    id: int = 0
    """Small per-relay number, increasing, never reused: a handle for removal that
    stays valid however the address was spelled (the control socket's `id`)."""

    def describe(self) -> dict[str, object]:
        """The forward as a JSON-ready dict (the control socket's shape), without the socket."""
        return {"id": self.id, "proto": self.proto, "host_addr": self.host_addr,
                "host_port": self.host_port, "guest_port": self.guest_port,
                "interface": self.interface}


def client_address(peer: SockAddr) -> bytes:
    """The packed address of an accepted client, an IPv4-mapped IPv6 address (from a
    dual-stack listener, RFC 4291 §2.5.5.2) unwrapped to IPv4."""
    packed = ip_address(peer[0].split("%")[0]).packed
    if len(packed) == 16 and packed[:12] == _V4_MAPPED_PREFIX:
        return packed[12:]
    return packed


def _is_loopback(packed: bytes) -> bool:
    """127.0.0.0/8 or ::1 (RFC 1122 §3.2.1.3, RFC 4291 §2.5.3)."""
    return packed[0] == 127 if len(packed) == 4 else packed == _V6_LOOPBACK


class Forwarder:
    """The forwards of one relay: TCP listeners, whose accepted connections go to
    `open_inbound`, and bound UDP sockets, whose datagrams go to `on_datagram` (the
    UDP relay answers through the same socket, so replies come from the port the
    client sent to)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, open_inbound: InboundOpener,
                 on_datagram: DatagramSink) -> None:
        self._loop = loop
        self._open_inbound = open_inbound
        self._on_datagram = on_datagram
        self.forwards: list[Forward] = []
        self._ids = itertools.count(1)
        #: Set when the guest's namespace can be entered (Relay.splice_forwards): loopback
        #: clients are spliced to the guest's loopback, as pasta does; the others, whose
        #: address the guest may see (inbound_source "client"), take the guest's link.
        self.splice: SpliceOpener | None = None

    def add(self, proto: str, host_addr: str | None, host_port: int, guest_port: int,
            interface: str | None = None) -> Forward:
        """Listen on `host_addr` (None: all addresses, IPv4 and IPv6) port `host_port`
        (0: any free one), on `interface` only if given, and forward to the guest's
        `guest_port`."""
        if proto not in ("tcp", "udp"):
            raise ForwardError(f"protocol {proto!r} cannot be forwarded (tcp or udp)")
        if not 0 <= host_port <= 0xFFFF or not 1 <= guest_port <= 0xFFFF:
            raise ForwardError(f"ports out of range: host {host_port}, guest {guest_port}")
        if self.find(proto, host_addr, host_port) is not None:
            raise ForwardError(f"{proto} {host_addr or '*'} port {host_port} is already "
                               "forwarded")
        sock = _bind(proto, host_addr, host_port, interface)
        forward = self.adopt(proto, host_addr, guest_port, interface, sock)
        log.info("forwarding %s %s port %d to guest port %d", proto, host_addr or "*",
                 forward.host_port, guest_port)
        return forward

    def adopt(self, proto: str, host_addr: str | None, guest_port: int,
              interface: str | None, sock: socket.socket) -> Forward:
        """Forward from `sock`, bound (and listening, for TCP) already: by `add`, or by
        the relay this one took over from (moving/handover.py)."""
        forward = Forward(proto, host_addr, sock.getsockname()[1], guest_port, interface, sock,
                          next(self._ids))
        self._watch(forward)
        self.forwards.append(forward)
        return forward

    def _watch(self, forward: Forward) -> None:
        assert forward.sock is not None
        ready = self._on_accept if forward.proto == "tcp" else self._on_readable
        self._loop.add_reader(forward.sock.fileno(), ready, forward)

    def pause(self) -> None:
        """Stop accepting and reading (clients wait in the backlog, datagrams in the
        socket) until `resume`: the forwards are being handed to another process."""
        for forward in self.forwards:
            if forward.sock is not None:
                self._loop.remove_reader(forward.sock.fileno())

    def resume(self) -> None:
        for forward in self.forwards:
            if forward.sock is not None:
                self._watch(forward)

    def find(self, proto: str, host_addr: str | None, host_port: int) -> Forward | None:
        for forward in self.forwards:
            if (forward.proto, forward.host_addr, forward.host_port) == (proto, host_addr,
                                                                          host_port):
                return forward
        return None

    def lookup(self, proto: str | None, host_addr: str | None, host_port: int | None,
               forward_id: int | None) -> Forward:
        """The forward with `forward_id`, or else the one on (proto, host_addr,
        host_port); raises ForwardError naming what was asked for."""
        if forward_id is not None:
            for forward in self.forwards:
                if forward.id == forward_id:
                    return forward
            raise ForwardError(f"no forward with id {forward_id}")
        if proto is None or host_port is None:
            raise ForwardError("give a forward id, or the protocol and host port")
        found = self.find(proto, host_addr, host_port)
        if found is None:
            raise ForwardError(f"no {proto} forward on {host_addr or '*'} port {host_port}")
        return found

    def remove(self, forward: Forward) -> None:
        """Stop listening. TCP connections already forwarded stay as they are; the
        caller ends the UDP flows of the socket (they cannot answer without it)."""
        self.forwards.remove(forward)
        self._close(forward)

    def _on_accept(self, forward: Forward) -> None:
        assert forward.sock is not None
        for _ in range(_ACCEPTS_PER_WAKEUP):
            try:
                conn, peer = forward.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE/ENFILE: the client waits in the backlog
                self._pause_accepting(forward, exc)
                return
            client = client_address(peer)
            if self.splice is not None and _is_loopback(client) and self.splice(
                    conn, len(client) == 16, forward.guest_port):
                continue
            self._open_inbound(conn, client, peer[1], forward.guest_port)

    def _pause_accepting(self, forward: Forward, exc: OSError) -> None:
        """accept() failed (descriptors exhausted): the connection stays in the backlog
        and the listener stays readable, so a level-triggered reader would spin at
        full CPU. Stop watching it for a while, as asyncio's own servers do."""
        assert forward.sock is not None
        log.warning("accept on tcp port %d: %s; retrying in %.0f s", forward.host_port, exc,
                    _ACCEPT_RETRY_S)
        self._loop.remove_reader(forward.sock.fileno())

        def resume() -> None:
            if forward in self.forwards and forward.sock is not None:
                self._watch(forward)

        self._loop.call_later(_ACCEPT_RETRY_S, resume)

    def _on_readable(self, forward: Forward) -> None:
        sock = forward.sock
        assert sock is not None
        for _ in range(_ACCEPTS_PER_WAKEUP):
            try:
                data, peer = sock.recvfrom(_DATAGRAM_MAX)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # an ICMP error for an earlier reply (udp(7))
                log.debug("udp forward port %d: %s", forward.host_port, exc)
                continue
            self._on_datagram(forward, data, peer)

    def _close(self, forward: Forward) -> None:
        if forward.sock is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(forward.sock.fileno())
            forward.sock.close()
            forward.sock = None

    def close(self) -> None:
        for forward in self.forwards:
            self._close(forward)
        self.forwards.clear()


def _bind(proto: str, host_addr: str | None, port: int, interface: str | None) -> socket.socket:
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    if host_addr is None:
        # One dual-stack socket serves both families (ipv6(7): IPV6_V6ONLY off).
        sock = socket.socket(socket.AF_INET6, kind)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        bind_to: tuple[str, int] = ("::", port)
    else:
        try:
            addr = ip_address(host_addr)
        except ValueError:
            raise ForwardError(f"{host_addr!r} is not an IP address") from None
        family = socket.AF_INET6 if isinstance(addr, IPv6Address) else socket.AF_INET
        sock = socket.socket(family, kind)
        bind_to = (str(addr), port)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if interface is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        sock.bind(bind_to)
        if kind == socket.SOCK_STREAM:
            sock.listen(128)
        else:
            size_udp_rcvbuf(sock)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        where = f"[{bind_to[0]}]" if ":" in bind_to[0] else bind_to[0]
        raise ForwardError(f"cannot bind {proto} {where}:{port}: {exc.strerror}") from None
    return sock
