"""What happened to a guest, as plain records: guest ready, flow opened, denied and
closed, transport lost.

An embedder (a VM launcher, a sandbox runtime) subscribes to these through
`Relay.subscribe`/`Relay.events()` or `Guests.subscribe`/`Guests.events()`
(`event_hub.py` delivers them); an audit trail writes them down. They are one model for
both, so every field is JSON-ready: strings, numbers, None, and `Endpoint`s, which are
named tuples and so become `[addr, port]` lists, the shape the control socket's `flows`
reply already uses. `event_dict(event)` gives the dict with its "kind";
`event_from_dict` reads one back.

Each event carries `time` (wall clock, `time.time()`, stamped by the shell when it
emits) and `guest` (the relay's name; None for an unnamed relay such as
`relaynat run`'s one guest).

Every `FlowOpened` is followed by one `FlowClosed` for the same flow. `FlowClosed.how`
is one of `CLOSE_HOW`:

- "closed": both sides sent FIN (TCP);
- "reset_by_guest" / "reset_by_host": that side reset the TCP connection (a host socket
  that failed counts as the host's reset);
- "timeout": the flow ran out of time: idle too long (TCP's idle timeout, UDP's
  conntrack-style timeouts, a ping session's), a TCP connect or handshake that was not
  answered, or data the guest never acknowledged until the relay gave up;
- "policy_cut": a new egress policy denies it and the flow was ended;
- "detached": the relay let go of it: transport lost, relay closed, guest removed, the
  flow exported to another relay, or the forward of an inbound UDP flow removed;
- "refused": the host `connect()` failed (TCP), so the flow never carried data;
- "error": an internal error on the flow (logged), which reset it.

This module does no I/O.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any, ClassVar, NamedTuple, Protocol

#: The values of `FlowClosed.how`.
CLOSE_HOW = frozenset({"closed", "reset_by_guest", "reset_by_host", "timeout", "policy_cut",
                       "detached", "refused", "error"})

#: The values of `GuestReady.source`.
READY_SOURCES = frozenset({"mac", "dhcp", "dhcpv6"})


class Endpoint(NamedTuple):
    """An address and a port as the guest sees them. The port is None where there is
    none (an ICMP echo's far end, a host peer without one); for ICMP echo the guest's
    port is the echo identifier."""

    addr: str
    port: int | None = None

    def __str__(self) -> str:
        if self.port is None:
            return self.addr
        if ":" in self.addr:
            return f"[{self.addr}]:{self.port}"
        return f"{self.addr}:{self.port}"


def endpoint(packed: bytes, port: int | None) -> Endpoint:
    """The endpoint of a packed IPv4 or IPv6 address (a flow key's) and a port."""
    return Endpoint(str(ip_address(packed)), port)


def sockaddr_endpoint(addr: object) -> Endpoint | None:
    """A socket address (`(host, port, ...)`) as an endpoint; None if it is not one. An
    IPv4 client of a dual-stack socket shows as IPv4, not ::ffff:a.b.c.d."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]
        return Endpoint(host, int(addr[1]))
    return None


@dataclass(frozen=True, slots=True)
class Event:
    """Fields every event has: when (wall clock, seconds since the epoch) and whose
    (the relay's name, None when unnamed)."""

    kind: ClassVar[str] = "event"

    time: float
    guest: str | None


@dataclass(frozen=True, slots=True)
class GuestReady(Event):
    """The guest can be reached: its MAC was learned from its first frame (`source`
    "mac"), or the relay gave it a DHCPv4 lease ("dhcp", `ipv4` the leased address) or
    a DHCPv6 reply ("dhcpv6", `ipv6` the address assigned, None when stateless)."""

    kind: ClassVar[str] = "guest_ready"

    mac: str
    ipv4: str | None
    ipv6: str | None
    source: str


@dataclass(frozen=True, slots=True)
class FlowOpened(Event):
    """A flow entered the relay's table: for outbound TCP, when the guest's SYN passed
    the policy and the limits and the host `connect()` began (a connect the host refuses
    then gives a `FlowClosed` with how "refused"); for inbound TCP, when the forward
    accepted its client; for UDP and ICMP echo, when the first datagram or echo request
    created the flow (a moved TCP flow opens where it is imported).

    `host_peer` is where the relay's host socket talks to (the mapped destination, or
    a forwarded port's client), None when not known yet.

    Under an egress policy: `rule` is the index of the rule that allowed the flow (-1:
    its default, or no policy) and `comment` that rule's comment; `names` the names
    the guest's DNS answers held the destination for (only looked up when the policy
    has domain rules); `wire_name` the TLS SNI or HTTP Host the first flight carried,
    for a flow whose name was checked on the wire (its `FlowOpened` comes once the
    name passed and the connect began)."""

    kind: ClassVar[str] = "flow_opened"

    protocol: str
    direction: str
    guest_end: Endpoint
    far: Endpoint
    host_peer: Endpoint | None
    names: tuple[str, ...] = ()
    wire_name: str | None = None
    rule: int = -1
    comment: str = ""


@dataclass(frozen=True, slots=True)
class FlowDenied(Event):
    """The egress policy refused a new flow toward `far`. `rule` is the index of the
    deciding rule in the policy's list, -1 when its default decided; `comment` is that
    rule's comment ("" for none, or the default).

    `reason` is "policy" for a flow the rules refused; for a TCP flow a domain rule
    allowed, why its first flight failed the check on the wire (first_flight.py's
    `DENY_REASONS`: "name_mismatch", "no_sni", "no_host", "ech", "unknown_protocol",
    "first_flight_timeout", "first_flight_too_big"), `rule` and `comment` then the
    allowing rule's. `names` are the names the destination was learned for,
    `wire_name` the SNI or Host read (None: none)."""

    kind: ClassVar[str] = "flow_denied"

    protocol: str
    far: Endpoint
    rule: int
    comment: str
    reason: str = "policy"
    names: tuple[str, ...] = ()
    wire_name: str | None = None


@dataclass(frozen=True, slots=True)
class FlowClosed(Event):
    """A flow left its table. Bytes are payload bytes each way over its whole life
    (ICMP echo: the messages' bytes); `duration_s` runs from its `FlowOpened`; `how` is
    one of `CLOSE_HOW`."""

    kind: ClassVar[str] = "flow_closed"

    protocol: str
    direction: str
    guest_end: Endpoint
    far: Endpoint
    bytes_from_guest: int
    bytes_to_guest: int
    duration_s: float
    how: str


@dataclass(frozen=True, slots=True)
class TransportLost(Event):
    """The guest's link went away (`reason`: what the transport reported)."""

    kind: ClassVar[str] = "transport_lost"

    reason: str


@dataclass(frozen=True, slots=True)
class DnsQuery(Event):
    """A DNS query of the guest's to the relay's DNS address, under a policy with domain
    rules (or while anyone listens): `name` as asked (normalised), `qtype` ("A", "AAAA",
    "HTTPS", ... or the type's number), the addresses the answer gave for it (CNAME
    chain followed) and `action`: "forwarded" (emitted when the upstream's answer came
    back), "refused" (no allow rule covers the name: answered REFUSED, never
    forwarded), "empty" (an HTTPS or SVCB query answered with no data) or "static"
    (answered from the static records)."""

    kind: ClassVar[str] = "dns_query"

    name: str
    qtype: str
    answers: tuple[str, ...]
    action: str


class EventSink(Protocol):
    """Where the relay's parts emit events (the shell's `EventHub`). An emitter tests
    `listening` first and builds nothing when it is False: with no subscriber an event
    costs that one attribute test."""

    #: Whether anyone receives events now.
    listening: bool
    #: The relay's name, for the events' `guest`.
    guest: str | None

    def emit(self, event: Event) -> None:
        """Deliver `event` to every subscriber."""
        ...

    def denied(self, proto: int, dst: bytes, dport: int, rule: int, comment: str, *,
               reason: str = "policy", names: tuple[str, ...] = (),
               wire_name: str | None = None) -> None:
        """A new guest flow was refused (`FlowDenied`'s fields): an event, and a log
        line within the sink's rate."""
        ...


class _Silent:
    """The sink of a part that no relay gave one: nobody listens."""

    def __init__(self) -> None:
        self.listening = False
        self.guest: str | None = None

    def emit(self, event: Event) -> None:
        pass

    def denied(self, proto: int, dst: bytes, dport: int, rule: int, comment: str, *,
               reason: str = "policy", names: tuple[str, ...] = (),
               wire_name: str | None = None) -> None:
        pass


#: A sink nobody listens to, the default of the parts before a relay wires them.
SILENT: EventSink = _Silent()

#: Every event class by its `kind`.
EVENT_TYPES: dict[str, type[Event]] = {
    cls.kind: cls for cls in (GuestReady, FlowOpened, FlowDenied, FlowClosed, TransportLost,
                              DnsQuery)
}

_ENDPOINT_FIELDS = frozenset({"guest_end", "far", "host_peer"})


def event_dict(event: Event) -> dict[str, object]:
    """The event as a JSON-ready dict: "kind" first, then its fields in order, each
    `Endpoint` as an `[addr, port]` list and each tuple of names a list."""
    out: dict[str, object] = {"kind": event.kind}
    for field in dataclasses.fields(event):
        value = getattr(event, field.name)
        out[field.name] = list(value) if isinstance(value, tuple) else value
    return out


def event_from_dict(data: dict[str, object]) -> Event:
    """The event `event_dict` (or its JSON, loaded) describes. A ValueError names what
    is wrong: an unknown kind, a missing or an unknown field."""
    kind = data.get("kind")
    cls = EVENT_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"unknown event kind {kind!r}")
    names = {field.name for field in dataclasses.fields(cls)}
    optional = {field.name for field in dataclasses.fields(cls)
                if field.default is not dataclasses.MISSING}
    extra = set(data) - names - {"kind"}
    if extra:
        raise ValueError(f"{kind} event: unknown fields {sorted(extra)}")
    args: dict[str, Any] = {}
    for name in names:
        if name not in data:
            if name in optional:
                continue
            raise ValueError(f"{kind} event: missing field {name!r}")
        value = data[name]
        if name in _ENDPOINT_FIELDS and value is not None:
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                raise ValueError(f"{kind} event: {name} is not [addr, port]: {value!r}")
            value = Endpoint(*value)
        if name == "names" and isinstance(value, list):
            value = tuple(value)
        if name == "answers" and isinstance(value, list):
            value = tuple(value)
        args[name] = value
    return cls(**args)
