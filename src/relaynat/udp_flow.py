"""UDP flows, the sans-I/O part: the bounded flow table and its idle timeouts.

A flow is one (guest port, destination as the guest sees it, destination port, guest
address); the
shell (host/udp_relay.py) gives each a connected host socket. Timeouts follow Linux
conntrack and passt: a flow that has only seen one direction expires after
`udp_idle_timeout_s` (nf_conntrack_udp_timeout, 30 s); once the host has answered it
is a "stream" and lives `udp_stream_timeout_s` (nf_conntrack_udp_timeout_stream,
120 s) past its last datagram either way. A flow may carry its own fixed timeout
instead: DNS flows live 10 s past their last datagram, as slirp's SO_EXPIREFAST, since
every resolver query comes from a fresh port and would otherwise hold a table slot
for two minutes.

`UdpFlowState` is a flow as a same-host handover carries it to a new relay process
(moving/handover.py): its socket travels beside it, and the record says where it is
connected, how long the flow has been idle (so its timeout goes on where it was), its
answered state and its counters. `parse_flows` checks a list of them field by field.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from ipaddress import ip_address
from typing import Any

from relaynat.flow_state import FlowStateError, parse_fields

#: (guest port, destination address as the guest sees it, destination port, guest
#: address): an IPv6 guest may use several source addresses at once (SLAAC, DHCPv6).
UdpFlowKey = tuple[int, bytes, int, bytes]

@dataclass(slots=True, eq=False)
class UdpFlow:
    key: UdpFlowKey
    last_activity: float
    #: The host side has answered at least once: the longer timeout applies.
    replied: bool = False
    #: IPv4 header + first 8 bytes of the guest's last datagram, quoted in an ICMP
    #: port unreachable (RFC 792) so the guest kernel can match it to its socket.
    quote: bytes = b""
    #: Overrides both timeouts when set (DNS flows).
    fixed_timeout: float | None = None
    #: The shell's I/O object (the host socket); never touched here.
    sock: Any = field(default=None)
    #: An inbound flow (a client of a forwarded port): the client's socket address,
    #: and `sock` is the forward's socket, shared by all its clients.
    peer: Any = field(default=None)
    #: Payload bytes relayed each way (for listings; the relay's stats sum all flows).
    bytes_from_guest: int = 0
    bytes_to_guest: int = 0

    def from_guest(self, now: float, quote: bytes) -> None:
        self.last_activity = now
        self.quote = quote

    def from_host(self, now: float) -> None:
        self.last_activity = now
        self.replied = True

    def deadline(self, idle_s: float, stream_s: float) -> float:
        if self.fixed_timeout is not None:
            return self.last_activity + self.fixed_timeout
        return self.last_activity + (stream_s if self.replied else idle_s)


class UdpFlowTable:
    """At most `limit` flows; `expired(now)` removes and yields the ones that timed out."""

    def __init__(self, limit: int, idle_s: float, stream_s: float) -> None:
        self.limit = limit
        self.idle_s = idle_s
        self.stream_s = stream_s
        self.flows: dict[UdpFlowKey, UdpFlow] = {}

    def __len__(self) -> int:
        return len(self.flows)

    def get(self, key: UdpFlowKey) -> UdpFlow | None:
        return self.flows.get(key)

    def open(self, key: UdpFlowKey, now: float,
             fixed_timeout: float | None = None) -> UdpFlow | None:
        """A new flow, or None when the table is full (the caller drops the datagram)."""
        if key in self.flows:
            raise KeyError(f"flow {key!r} exists")
        if len(self.flows) >= self.limit:
            return None
        flow = self.flows[key] = UdpFlow(key, now, fixed_timeout=fixed_timeout)
        return flow

    def insert(self, flow: UdpFlow) -> None:
        """Put `flow` (moved here from another relay) in the table; the caller checked
        there is room and no flow with its key (KeyError otherwise)."""
        if flow.key in self.flows:
            raise KeyError(f"flow {flow.key!r} exists")
        self.flows[flow.key] = flow

    def remove(self, flow: UdpFlow) -> None:
        if self.flows.get(flow.key) is flow:
            del self.flows[flow.key]

    def next_deadline(self) -> float | None:
        if not self.flows:
            return None
        return min(f.deadline(self.idle_s, self.stream_s) for f in self.flows.values())

    def expired(self, now: float) -> Iterator[UdpFlow]:
        done = [f for f in self.flows.values() if f.deadline(self.idle_s, self.stream_s) <= now]
        for flow in done:
            del self.flows[flow.key]
            yield flow


# -- moving a flow to another relay ------------------------------------------------------

#: A socket address as JSON carries it: [address, port] (IPv4, or a connected peer),
#: or [address, port, flowinfo, scope id] as recvfrom gives an IPv6 client.
SockAddrList = tuple[Any, ...]
#: Longest quote kept (an IPv6 header with extension headers, and 8 bytes of UDP).
_QUOTE_MAX = 256


@dataclass(frozen=True, slots=True)
class UdpFlowState:
    """One UDP flow moving to a relay in another process on this host, its socket
    passed beside it (moving/handover.py).

    - `guest`, `far`: (address, port) of the guest's end and of the far end as the
      guest sees it: the flow's key.
    - `fd`: the index of its connected socket among the descriptors passed (None for an
      inbound flow, whose socket is its forward's), `forward`: an inbound flow's forward,
      its index among the forwards handed over (None for an outbound flow).
    - `peer`: an outbound flow's socket's peer (address, port), checked by the receiver;
      an inbound flow's client, as recvfrom gives it (address, port, and for IPv6
      flowinfo and scope id), to which the guest's datagrams go.
    - `idle_s`: seconds since its last datagram either way, `age_s` since it opened; the
      receiver goes on from them, so the flow expires when it would have here.
    - `replied`, `quote`, `fixed_timeout_s`, `bytes_from_guest`, `bytes_to_guest`: as
      `UdpFlow`'s (`fixed_timeout_s`: a DNS or inbound flow's own timeout, kept).
    """

    guest: tuple[str, int]
    far: tuple[str, int]
    fd: int | None
    forward: int | None
    peer: SockAddrList
    idle_s: float
    age_s: float
    replied: bool
    fixed_timeout_s: float | None
    quote: bytes
    bytes_from_guest: int
    bytes_to_guest: int

    @property
    def key(self) -> UdpFlowKey:
        return (self.guest[1], ip_address(self.far[0]).packed, self.far[1],
                ip_address(self.guest[0]).packed)

    def to_dict(self) -> dict[str, Any]:
        return {"guest": list(self.guest), "far": list(self.far), "fd": self.fd,
                "forward": self.forward, "peer": list(self.peer), "idle_s": self.idle_s,
                "age_s": self.age_s, "replied": self.replied,
                "fixed_timeout_s": self.fixed_timeout_s, "quote": self.quote.hex(),
                "bytes_from_guest": self.bytes_from_guest,
                "bytes_to_guest": self.bytes_to_guest}

    @classmethod
    def from_dict(cls, data: Any) -> UdpFlowState:
        """Parse and check `to_dict`'s output; FlowStateError names the field."""
        state = cls(**parse_fields(data, "a flow", [f.name for f in fields(cls)], _PARSERS))
        if (state.fd is None) == (state.forward is None):
            raise FlowStateError("fields fd, forward: exactly one is set (an outbound flow "
                                "has its socket, an inbound one its forward's)")
        if ip_address(state.guest[0]).version != ip_address(state.far[0]).version:
            raise FlowStateError("fields guest and far: not the same address family")
        if state.fd is not None and len(state.peer) != 2:
            raise FlowStateError("field peer: an outbound flow's peer is [address, port]")
        return state


def state_of(flow: UdpFlow, now: float, opened_at: float, peer: SockAddrList,
             forward: int | None) -> UdpFlowState:
    """`flow`'s record at `now` (loop time), opened at `opened_at`; its socket's index
    is set by whoever passes the descriptors (`dataclasses.replace`, fd)."""
    guest_port, far, far_port, guest = flow.key
    return UdpFlowState(
        guest=(str(ip_address(guest)), guest_port), far=(str(ip_address(far)), far_port),
        fd=None, forward=forward, peer=tuple(peer),
        idle_s=max(0.0, now - flow.last_activity), age_s=max(0.0, now - opened_at),
        replied=flow.replied, fixed_timeout_s=flow.fixed_timeout, quote=flow.quote,
        bytes_from_guest=flow.bytes_from_guest, bytes_to_guest=flow.bytes_to_guest)


def flow_from(state: UdpFlowState, now: float) -> UdpFlow:
    """A `UdpFlow` going on from `state` at `now` (loop time), without its socket (an
    inbound one with its client's address)."""
    flow = UdpFlow(state.key, now - state.idle_s, replied=state.replied, quote=state.quote,
                   fixed_timeout=state.fixed_timeout_s,
                   peer=None if state.forward is None else state.peer)
    flow.bytes_from_guest, flow.bytes_to_guest = state.bytes_from_guest, state.bytes_to_guest
    return flow


def parse_flows(records: Any) -> list[UdpFlowState]:
    """A list of `UdpFlowState` records, all checked, no two with one key; FlowStateError
    names the first bad one (`flows[i]: ...`)."""
    if not isinstance(records, list):
        raise FlowStateError("not a list of flows")
    states: list[UdpFlowState] = []
    keys: set[UdpFlowKey] = set()
    for i, data in enumerate(records):
        try:
            state = UdpFlowState.from_dict(data)
        except FlowStateError as exc:
            raise FlowStateError(f"flows[{i}]: {exc}") from None
        if state.key in keys:
            raise FlowStateError(f"flows[{i}]: a second flow {state.guest} -> {state.far}")
        keys.add(state.key)
        states.append(state)
    return states


def check_index(value: Any) -> int:
    """A descriptor's or a forward's index in a handover document."""
    if type(value) is not int or value < 0:
        raise ValueError(f"{value!r} is not an index")
    return value


def check_count(value: Any) -> int:
    if type(value) is not int or not 0 <= value < 1 << 64:
        raise ValueError(f"{value!r} is not a 64-bit unsigned count")
    return value


def check_seconds(value: Any) -> float:
    """A duration: a finite number of seconds, not negative (JSON may give an int)."""
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{value!r} is not a number of seconds")
    return float(value)


def check_address(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not an address")
    return str(ip_address(value))


def _endpoint(value: Any) -> tuple[str, int]:
    if not isinstance(value, list) or len(value) != 2 or type(value[1]) is not int \
            or not 0 < value[1] <= 0xFFFF:
        raise ValueError(f"{value!r} is not [address, port]")
    return check_address(value[0]), value[1]


def _sockaddr(value: Any) -> SockAddrList:
    """[address, port] or [address, port, flowinfo, scope id]; an IPv6 address may carry
    its zone ("fe80::1%eth0"), as recvfrom writes a link-local client's."""
    if not isinstance(value, list) or len(value) not in (2, 4):
        raise ValueError(f"{value!r} is not a socket address")
    addr, port, *rest = value
    if not isinstance(addr, str) or type(port) is not int or not 0 < port <= 0xFFFF \
            or not all(type(v) is int and 0 <= v < 1 << 32 for v in rest):
        raise ValueError(f"{value!r} is not a socket address")
    ip_address(addr.split("%", 1)[0])
    return (addr, port, *rest)


def _quote(value: Any) -> bytes:
    if not isinstance(value, str) or len(value) > 2 * _QUOTE_MAX:
        raise ValueError(f"{value!r} is not a quote of at most {_QUOTE_MAX} bytes in hex")
    return bytes.fromhex(value)


def _bool(value: Any) -> bool:
    if type(value) is not bool:
        raise ValueError(f"{value!r} is not true or false")
    return value


def _timeout(value: Any) -> float | None:
    if value is None:
        return None
    seconds = check_seconds(value)
    if seconds == 0:
        raise ValueError("0 is not a timeout")
    return seconds


_PARSERS: dict[str, Any] = {
    "guest": _endpoint, "far": _endpoint,
    "fd": lambda v: None if v is None else check_index(v),
    "forward": lambda v: None if v is None else check_index(v),
    "peer": _sockaddr, "idle_s": check_seconds, "age_s": check_seconds, "replied": _bool,
    "fixed_timeout_s": _timeout, "quote": _quote, "bytes_from_guest": check_count,
    "bytes_to_guest": check_count,
}
