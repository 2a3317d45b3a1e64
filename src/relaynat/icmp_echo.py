"""ICMP echo for the guest, the sans-I/O part: parsing the guest's echo requests and the
host's replies, building reply frames, and the bounded table of echo sessions.

Validation follows RFC 792 (type 8, code 0, Internet checksum over the whole ICMP
message, no pseudo-header) and RFC 4443 §4.1 (type 128, code 0, checksum with the IPv6
pseudo-header, §2.3). host/icmp_relay.py executes these with ping sockets.

`EchoSessionState` is a session as a same-host handover carries it to a new relay process
(moving/handover.py), its ping socket passed beside it; `parse_sessions` checks a list.

Where ping sockets are refused but the process may open raw ICMP sockets (CAP_NET_RAW),
host/icmp_raw.py relays echo through one shared raw socket per family instead. A raw
socket does not demultiplex: it receives every echo reply in the host's network
namespace. So each session gets an identifier of the relay's choosing (`RawEchoIds`,
unique per destination among all the process's raw sessions: two guests using the same
identifier toward one address stay apart) and remembers the sequence numbers it sent
(`RecentSeqs`); a reply reaches a guest only if its (identifier, source) names a live
session and its sequence number is one that session sent. libslirp (ip_icmp.c) instead
opens a raw socket per request and takes the first packet it reads; that hands a guest
whatever echo reply of the host arrives first.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, fields
from ipaddress import ip_address
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from relaynat.checksum import finish, partial_sum, pseudo_header_sum, verify
from relaynat.flow_state import FlowStateError, parse_fields
from relaynat.packet_builder import IPV4_HLEN, ip_frame
from relaynat.udp_flow import check_address, check_count, check_index, check_seconds
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


def echo_request_message(ident: int, seq: int, payload: bytes | memoryview, *,
                         v6: bool) -> bytes:
    """An echo request (ICMP message: header and payload) to send on a raw socket, with
    identifier `ident`. IPv4: the checksum is filled in (RFC 792; a raw ICMP socket
    sends what it is given). IPv6: left zero, the kernel computes it with the pseudo-
    header (RFC 3542 §3.1: a raw ICMPv6 socket always checksums at offset 2)."""
    head = bytearray(_ICMP.pack(ICMPV6_ECHO_REQUEST if v6 else ICMP_ECHO_REQUEST, 0, 0,
                                ident & 0xFFFF, seq & 0xFFFF))
    if not v6:
        struct.pack_into("!H", head, 2, finish(partial_sum(head) + partial_sum(payload)))
    return bytes(head) + bytes(payload)


def parse_raw_reply(data: bytes | bytearray | memoryview, *, v6: bool) -> EchoMessage:
    """Read an echo reply as a raw socket delivers it: IPv4, the IP header (its length
    from IHL) then the ICMP message, whose checksum is verified here (raw sockets get
    packets before icmp_rcv checks them); IPv6, the ICMPv6 message alone, its checksum
    verified by the kernel. Raises `MalformedFrame` (`icmp_reply_short`,
    `icmp_reply_checksum`, `icmp_reply_type`)."""
    if not v6:
        if len(data) < IPV4_HLEN:
            raise MalformedFrame("icmp_reply_short")
        ihl = (data[0] & 0x0F) * 4
        if ihl < IPV4_HLEN or len(data) < ihl:
            raise MalformedFrame("icmp_reply_short")
        data = memoryview(data)[ihl:]
        if len(data) >= ICMP_HLEN and not verify(data):
            raise MalformedFrame("icmp_reply_checksum")
    reply = parse_echo_reply(data)
    if data[0] != (ICMPV6_ECHO_REPLY if v6 else ICMP_ECHO_REPLY):
        raise MalformedFrame("icmp_reply_type")
    return reply


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
        """Insert a new session, last seen at `now` (earlier for one moved here from
        another relay); raises KeyError if present, OverflowError if full."""
        if key in self._entries:
            raise KeyError(key)
        if self.full:
            raise OverflowError("echo table full")
        self._entries[key] = (value, now)

    def touch(self, key: K, now: float) -> None:
        item = self._entries.get(key)
        if item is not None:
            self._entries[key] = (item[0], now)

    def last_seen(self, key: K) -> float | None:
        """When the session saw its last packet either way (None: no such session)."""
        item = self._entries.get(key)
        return None if item is None else item[1]

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


# -- raw sockets: identifiers and matching --------------------------------------------------


class RawEchoIds(Generic[V]):
    """Echo identifiers for sessions sharing a raw socket, keyed by the destination's
    address (packed bytes) as the host sees it: a reply is theirs if its source is that
    address and its identifier the one allocated here.

    Allocation walks a cursor through 0..65535 (seeded by the caller, e.g. at random, so
    that two processes are unlikely to start in step) and skips identifiers in use
    toward the same address, so a freed identifier is not reused at once: a late reply
    to a closed session does not land in a new one.
    """

    def __init__(self, start: int = 0) -> None:
        self._next = start & 0xFFFF
        self._live: dict[tuple[bytes, int], V] = {}
        self._per_host: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self._live)

    def allocate(self, host: bytes, value: V) -> int:
        """A free identifier toward `host`, now naming `value`; OverflowError if all
        65536 are taken toward that address."""
        if self._per_host.get(host, 0) > 0xFFFF:
            raise OverflowError("every echo identifier toward this address is in use")
        ident = self._next
        while (host, ident) in self._live:
            ident = (ident + 1) & 0xFFFF
        self._next = (ident + 1) & 0xFFFF
        self._live[(host, ident)] = value
        self._per_host[host] = self._per_host.get(host, 0) + 1
        return ident

    def release(self, host: bytes, ident: int) -> None:
        """Free `ident` toward `host` (nothing if it is not allocated)."""
        if self._live.pop((host, ident), None) is None:
            return
        left = self._per_host[host] - 1
        if left:
            self._per_host[host] = left
        else:
            del self._per_host[host]

    def match(self, host: bytes, ident: int) -> V | None:
        """Whose is a reply from `host` with identifier `ident` (None: nobody's)."""
        return self._live.get((host, ident))


class RecentSeqs:
    """The sequence numbers a raw echo session sent lately (at most `capacity`, the
    oldest forgotten first): a reply with any other is not an answer to this guest."""

    __slots__ = ("_seqs", "capacity")

    def __init__(self, capacity: int = 256) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._seqs: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seqs)

    def sent(self, seq: int) -> None:
        seqs = self._seqs
        seqs[seq] = None
        seqs.move_to_end(seq)
        if len(seqs) > self.capacity:
            seqs.popitem(last=False)

    def __contains__(self, seq: object) -> bool:
        return seq in self._seqs


# -- moving a session to another relay ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class EchoSessionState:
    """One ping session moving to a relay in another process on this host, its ping
    socket passed beside it (moving/handover.py): `guest` (the guest's address and its
    ICMP identifier), `far` (the address the guest pings), `host` (where that is on the
    host: the socket's destination), `guest_mac`, `fd` (the socket's index among the
    descriptors passed), `idle_s` and `age_s` (seconds since its last packet and since
    it opened: its idle timeout goes on where it was) and its byte counters. The
    kernel's identifier of the socket (its bound "port") travels with the socket."""

    guest: tuple[str, int]
    far: str
    host: str
    guest_mac: bytes
    fd: int | None
    idle_s: float
    age_s: float
    bytes_from_guest: int
    bytes_to_guest: int

    @property
    def key(self) -> tuple[int, bytes, bytes]:
        """The session's key in `IcmpEchoRelay` (identifier, far, guest address)."""
        return (self.guest[1], ip_address(self.far).packed, ip_address(self.guest[0]).packed)

    def to_dict(self) -> dict[str, Any]:
        return {"guest": list(self.guest), "far": self.far, "host": self.host,
                "guest_mac": self.guest_mac.hex(":"), "fd": self.fd, "idle_s": self.idle_s,
                "age_s": self.age_s, "bytes_from_guest": self.bytes_from_guest,
                "bytes_to_guest": self.bytes_to_guest}

    @classmethod
    def from_dict(cls, data: Any) -> EchoSessionState:
        """Parse and check `to_dict`'s output; FlowStateError (a ValueError) names the field."""
        state = cls(**parse_fields(data, "a session", [f.name for f in fields(cls)],
                                   _SESSION_PARSERS))
        versions = {ip_address(a).version for a in (state.guest[0], state.far, state.host)}
        if len(versions) != 1:
            raise FlowStateError("fields guest, far, host: not one address family")
        return state


def parse_sessions(records: Any) -> list[EchoSessionState]:
    """A list of `EchoSessionState` records, all checked, no two with one key;
    FlowStateError names the first bad one (`sessions[i]: ...`)."""
    if not isinstance(records, list):
        raise FlowStateError("not a list of sessions")
    states: list[EchoSessionState] = []
    keys: set[tuple[int, bytes, bytes]] = set()
    for i, data in enumerate(records):
        try:
            state = EchoSessionState.from_dict(data)
        except FlowStateError as exc:
            raise FlowStateError(f"sessions[{i}]: {exc}") from None
        if state.key in keys:
            raise FlowStateError(f"sessions[{i}]: a second session {state.guest} -> {state.far}")
        keys.add(state.key)
        states.append(state)
    return states


def _guest_end(value: Any) -> tuple[str, int]:
    if not isinstance(value, list) or len(value) != 2 or type(value[1]) is not int \
            or not 0 <= value[1] <= 0xFFFF:
        raise ValueError(f"{value!r} is not [address, identifier]")
    return check_address(value[0]), value[1]


def _mac(value: Any) -> bytes:
    if not isinstance(value, str) or len(value) != 17:
        raise ValueError(f"{value!r} is not a MAC address")
    return bytes.fromhex(value.replace(":", ""))


_SESSION_PARSERS: dict[str, Any] = {
    "guest": _guest_end, "far": check_address, "host": check_address, "guest_mac": _mac,
    "fd": lambda v: None if v is None else check_index(v), "idle_s": check_seconds,
    "age_s": check_seconds, "bytes_from_guest": check_count, "bytes_to_guest": check_count,
}
