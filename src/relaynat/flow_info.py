"""`FlowInfo`: one open flow as `Relay.flows()` describes it.

Every relay part (TCP, UDP, ICMP echo) describes its flows the same way whatever the
protocol (host/flowinfo.py builds them from the live flows). The ends are `Endpoint`s
(relaynat.events), so `str(info.far)` reads "10.0.2.2:80" or "[fd00::2]:80", and
`info.far.port` is an int or None. `to_dict()` gives the JSON shape the control
socket's `flows` reply and `relaynat ctl flows` use, the ends as [addr, port] lists.

Reading a flow never changes it. This module does no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from relaynat.events import Endpoint

__all__ = ["FlowInfo"]


@dataclass(frozen=True, slots=True)
class FlowInfo:
    """One open flow, as the relay saw it when `Relay.flows()` was called."""

    protocol: str
    """"tcp", "udp" or "icmp" (ICMP echo, a ping session)."""

    direction: str
    """"outbound": the guest opened it; "inbound": a client of a forwarded port did."""

    guest_end: Endpoint
    """The guest's address and port. For ICMP echo the port is the echo identifier."""

    far: Endpoint
    """The other end as the guest sees it (the destination it sent to, or for an
    inbound flow the address the forwarded client appears as). Its port is None for
    ICMP echo."""

    host_peer: Endpoint | None
    """Where the relay's host socket talks to: the mapped destination, or the
    forwarded port's client; None when not known (a UDP socket whose peer cannot be
    read). An IPv4 client of a dual-stack forward shows as IPv4, not ::ffff:a.b.c.d.
    Its port is None for ICMP echo."""

    state: str
    """TCP: the state's name ("syn_sent", "established", "fin_wait_1", ...). UDP:
    "answered" once the far end replied, else "unanswered" (conntrack's assured).
    ICMP echo: "open"."""

    bytes_from_guest: int
    """Bytes the guest sent on this flow: TCP, the stream's bytes the host socket took;
    UDP, the datagrams' payload; ICMP echo, the echo messages, their 8-byte header
    included."""

    bytes_to_guest: int
    """Bytes sent to the guest on this flow, counted the same way (TCP: those the
    guest acknowledged)."""

    guest_window: int | None
    """TCP: bytes the guest's last advertised window still allows the relay to send
    (its right edge minus what was sent; 0 when the guest shrank it below what is in
    flight). None for UDP and ICMP."""

    rtt_us: int | None
    """TCP: the host socket's smoothed RTT as the kernel measures it (TCP_INFO's
    tcpi_rtt, microseconds); None while connecting, when the kernel's struct is too
    short, and for UDP and ICMP."""

    def to_dict(self) -> dict[str, object]:
        """The JSON-ready dict of the control socket's `flows` reply: the same fields,
        with `guest_end` under "guest" and each end as an [addr, port] list."""
        return {
            "protocol": self.protocol,
            "direction": self.direction,
            "guest": list(self.guest_end),
            "far": list(self.far),
            "host_peer": list(self.host_peer) if self.host_peer is not None else None,
            "state": self.state,
            "bytes_from_guest": self.bytes_from_guest,
            "bytes_to_guest": self.bytes_to_guest,
            "guest_window": self.guest_window,
            "rtt_us": self.rtt_us,
        }
