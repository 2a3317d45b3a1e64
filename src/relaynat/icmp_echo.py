"""ICMP echo for the guest, the sans-I/O part: parsing the guest's echo requests and the
host's replies, building reply frames, and the bounded table of echo sessions.

Validation follows RFC 792 (type 8, code 0, Internet checksum over the whole ICMP
message, no pseudo-header) and RFC 4443 §4.1 (type 128, code 0, checksum with the IPv6
pseudo-header, §2.3). host/icmp_relay.py executes these with ping sockets.
"""

from __future__ import annotations

import struct
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from relaynat.checksum import finish, partial_sum, pseudo_header_sum, verify
from relaynat.packet_builder import IPV4_HLEN, ip_frame
from relaynat.wire import IPPROTO_ICMP, IPPROTO_ICMPV6, MalformedFrame

if TYPE_CHECKING:
    from relaynat.wire import IpPacket

ICMP_ECHO_REPLY = 0
ICMP_ECHO_REQUEST = 8
ICMPV6_ECHO_REQUEST = 128
ICMPV6_ECHO_REPLY = 129
ICMP_HLEN = 8
#: Largest ICMP message one IPv4 packet carries (65535 minus a 20-byte header).
ICMP_MAX = 0xFFFF - IPV4_HLEN
_ICMP = struct.Struct("!BBHHH")  # type, code, checksum, identifier, sequence


@dataclass(slots=True, frozen=True)
class EchoMessage:
    """An echo request or reply: addresses as packed bytes (None for a reply read from a
    ping socket, which carries no IP header); `payload` is a copy."""

    ident: int
    seq: int
    payload: bytes
    src: bytes | None = None
    dst: bytes | None = None


def parse_echo_request(ip: IpPacket) -> EchoMessage:
    """Validate the guest's ICMP (RFC 792) or ICMPv6 (RFC 4443) message as an echo request.

    Raises `MalformedFrame` with reason `icmp_short`, `icmp_checksum`, `icmp_type` (any
    type but echo request, e.g. the guest's own replies or errors) or `icmp_code` (the
    kernel refuses echo requests with a non-zero code, so we refuse them first).
    """
    data = ip.payload
    if len(data) < ICMP_HLEN:
        raise MalformedFrame("icmp_short")
    icmp_type, code, _csum, ident, seq = _ICMP.unpack_from(data)
    v6 = len(ip.src) == 16
    pseudo = pseudo_header_sum(ip.src, ip.dst, IPPROTO_ICMPV6, len(data)) if v6 else 0
    if not verify(data, pseudo):
        raise MalformedFrame("icmp_checksum")
    if icmp_type != (ICMPV6_ECHO_REQUEST if v6 else ICMP_ECHO_REQUEST):
        raise MalformedFrame("icmp_type")
    if code != 0:
        raise MalformedFrame("icmp_code")
    return EchoMessage(ident, seq, bytes(data[ICMP_HLEN:]), ip.src, ip.dst)


def parse_echo_reply(data: bytes | bytearray | memoryview) -> EchoMessage:
    """Read an echo reply as a ping socket delivers it (ICMP header and payload).

    The checksum is not re-verified: the kernel has done so before queueing it.
    Raises `MalformedFrame` (`icmp_reply_short`, `icmp_reply_type`).
    """
    if len(data) < ICMP_HLEN:
        raise MalformedFrame("icmp_reply_short")
    icmp_type, code, _csum, ident, seq = _ICMP.unpack_from(data)
    if icmp_type not in (ICMP_ECHO_REPLY, ICMPV6_ECHO_REPLY) or code != 0:
        raise MalformedFrame("icmp_reply_type")
    return EchoMessage(ident, seq, bytes(data[ICMP_HLEN:]))


def echo_reply_frame(*, dst_mac: bytes, src_mac: bytes, src: bytes, dst: bytes, ident: int,
                     seq: int, payload: bytes | memoryview, ip_ident: int = 0,
                     ttl: int = 64) -> bytes:
    """A complete Ethernet/IP/ICMP (or ICMPv6, by the address length) echo reply frame
    with the checksums filled in.

    `src` is the address the guest pinged (not where it maps on the host), `dst` the
    guest; `ident`/`seq` are the guest's own. Raises ValueError if the payload cannot
    fit one IP packet.
    """
    length = ICMP_HLEN + len(payload)
    if length > ICMP_MAX:
        raise ValueError(f"ICMP message of {length} bytes does not fit one IP packet")
    v6 = len(src) == 16
    head = bytearray(_ICMP.pack(ICMPV6_ECHO_REPLY if v6 else ICMP_ECHO_REPLY, 0, 0,
                                ident & 0xFFFF, seq & 0xFFFF))
    pseudo = pseudo_header_sum(src, dst, IPPROTO_ICMPV6, length) if v6 else 0
    struct.pack_into("!H", head, 2, finish(pseudo + partial_sum(head) + partial_sum(payload)))
    return ip_frame(dst_mac, src_mac, src, dst, IPPROTO_ICMPV6 if v6 else IPPROTO_ICMP,
                    bytes(head) + bytes(payload), ip_ident, ttl)


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class EchoTable(Generic[K, V]):
    """Bounded table of echo sessions with an idle timeout, without I/O or clocks.

    `touch` on every packet either way; `expired(now)` pops the sessions idle for at
    least `idle_timeout_s`. Insertion order is kept, so the oldest-created entries are
    checked first; expiry is exact per entry regardless of order.
    """

    def __init__(self, capacity: int, idle_timeout_s: float) -> None:
        if capacity < 1 or not idle_timeout_s > 0:
            raise ValueError("capacity must be >= 1 and the idle timeout positive")
        self.capacity = capacity
        self.idle_timeout_s = idle_timeout_s
        self._entries: dict[K, tuple[V, float]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: K) -> V | None:
        item = self._entries.get(key)
        return None if item is None else item[0]

    @property
    def full(self) -> bool:
        return len(self._entries) >= self.capacity

    def add(self, key: K, value: V, now: float) -> None:
        """Insert a new session; raises KeyError if present, OverflowError if full."""
        if key in self._entries:
            raise KeyError(key)
        if self.full:
            raise OverflowError("echo table full")
        self._entries[key] = (value, now)

    def touch(self, key: K, now: float) -> None:
        item = self._entries.get(key)
        if item is not None:
            self._entries[key] = (item[0], now)

    def pop(self, key: K) -> V | None:
        item = self._entries.pop(key, None)
        return None if item is None else item[0]

    def expired(self, now: float) -> list[tuple[K, V]]:
        """Remove and return every session idle for `idle_timeout_s` or longer."""
        timeout = self.idle_timeout_s
        gone = [k for k, (_v, last) in self._entries.items() if last + timeout <= now]
        return [(k, self._entries.pop(k)[0]) for k in gone]

    def next_deadline(self) -> float | None:
        """When the next session would expire if nothing touches it; None if empty."""
        if not self._entries:
            return None
        return min(last for _v, last in self._entries.values()) + self.idle_timeout_s

    def items(self) -> Iterator[tuple[K, V]]:
        return ((k, v) for k, (v, _last) in self._entries.items())

    def clear(self) -> list[V]:
        values = [v for v, _last in self._entries.values()]
        self._entries.clear()
        return values
