"""The serialized form of established TCP flows moving from one relay to another.

No I/O: this module turns a flow's relay-side state (`TcpNatEntry`) plus its host
socket's kernel state (`repair_state.RepairState`) into a plain JSON-able document and
back, checking every field. host/flow_move.py does the socket work around it.

The document (version 2)::

    {"format": "relaynat-flows", "version": 2,
     "flows": [FLOW, ...],
     "not_moved": [{"protocol": "tcp"|"udp"|"icmp", "guest": [ip, port],
                    "far": [ip, port or null], "reason": "..."}, ...]}

Each FLOW is one ESTABLISHED TCP flow, every field required, no other field allowed:

- ``guest``, ``far``: [address, port] of the guest and of the far end as the guest
  sees it (the relay's flow key); ``inbound``: a client of a forwarded port opened it.
- ``guest_mac``, ``gateway_mac``: the Ethernet addresses of its frames ("02:00:...").
- Toward the guest (our sequence space): ``iss``, ``snd_una`` (first byte the guest has
  not acknowledged), ``snd_nxt`` (next byte to send; below ``snd_max`` after a rewind),
  ``snd_max`` (highest sent). The bytes from ``snd_una`` to ``snd_max`` were peeked
  from the host socket and not consumed: they are the head of the socket's receive
  queue, so they travel in ``socket.recv_queue`` (checked: it holds at least that many).
- From the guest: ``guest_isn``, ``rcv_nxt`` (next byte expected; everything before it
  was accepted by the host socket, whose send queue carries what the peer has not
  acknowledged), ``last_ack_sent``.
- Windows: ``guest_wnd_edge`` (right edge of the guest's window), ``guest_wscale``,
  ``our_wscale`` (RFC 7323 §2.2 shifts), ``adv_edge`` and ``adv_field`` (what we last
  advertised), ``mss`` (payload per segment toward the guest, options excluded),
  ``our_mss`` (what our SYN announced).
- Timestamps (RFC 7323): ``timestamps`` (in force), ``tsval`` (our TSval clock at export:
  the importer continues from it, so PAWS, §5, never sees it go back), ``ts_recent``.
- Recovery: ``retries`` (consecutive RTO expiries), ``syn_retransmitted`` (RFC 6298
  §5.7's 3 s base), ``rtt_exp`` (the host RTT exponent, window.py), ``sack_ok`` (the
  guest's SYN permitted SACK, RFC 2018 §2: blocks both ways), ``guest_srtt_us`` and
  ``guest_rttvar_us`` (the guest's smoothed round trip and its variation, RFC 6298 §2,
  in microseconds; the round trip is null before a first sample), ``write_blocked``
  (guest data was refused by a full host socket: the guest is owed duplicate ACKs),
  ``ack_pending``; counters ``bytes_from_guest``, ``bytes_to_guest``.
- ``socket``: `RepairState.to_dict()` (repair_state.py) of the host socket.

Not carried: deadlines (absolute loop times mean nothing elsewhere; the importer arms
the RTO and idle timers afresh, the persist and window-update checks re-arm on use),
the duplicate-ACK count (a fast retransmit in progress restarts), the window-check
backoff, and the kernel's own SACK scoreboard, congestion and RTO state of the host
socket (TCP_REPAIR has no way to set them: the new socket starts its congestion
control from scratch and retransmits unacknowledged data on its own RTO).

Kind "live" (key ``"kind": "live"``; absent means ``"repair"``, the kind above). A
handover to a new process on the same host (moving/handover.py) passes each flow's live host
socket itself over SCM_RIGHTS, so no TCP_REPAIR dump is needed: its kernel queues stay
where they are. A live FLOW has the same fields, except that ``socket`` is
``{"fd": N, "peer": [address, port]}`` (N: the socket's index among the descriptors
passed with the document, ``peer``: where it is connected, checked by the receiver),
plus three, since a live socket may be half-closed too:

- ``state``: the relay's TCP state of the flow with the guest, one of "established",
  "close_wait", "fin_wait_1", "fin_wait_2", "closing", "last_ack" (tcp_state.py).
- ``fin_seq``: the sequence number of the FIN we sent the guest (null: none sent; set
  exactly in the states after our FIN), ``fin_acked``: the guest acknowledged it.

Version 1, written by relaynat before the last three recovery fields, is still read:
its flows go on without SACK and with the initial RTO until a first round trip.

A document is checked entirely before anything is imported: `parse_document` raises
`FlowStateError` (a ValueError) naming the flow and the field.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from ipaddress import ip_address
from typing import Any

from relaynat.errors import Error
from relaynat.nat_entry import TcpNatEntry
from relaynat.ooo_queue import OooBudget
from relaynat.packet_builder import TS_OPTION_LEN, TcpFrameTemplate
from relaynat.repair_state import RepairError, RepairState
from relaynat.tcp_actions import M32
from relaynat.tcp_handshake import MAX_GSO_PAYLOAD
from relaynat.tcp_state import TcpState
from relaynat.window import RTT_EXP_MAX, rto_s
from relaynat.wire import seq_diff, seq_le

FORMAT = "relaynat-flows"
VERSION = 2
#: The fields version 2 added, and the value a version 1 flow continues with.
_V1_DEFAULTS: dict[str, Any] = {"sack_ok": False, "guest_srtt_us": None,
                                "guest_rttvar_us": 0}
KIND_REPAIR, KIND_LIVE = "repair", "live"
#: Key of a flow in `TcpRelay.flows`: (guest port, far address, far port, guest address).
FlowKey = tuple[int, bytes, int, bytes]


class FlowStateError(Error, ValueError):
    """A flows document is malformed, of another version, or inconsistent; the message
    names the flow and the field."""



def parse_fields(data: Any, what: str, names: Sequence[str],
                 parsers: Mapping[str, Callable[[Any], Any]],
                 errors: tuple[type[Exception], ...] = (TypeError, ValueError)
                 ) -> dict[str, Any]:
    """The fields `names` of a record's dict form `data`, each through its parser: the
    one check every moved record (TCP flow, UDP flow, ping session) takes. FlowStateError
    says what is wrong: `data` not an object (`what` names it), a field missing or
    unknown, or a value a parser refused with one of `errors`."""
    if not isinstance(data, dict):
        raise FlowStateError(f"{what} is not an object")
    missing = [n for n in names if n not in data]
    if missing:
        raise FlowStateError(f"missing field(s) {', '.join(missing)}")
    extra = sorted(set(data) - set(names))
    if extra:
        raise FlowStateError(f"unknown field(s) {', '.join(extra)}")
    values: dict[str, Any] = {}
    for name in names:
        try:
            values[name] = parsers[name](data[name])
        except errors as exc:
            raise FlowStateError(f"field {name}: {exc}") from None
    return values

@dataclass(frozen=True, slots=True)
class TcpFlowState:
    """One established flow's relay-side state and host socket (module docstring)."""

    guest: tuple[str, int]
    far: tuple[str, int]
    inbound: bool
    guest_mac: bytes
    gateway_mac: bytes
    iss: int
    snd_una: int
    snd_nxt: int
    snd_max: int
    guest_isn: int
    rcv_nxt: int
    last_ack_sent: int
    guest_wnd_edge: int
    guest_wscale: int
    our_wscale: int
    adv_edge: int
    adv_field: int
    mss: int
    our_mss: int
    timestamps: bool
    tsval: int
    ts_recent: int
    retries: int
    syn_retransmitted: bool
    rtt_exp: int
    sack_ok: bool
    guest_srtt_us: int | None
    guest_rttvar_us: int
    write_blocked: bool
    ack_pending: bool
    bytes_from_guest: int
    bytes_to_guest: int
    socket: RepairState

    @property
    def key(self) -> FlowKey:
        return (self.guest[1], ip_address(self.far[0]).packed, self.far[1],
                ip_address(self.guest[0]).packed)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, bytes):
                value = value.hex(":")
            elif isinstance(value, RepairState | LiveSocket):
                value = value.to_dict()
            elif isinstance(value, TcpState):
                value = value.value
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Any, version: int = VERSION) -> TcpFlowState:
        """Parse and check `to_dict`'s output (of document `version`); FlowStateError
        names what is wrong."""
        names = [f.name for f in fields(cls)]
        if version == 1:
            names = [n for n in names if n not in _V1_DEFAULTS]
        values = parse_fields(data, "a flow", names,
                              _LIVE_PARSERS if cls is LiveFlowState else _PARSERS,
                              (RepairError, TypeError, ValueError))
        if version == 1:
            values |= _V1_DEFAULTS
        state = cls(**values)
        state._check()
        return state

    def _check(self) -> None:
        """What must hold between fields for the flow to continue."""
        if ip_address(self.guest[0]).version != ip_address(self.far[0]).version:
            raise FlowStateError("fields guest and far: not the same address family")
        if not (seq_le(self.snd_una, self.snd_nxt) and seq_le(self.snd_nxt, self.snd_max)
                and seq_diff(self.snd_max, self.snd_una) >= 0):
            raise FlowStateError("fields snd_una, snd_nxt, snd_max: not in order")
        peeked = seq_diff(self.snd_max, self.snd_una)
        if isinstance(self.socket, RepairState) and peeked > len(self.socket.recv_queue):
            raise FlowStateError(f"field socket: {peeked} bytes were sent to the guest "
                                 f"unacknowledged, but its receive queue holds only "
                                 f"{len(self.socket.recv_queue)}")
        if not seq_le(self.last_ack_sent, self.rcv_nxt):
            raise FlowStateError("fields last_ack_sent, rcv_nxt: acknowledged beyond rcv_nxt")


@dataclass(frozen=True, slots=True)
class LiveSocket:
    """The host socket of a live flow: its index among the descriptors passed with the
    document, and the peer it is connected to (module docstring, kind "live")."""

    fd: int
    peer: tuple[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {"fd": self.fd, "peer": list(self.peer)}

    @classmethod
    def from_dict(cls, data: Any) -> LiveSocket:
        if not isinstance(data, dict) or set(data) != {"fd", "peer"}:
            raise ValueError(f"{data!r} is not {{\"fd\": N, \"peer\": [address, port]}}")
        if type(data["fd"]) is not int or data["fd"] < 0:
            raise ValueError(f"fd {data['fd']!r} is not a descriptor index")
        return cls(data["fd"], _endpoint(data["peer"]))


#: The relay's states a live flow may be in: established or half-closed either way.
LIVE_STATES = frozenset({TcpState.ESTABLISHED, TcpState.CLOSE_WAIT, TcpState.FIN_WAIT_1,
                         TcpState.FIN_WAIT_2, TcpState.CLOSING, TcpState.LAST_ACK})
#: The states after our FIN to the guest, exactly those with a `fin_seq`.
_OUR_FIN_SENT = frozenset({TcpState.FIN_WAIT_1, TcpState.FIN_WAIT_2, TcpState.CLOSING,
                           TcpState.LAST_ACK})


@dataclass(frozen=True, slots=True)
class LiveFlowState(TcpFlowState):
    """One flow of a "live" document: its host socket travels beside it (module
    docstring), so it may be half-closed as well."""

    socket: LiveSocket  # type: ignore[assignment]  # the live kind's socket
    state: TcpState
    fin_seq: int | None
    fin_acked: bool

    def _check(self) -> None:
        # super() needs its arguments in a slots dataclass: the decorator makes a new
        # class, and the zero-argument form's would be the one it replaced.
        super(LiveFlowState, self)._check()
        if (self.fin_seq is not None) != (self.state in _OUR_FIN_SENT):
            raise FlowStateError(f"fields state, fin_seq: {self.state.value} with fin_seq "
                                 f"{self.fin_seq}")
        if self.fin_acked and self.fin_seq is None:
            raise FlowStateError("fields fin_acked, fin_seq: a FIN acknowledged, none sent")


def _live_state(value: Any) -> TcpState:
    state = TcpState(value) if isinstance(value, str) else None
    if state not in LIVE_STATES:
        raise ValueError(f"{value!r} is not one of "
                         f"{', '.join(sorted(s.value for s in LIVE_STATES))}")
    return state


def _u32(value: Any) -> int:
    if type(value) is not int or not 0 <= value <= M32:
        raise ValueError(f"{value!r} is not a 32-bit unsigned number")
    return value


def _count(value: Any) -> int:
    if type(value) is not int or not 0 <= value < 1 << 64:
        raise ValueError(f"{value!r} is not a 64-bit unsigned count")
    return value


def _ranged(low: int, high: int) -> Any:
    def parse(value: Any) -> int:
        if type(value) is not int or not low <= value <= high:
            raise ValueError(f"{value!r} is not in {low}..{high}")
        return value
    return parse


def _bool(value: Any) -> bool:
    if type(value) is not bool:
        raise ValueError(f"{value!r} is not true or false")
    return value


def _endpoint(value: Any) -> tuple[str, int]:
    if not isinstance(value, list) or len(value) != 2:
        raise ValueError(f"{value!r} is not [address, port]")
    addr, port = value
    if not isinstance(addr, str) or type(port) is not int or not 0 < port <= 0xFFFF:
        raise ValueError(f"{value!r} is not [address, port]")
    return str(ip_address(addr)), port


def _mac(value: Any) -> bytes:
    if not isinstance(value, str) or len(value) != 17:
        raise ValueError(f"{value!r} is not a MAC address")
    return bytes.fromhex(value.replace(":", ""))


_PARSERS: dict[str, Any] = {
    "guest": _endpoint, "far": _endpoint, "inbound": _bool, "guest_mac": _mac,
    "gateway_mac": _mac, "iss": _u32, "snd_una": _u32, "snd_nxt": _u32, "snd_max": _u32,
    "guest_isn": _u32, "rcv_nxt": _u32, "last_ack_sent": _u32, "guest_wnd_edge": _u32,
    "guest_wscale": _ranged(0, 14), "our_wscale": _ranged(0, 14), "adv_edge": _u32,
    "adv_field": _ranged(0, 0xFFFF), "mss": _ranged(1, 0xFFFF), "our_mss": _ranged(1, 0xFFFF),
    "timestamps": _bool, "tsval": _u32, "ts_recent": _u32, "retries": _ranged(0, 255),
    "syn_retransmitted": _bool, "rtt_exp": _ranged(0, RTT_EXP_MAX), "sack_ok": _bool,
    "guest_srtt_us": lambda v: None if v is None else _u32(v), "guest_rttvar_us": _u32,
    "write_blocked": _bool,
    "ack_pending": _bool, "bytes_from_guest": _count, "bytes_to_guest": _count,
    "socket": RepairState.from_dict,
}
_LIVE_PARSERS: dict[str, Any] = _PARSERS | {
    "socket": LiveSocket.from_dict, "state": _live_state,
    "fin_seq": lambda v: None if v is None else _u32(v), "fin_acked": _bool,
}


def make_document(flows: Sequence[TcpFlowState], not_moved: list[dict[str, Any]],
                  kind: str = KIND_REPAIR) -> dict[str, Any]:
    """A document of `kind` (a repair document has no "kind" key, as before kinds)."""
    doc: dict[str, Any] = {"format": FORMAT, "version": VERSION}
    if kind != KIND_REPAIR:
        doc["kind"] = kind
    return doc | {"flows": [f.to_dict() for f in flows], "not_moved": not_moved}


def parse_document(doc: Any, kind: str = KIND_REPAIR) -> list[TcpFlowState]:
    """The flows of a document of `kind`, all checked (FlowStateError on the first
    fault, with the flow's index); two flows with one key are refused too."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise FlowStateError(f"not a {FORMAT} document")
    version = doc.get("version")
    if type(version) is not int or not 1 <= version <= VERSION:
        raise FlowStateError(f"{FORMAT} version {version!r} is not supported "
                             f"(this relaynat reads versions 1 to {VERSION})")
    if doc.get("kind", KIND_REPAIR) != kind:
        raise FlowStateError(f"a {FORMAT} document of kind {doc.get('kind')!r}, not {kind!r}"
                             f" ({KIND_LIVE!r}: a same-host handover's, whose sockets "
                             f"travel beside it)")
    record = LiveFlowState if kind == KIND_LIVE else TcpFlowState
    extra = sorted(set(doc) - {"format", "version", "kind", "flows", "not_moved"})
    if extra or not isinstance(doc.get("flows"), list) or not isinstance(
            doc.get("not_moved"), list):
        raise FlowStateError(f"{FORMAT} document needs lists 'flows' and 'not_moved' "
                             f"and nothing else (unknown: {', '.join(extra) or 'none'})")
    states: list[TcpFlowState] = []
    keys: set[FlowKey] = set()
    for i, data in enumerate(doc["flows"]):
        try:
            state = record.from_dict(data, version)
        except FlowStateError as exc:
            raise FlowStateError(f"flows[{i}]: {exc}") from None
        if state.key in keys:
            raise FlowStateError(f"flows[{i}]: a second flow {state.guest} -> {state.far}")
        keys.add(state.key)
        states.append(state)
    return states


# -- to and from the state machine -----------------------------------------------------


def state_of(entry: TcpNatEntry, key: FlowKey, inbound: bool, now: float,
             sock: RepairState) -> TcpFlowState:
    """An ESTABLISHED entry's state (the caller checked the state and that the host
    socket's receive queue starts at `snd_una`: nothing acknowledged left in it)."""
    guest_port, far, far_port, guest = key
    mac = entry.template.params
    return TcpFlowState(
        guest=(str(ip_address(guest)), guest_port), far=(str(ip_address(far)), far_port),
        inbound=inbound, guest_mac=mac["dst_mac"], gateway_mac=mac["src_mac"],
        iss=entry.iss, snd_una=entry.snd_una, snd_nxt=entry.snd_nxt, snd_max=entry.snd_max,
        guest_isn=entry.guest_isn, rcv_nxt=entry.rcv_nxt, last_ack_sent=entry.last_ack_sent,
        guest_wnd_edge=entry.guest_wnd_edge, guest_wscale=entry.guest_wscale,
        our_wscale=entry.our_wscale, adv_edge=entry.adv_edge, adv_field=entry.adv_field,
        mss=entry.mss, our_mss=entry.our_mss, timestamps=entry.template.timestamps,
        tsval=(int(now * 1000) + entry.ts_offset) & M32, ts_recent=entry.ts_recent,
        retries=min(entry.retries, 255), syn_retransmitted=entry.syn_retransmitted,
        rtt_exp=entry.rtt_exp, sack_ok=entry.sack_ok,
        guest_srtt_us=None if entry.guest_srtt is None else round(entry.guest_srtt * 1e6),
        guest_rttvar_us=round(entry.guest_rttvar * 1e6), write_blocked=entry.write_blocked,
        ack_pending=entry.ack_pending, bytes_from_guest=entry.bytes_from_guest,
        bytes_to_guest=entry.bytes_to_guest, socket=sock)


def live_state_of(entry: TcpNatEntry, key: FlowKey, inbound: bool, now: float,
                  sock: LiveSocket) -> LiveFlowState:
    """A live flow's state (ESTABLISHED or half-closed; the caller dropped from its
    socket the bytes the guest acknowledged)."""
    base = state_of(entry, key, inbound, now, sock)  # type: ignore[arg-type]  # live
    return LiveFlowState(**{f.name: getattr(base, f.name) for f in fields(TcpFlowState)},
                         state=entry.state, fin_seq=entry.fin_seq, fin_acked=entry.fin_acked)


def entry_from(state: TcpFlowState, *, mtu: int, vnet_hdr_len: int, offload: bool,
               now: float, idle_timeout_s: float,
               ooo_budget: OooBudget | None = None) -> TcpNatEntry:
    """A TcpNatEntry continuing `state` at `now`, its frames in the given link format,
    holding out-of-order guest data within `ooo_budget` (the importing relay's). The
    source's held out-of-order data is not moved (dropping SACKed data is reneging,
    which RFC 2018 §8 allows: the guest sends it again), nor the blocks the guest
    SACKed toward it: its next ACKs tell them again. Without a budget SACK goes off, as
    for a new flow (tcp_handshake.py)."""
    template = TcpFrameTemplate(
        dst_mac=state.guest_mac, src_mac=state.gateway_mac,
        src=ip_address(state.far[0]).packed, dst=ip_address(state.guest[0]).packed,
        sport=state.far[1], dport=state.guest[1], vnet_hdr_len=vnet_hdr_len,
        offload=offload, timestamps=state.timestamps)
    entry = TcpNatEntry(None, template=template, mtu=mtu, iss=state.iss, now=now,
                        idle_timeout_s=idle_timeout_s, ooo_budget=ooo_budget)
    entry.state = TcpState.ESTABLISHED
    if isinstance(state, LiveFlowState):
        entry.state, entry.fin_seq, entry.fin_acked = (state.state, state.fin_seq,
                                                       state.fin_acked)
    entry.connect_deadline = None
    for name in ("snd_una", "snd_nxt", "snd_max", "guest_isn", "rcv_nxt", "last_ack_sent",
                 "guest_wnd_edge", "guest_wscale", "our_wscale", "adv_edge", "adv_field",
                 "mss", "our_mss", "ts_recent", "retries", "syn_retransmitted", "rtt_exp",
                 "write_blocked", "bytes_from_guest", "bytes_to_guest"):
        setattr(entry, name, getattr(state, name))
    entry.sack_ok = state.sack_ok and ooo_budget is not None
    if state.guest_srtt_us is not None:
        # The RTO goes on from the guest's measured round trip, not the initial 1 s.
        entry.guest_srtt = state.guest_srtt_us / 1e6
        entry.guest_rttvar = state.guest_rttvar_us / 1e6
    # Our clock goes on from the exported TSval (RFC 7323 §5.4: any offset will do, as
    # long as it never goes back).
    entry.ts_offset = (state.tsval - int(now * 1000)) & M32
    relink(entry, vnet_hdr_len, offload)
    # A fresh window from this relay's socket at the first flush, and an RTO for what
    # is in flight (the guest may have lost it while no relay served it).
    entry.ack_pending = True
    entry.rto_at = _rto_deadline(entry, now)
    return entry


def _rto_deadline(entry: TcpNatEntry, now: float) -> float | None:
    """When the retransmission timer of `entry` expires, armed at `now`: while data or
    our FIN is unacknowledged (RFC 6298 §5.1), as the entry arms it itself."""
    in_flight = entry.bytes_in_flight or (entry.fin_seq is not None and not entry.fin_acked)
    return (now + rto_s(entry.retries, entry.syn_retransmitted, entry.guest_srtt,
                        entry.guest_rttvar) if in_flight else None)


def relink(entry: TcpNatEntry, vnet_hdr_len: int, offload: bool) -> None:
    """Build `entry`'s frames for a link with this vnet header and offload (its template
    and the largest payload per frame, a GSO super-frame with offload)."""
    entry.template = entry.template.with_link(vnet_hdr_len, offload)
    ts_len = TS_OPTION_LEN if entry.template.timestamps else 0
    entry.frame_payload_max = (MAX_GSO_PAYLOAD - ts_len if entry.template.offload
                               else entry.mss)
