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
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

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
