"""The raw ICMP and ICMPv6 sockets that carry guests' pings where ping sockets are refused.

Ping sockets need `net.ipv4.ping_group_range` to include the process's group, and a new
network namespace (and Debian's default) includes nobody, root neither. A process with
CAP_NET_RAW may instead open `socket(AF_INET, SOCK_RAW, IPPROTO_ICMP)` and
`socket(AF_INET6, SOCK_RAW, IPPROTO_ICMPV6)`, as libslirp falls back to. One of each per
event loop, opened when the first echo needs it, serves every `IcmpEchoRelay` on that
loop (many guests in one process share them); they close when the last relay that used
them closes.

Kernel behaviour relied on (raw(7), icmp(7), net/ipv4/raw.c, net/ipv6/raw.c):

* A raw socket receives a copy of every ICMP packet the namespace receives, whoever
  it is for. `ICMP_FILTER` (SOL_RAW) and `ICMP6_FILTER` (IPPROTO_ICMPV6), bitmaps of the
  types to block, narrow that to echo replies in the kernel; every reply still arrives,
  the host's own pings' included, so icmp_echo.py's `RawEchoIds` and `RecentSeqs` decide
  which are a guest's, and the rest are counted (`icmp_raw_replies_ignored`).
* IPv4: recv() returns the IP header too, and raw delivery happens before icmp_rcv()
  verifies the checksum, so we verify it; send() takes the ICMP message alone (no
  IP_HDRINCL), its checksum ours to fill in. IPv6: the ICMPv6 message alone both ways;
  the kernel computes and verifies its checksum (RFC 3542 §3.1).
* Without IP_RECVERR an unconnected raw socket is not told of ICMP errors, so reading
  never fails for an earlier request's sake.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import weakref
from collections import Counter
from ipaddress import ip_address
from typing import TYPE_CHECKING, Protocol

from relaynat.guest_log import guest_logger
from relaynat.icmp_echo import (
    ICMP_ECHO_REPLY,
    ICMPV6_ECHO_REPLY,
    EchoMessage,
    RawEchoIds,
    parse_raw_reply,
)
from relaynat.wire import MalformedFrame

if TYPE_CHECKING:
    from relaynat.host.icmp_relay import RawEchoSession

log = guest_logger("relaynat.icmp")

#: linux/in.h SOL_RAW and linux/icmp.h ICMP_FILTER; linux/icmpv6.h ICMPV6_FILTER.
_SOL_RAW = 255
_ICMP_FILTER = 1
_ICMPV6_FILTER = 1
#: Replies read per socket per readiness callback, so a busy host cannot starve the loop.
_RECV_ROUNDS = 64


class RawEchoUser(Protocol):
    """What the shared sockets need of a relay using them."""

    stats: Counter[str]

    def raw_reply(self, session: RawEchoSession, reply: EchoMessage) -> None: ...


def _icmp_filter() -> bytes:
    """struct icmp_filter: bit n set blocks type n (net/ipv4/raw.c raw_icmp_filter)."""
    return struct.pack("=I", ~(1 << ICMP_ECHO_REPLY) & 0xFFFFFFFF)


def _icmp6_filter() -> bytes:
    """struct icmp6_filter: 256 bits, bit n set blocks type n (Linux keeps the
    ICMP6_FILTER_SETBLOCK sense, net/ipv6/raw.c icmpv6_filter)."""
    words = [0xFFFFFFFF] * 8
    words[ICMPV6_ECHO_REPLY >> 5] &= ~(1 << (ICMPV6_ECHO_REPLY & 31)) & 0xFFFFFFFF
    return struct.pack("=8I", *words)


def open_raw_socket(v6: bool) -> socket.socket:
    """A non-blocking raw ICMP (or ICMPv6) socket that receives only echo replies;
    raises PermissionError without CAP_NET_RAW."""
    if v6:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    try:
        if v6:
            sock.setsockopt(socket.IPPROTO_ICMPV6, _ICMPV6_FILTER, _icmp6_filter())
        else:
            sock.setsockopt(_SOL_RAW, _ICMP_FILTER, _icmp_filter())
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


_HUBS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, RawEchoSockets] = (
    weakref.WeakKeyDictionary())


class RawEchoSockets:
    """The raw sockets of one event loop and the identifiers of every session on them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._socks: dict[bool, socket.socket] = {}
        self.ids: RawEchoIds[tuple[RawEchoUser, RawEchoSession]] = RawEchoIds(
            random.randrange(0x10000))
        self._users: list[RawEchoUser] = []
        self._buf = bytearray(0x10000)

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> RawEchoSockets:
        """The loop's instance (made on first use)."""
        hub = _HUBS.get(loop)
        if hub is None:
            hub = _HUBS[loop] = cls(loop)
        return hub

    def attach(self, user: RawEchoUser) -> None:
        if not any(u is user for u in self._users):
            self._users.append(user)

    def detach(self, user: RawEchoUser) -> None:
        """`user` is done; the last one out closes the sockets."""
        self._users = [u for u in self._users if u is not user]
        if not self._users:
            for sock in self._socks.values():
                with contextlib.suppress(ValueError, OSError):
                    self._loop.remove_reader(sock.fileno())
                sock.close()
            self._socks.clear()
            if _HUBS.get(self._loop) is self:
                del _HUBS[self._loop]

    def get_socket(self, v6: bool, stats: Counter[str]) -> socket.socket:
        """The family's raw socket, opened now if need be (counted in `stats` as
        `icmp_raw_sockets_opened`); raises OSError (PermissionError without
        CAP_NET_RAW)."""
        sock = self._socks.get(v6)
        if sock is None:
            sock = open_raw_socket(v6)
            self._socks[v6] = sock
            self._loop.add_reader(sock.fileno(), self._on_readable, sock, v6)
            stats["icmp_raw_sockets_opened"] += 1
            log.info("ping sockets refused: relaying ICMP%s echo through a raw socket",
                     "v6" if v6 else "")
        return sock

    @property
    def open_sockets(self) -> int:
        return len(self._socks)

    def _ignored(self) -> None:
        # Every relay on the shared sockets saw it, as if each had its own raw socket.
        for user in self._users:
            user.stats["icmp_raw_replies_ignored"] += 1

    def _on_readable(self, sock: socket.socket, v6: bool) -> None:
        buf = self._buf
        view = memoryview(buf)
        for _ in range(_RECV_ROUNDS):
            try:
                n, addr = sock.recvfrom_into(buf)
            except BlockingIOError:
                break
            except OSError as exc:
                log.debug("raw ICMP socket: %s", exc)
                if sock.fileno() < 0:
                    return
                continue
            try:
                reply = parse_raw_reply(view[:n], v6=v6)
            except MalformedFrame as exc:
                for user in self._users:
                    user.stats["drop_" + exc.reason] += 1
                continue
            try:
                host = ip_address(addr[0].partition("%")[0]).packed
            except ValueError:
                self._ignored()
                continue
            owner = self.ids.match(host, reply.ident)
            if owner is None:
                self._ignored()
                continue
            user, session = owner
            user.raw_reply(session, reply)
