"""The new relay's side of a handover (moving/handover.py describes the protocol and the
document): `Receiver` waits for an offer, checks the document and every descriptor
before anything is taken, and serves what it took; `serve_taken` runs it until it
ends or is handed over in its turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import socket
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import TYPE_CHECKING, Any, cast

from relaynat import __version__
from relaynat.control.server import ControlServer
from relaynat.flow_state import KIND_LIVE, FlowStateError, LiveFlowState, parse_document
from relaynat.host.forward import Forward
from relaynat.icmp_echo import EchoSessionState, parse_sessions
from relaynat.moving import handover_transport
from relaynat.moving.handover import (
    FORMAT,
    TIMEOUT_S,
    VERSION,
    HandoverError,
    Source,
    addressing_differs,
    addressing_of,
    recv_document,
    recv_message,
    send_message,
)
from relaynat.transports.stream import bind_unix_listener
from relaynat.udp_flow import UdpFlowState, parse_flows

if TYPE_CHECKING:
    from relaynat.relay import Relay
    from relaynat.transports.unixgram import UnixgramServer

log = logging.getLogger("relaynat.handover")

_KEYS = {"format", "version", "relaynat", "addressing", "guest", "transport",
         "stream_listener", "control", "command", "forwards", "tcp", "stats"}
#: Keys a relay that hands over may leave out (relays before UDP flows and ping sessions
#: moved send neither); this one asks for them in its "ready" answer.
_OPTIONAL_KEYS = {"udp", "icmp"}
_TAKES = ["udp", "icmp"]


@dataclass
class Taken:
    """What a relay took over, beside what `Relay` serves itself: the control server
    (serving), `serve --socket`'s path, `serve --unixgram`'s server, the pidfd of
    `relaynat run`'s command, and the transport's own counters."""

    control: ControlServer | None
    stream_path: str | None
    command_fd: int | None
    pause_s: float
    unixgram: UnixgramServer | None = None
    transport_stats: handover_transport.Stats = field(default=dict)


class Receiver:
    """Waits at `path` for a relay to hand over (module docstring); `take_over` serves
    what it receives in `relay` (started, with no guest yet)."""

    def __init__(self, path: str, refused: Mapping[str, str] | None = None) -> None:
        self.path = path
        #: Guest link kinds this relay refuses to take, with the reason it answers.
        self.refused = dict(refused or {})
        self._sock = bind_unix_listener(path, backlog=1, kind=socket.SOCK_SEQPACKET)

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    async def take_over(self, relay: Relay, timeout: float = TIMEOUT_S) -> Taken:
        """Serve offers until one is taken; each refused one is logged and answered
        with the reason, and nothing of it stays here."""
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._sock)
            conn.settimeout(timeout)
            fds: list[int] = []
            with conn:
                try:
                    plan = await asyncio.to_thread(self._negotiate, conn, relay, fds)
                except (HandoverError, OSError) as exc:
                    log.error("handover refused: %s", exc)
                    relay.count("handovers_refused")
                    with contextlib.suppress(OSError):
                        send_message(conn, {"error": str(exc)})
                    for fd in fds:
                        os.close(fd)
                    continue
            return await _build(plan, relay)

    def _negotiate(self, conn: socket.socket, relay: Relay, fds: list[int]) -> _Plan:
        """Steps 1 and 3 of the module docstring and the commit; HandoverError (or
        OSError) when refused, the descriptors received so far in `fds`."""
        uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                  12))[1]
        if uid not in (0, os.geteuid()):
            raise HandoverError(f"uid {uid} may not hand a relay over to uid "
                                f"{os.geteuid()}")
        offer = recv_message(conn).get("offer")
        if not isinstance(offer, dict) or offer.get("format") != FORMAT \
                or offer.get("version") != VERSION:
            raise HandoverError(f"not a {FORMAT} version {VERSION} offer")
        differs = addressing_differs(addressing_of(relay.config), offer.get("addressing"))
        if differs:
            raise HandoverError(differs)
        kind = offer.get("transport")
        if kind in self.refused:
            raise HandoverError(self.refused[kind])
        if kind is not None and kind not in handover_transport.KINDS:
            raise HandoverError(f"a {kind!r} guest link cannot be taken over by relaynat "
                                f"{__version__} (it takes {', '.join(handover_transport.KINDS)})")
        send_message(conn, {"ready": {"relaynat": __version__, "takes": _TAKES}})
        doc = recv_document(conn, fds)
        plan = _plan(doc, fds, relay)
        send_message(conn, {"accepted": {"tcp": len(plan.flows), "udp": len(plan.udp),
                                         "icmp": len(plan.icmp), "relaynat": __version__}})
        commit = recv_message(conn).get("commit")
        if not isinstance(commit, dict) or not isinstance(commit.get("stopped_at"),
                                                          float):
            raise HandoverError("no commit from the old relay")
        plan.stopped_at = commit["stopped_at"]
        return plan


@dataclass
class _Plan:
    """A checked document, its descriptors each checked for what the document says."""

    doc: dict[str, Any]
    fds: list[int]
    flows: list[LiveFlowState]
    udp: list[UdpFlowState] = field(default_factory=list)
    icmp: list[EchoSessionState] = field(default_factory=list)
    stopped_at: float = 0.0


def _plan(data: bytes, fds: list[int], relay: Relay) -> _Plan:
    """Everything checked before anything is taken (HandoverError says what is wrong)."""
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise HandoverError(f"the handover document is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise HandoverError(f"not a {FORMAT} document")
    if doc.get("version") != VERSION:
        raise HandoverError(f"{FORMAT} version {doc.get('version')!r} is not supported "
                            f"(this relaynat reads version {VERSION})")
    if not _KEYS <= set(doc) <= _KEYS | _OPTIONAL_KEYS:
        raise HandoverError(f"{FORMAT} document keys {sorted(doc)}, not {sorted(_KEYS)} "
                            f"and any of {sorted(_OPTIONAL_KEYS)}")
    differs = addressing_differs(addressing_of(relay.config), doc["addressing"])
    if differs:
        raise HandoverError(differs)
    try:
        flows = cast(list[LiveFlowState], parse_document(doc["tcp"], KIND_LIVE))
    except FlowStateError as exc:
        raise HandoverError(f"tcp: {exc}") from None
    try:
        udp = parse_flows(doc.get("udp", []))
    except FlowStateError as exc:
        raise HandoverError(f"udp: {exc}") from None
    try:
        icmp = parse_sessions(doc.get("icmp", []))
    except FlowStateError as exc:
        raise HandoverError(f"icmp: {exc}") from None
    refused = relay.cannot_adopt(flows, udp, icmp)
    if refused is not None:
        raise HandoverError(refused)
    used: list[int] = []
    check = _Checker(fds, used)
    try:
        _check_parts(doc, flows, check)
        _check_datagrams(doc, udp, icmp, check)
        if doc["transport"] is not None:
            handover_transport.check(doc["transport"], check, relay.config.mtu)
    except handover_transport.TransportError as exc:
        raise HandoverError(str(exc)) from None
    except (KeyError, TypeError, ValueError) as exc:
        raise HandoverError(f"malformed {FORMAT} document: {exc!r}") from None
    if sorted(used) != list(range(len(fds))):
        raise HandoverError(f"{len(fds)} descriptors passed, the document uses "
                            f"{sorted(used)}")
    return _Plan(doc, fds, flows, udp, icmp)


class _Checker:
    """Checks one descriptor index of the document against the descriptor itself."""

    def __init__(self, fds: list[int], used: list[int]) -> None:
        self.fds, self.used = fds, used

    def index(self, value: Any, what: str) -> int:
        if type(value) is not int or not 0 <= value < len(self.fds) or value in self.used:
            raise HandoverError(f"{what}: fd {value!r} is not a fresh descriptor index")
        self.used.append(value)
        return self.fds[value]

    def socket(self, value: Any, what: str, family: tuple[int, ...], kind: int,
               listening: bool, proto: tuple[int, ...] | None = None) -> tuple[Any, Any]:
        """(its address, its peer's or None) once the descriptor proved to be such a
        socket (of one of the protocols `proto`, when given)."""
        fd = self.index(value, what)
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            raise HandoverError(f"{what}: descriptor is not a socket") from None
        try:
            accepting = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            if (sock.family not in family or sock.type != kind
                    or bool(accepting) != listening
                    or (proto is not None and sock.proto not in proto)):
                raise HandoverError(f"{what}: descriptor is not the socket described "
                                    f"({sock.family.name}, {sock.type.name})")
            try:
                peer = sock.getpeername()
            except OSError:
                peer = None
            return sock.getsockname(), peer
        finally:
            sock.detach()


_INET = (socket.AF_INET, socket.AF_INET6)


def _check_parts(doc: dict[str, Any], flows: list[LiveFlowState], check: _Checker) -> None:
    for i, state in enumerate(flows):
        _, peer = check.socket(state.socket.fd, f"tcp flows[{i}]", _INET, socket.SOCK_STREAM,
                               False)
        want = state.socket.peer
        if not _same_peer(peer, want):
            raise HandoverError(f"tcp flows[{i}]: its socket is connected to {peer}, not "
                                f"{want}")
    for i, fwd in enumerate(doc["forwards"]):
        kind = {"tcp": socket.SOCK_STREAM, "udp": socket.SOCK_DGRAM}[fwd["proto"]]
        name, _ = check.socket(fwd["fd"], f"forwards[{i}]", _INET, kind, fwd["proto"] == "tcp")
        if name[1] != fwd["host_port"] or type(fwd["guest_port"]) is not int \
                or not 0 < fwd["guest_port"] <= 0xFFFF:
            raise HandoverError(f"forwards[{i}]: ports {fwd['host_port']!r} -> "
                                f"{fwd['guest_port']!r} (the socket is on {name[1]})")
    for part_name in ("stream_listener", "control"):
        part = doc[part_name]
        if part is not None:
            name, _ = check.socket(part["fd"], part_name, (socket.AF_UNIX,),
                                   socket.SOCK_STREAM, True)
            if name != part["path"]:
                raise HandoverError(f"{part_name}: the socket is at {name!r}, not "
                                    f"{part['path']!r}")
    stats = doc["stats"]
    if not isinstance(stats, dict) or not all(
            isinstance(k, str) and type(v) is int for k, v in stats.items()):
        raise HandoverError("stats: not counters")
    if doc["command"] is not None:
        fd = check.index(doc["command"]["fd"], "command")
        # Signal 0 only checks: EBADF for a descriptor that is not a pidfd (its
        # process gone, ESRCH, is a pidfd still). Not /proc/self/fd: a confined relay
        # has no /proc.
        try:
            signal.pidfd_send_signal(fd, 0)
        except OSError as exc:
            if exc.errno not in (errno.ESRCH, errno.EPERM):
                raise HandoverError("command: descriptor is not a pidfd") from None
    mac = doc["guest"]["mac"]
    if mac is not None and len(bytes.fromhex(mac.replace(":", ""))) != 6:
        raise HandoverError(f"guest mac {mac!r}")
    ip_address(doc["guest"]["address6"])


def _same_peer(peer: Any, want: tuple[Any, ...]) -> bool:
    """Whether a socket's peer address is `want` (address and port)."""
    return peer is not None and (ip_address(peer[0]), peer[1]) == (ip_address(want[0]),
                                                                   want[1])


def _check_datagrams(doc: dict[str, Any], udp: list[UdpFlowState],
                     icmp: list[EchoSessionState], check: _Checker) -> None:
    """Each UDP flow's socket connected to the peer its record names (an inbound one's
    forward a UDP forward of the document), each ping session's a ping socket of its
    family."""
    for i, state in enumerate(udp):
        what = f"udp flows[{i}]"
        if state.forward is not None:
            forwards = doc["forwards"]
            if state.forward >= len(forwards) or forwards[state.forward]["proto"] != "udp":
                raise HandoverError(f"{what}: forward {state.forward} is not a UDP forward "
                                    "of the document")
            continue
        _, peer = check.socket(state.fd, what, _INET, socket.SOCK_DGRAM, False)
        if not _same_peer(peer, state.peer):
            raise HandoverError(f"{what}: its socket is connected to {peer}, not "
                                f"{list(state.peer)}")
    for i, session in enumerate(icmp):
        v6 = ip_address(session.host).version == 6
        check.socket(session.fd, f"icmp sessions[{i}]",
                     (socket.AF_INET6,) if v6 else (socket.AF_INET,), socket.SOCK_DGRAM,
                     False, (socket.IPPROTO_ICMPV6,) if v6 else (socket.IPPROTO_ICMP,))


async def _build(plan: _Plan, relay: Relay) -> Taken:
    """Serve everything the plan holds (it was all checked: nothing here refuses)."""
    doc, fds = plan.doc, plan.fds
    unixgram, transport_stats = handover_transport.build(doc["transport"], fds, relay)
    flows = []
    for state in plan.flows:
        sock = socket.socket(fileno=fds[state.socket.fd])
        sock.setblocking(False)
        flows.append((state, sock))
    forwards = []
    for fwd in doc["forwards"]:
        sock = socket.socket(fileno=fds[fwd["fd"]])
        forwards.append(Forward(fwd["proto"], fwd["host_addr"], sock.getsockname()[1],
                                fwd["guest_port"], fwd["interface"], sock))
    udp = []
    for udp_state in plan.udp:
        if udp_state.forward is not None:
            shared = forwards[udp_state.forward].sock
            assert shared is not None
            udp.append((udp_state, shared))
            continue
        assert udp_state.fd is not None
        sock = socket.socket(fileno=fds[udp_state.fd])
        sock.setblocking(False)
        udp.append((udp_state, sock))
    icmp = []
    for session in plan.icmp:
        assert session.fd is not None
        sock = socket.socket(fileno=fds[session.fd])
        sock.setblocking(False)
        icmp.append((session, sock))
    guest = doc["guest"]
    mac = guest["mac"]
    # A gauge, this handover's pause (counted below), not one to continue from.
    stats = {k: v for k, v in doc["stats"].items() if k != "handover_pause_us"}
    relay.adopt(guest_mac=None if mac is None else bytes.fromhex(mac.replace(":", "")),
                guest_addr6=ip_address(guest["address6"]).packed, flows=flows,
                forwards=forwards, stats=stats, udp=udp, icmp=icmp)
    stream = doc["stream_listener"]
    if stream is not None:
        listener = socket.socket(fileno=fds[stream["fd"]])
        listener.setblocking(False)
        relay.serve_stream(stream["path"], listener)
    control = None
    if doc["control"] is not None:
        control = ControlServer(doc["control"]["path"],
                                sock=socket.socket(fileno=fds[doc["control"]["fd"]]))
        await control.start(relay)
    pause = time.monotonic() - plan.stopped_at
    relay.count("handovers_received")
    relay.count("handover_pause_us", int(pause * 1e6))
    log.info("took over: %d TCP flows, %d UDP flows, %d ping sessions, %d not moved; the "
             "guest waited %.1f ms", len(plan.flows), len(plan.udp), len(plan.icmp),
             len(doc["tcp"]["not_moved"]), pause * 1000)
    return Taken(control, stream["path"] if stream else None,
                 fds[doc["command"]["fd"]] if doc["command"] else None, pause, unixgram,
                 transport_stats)


async def serve_taken(relay: Relay, taken: Taken, stop: asyncio.Event) -> Source:
    """Serve what was taken over until `stop`, the guest's transport ends (unless a
    stream listener waits for the next guest), the command of `relaynat run` exits,
    or this relay hands over in its turn; returns its `Source` (`done`: handed over)."""
    loop = asyncio.get_running_loop()
    source = Source(relay, taken.control, stream_path=taken.stream_path,
                    command_fd=taken.command_fd, unixgram=taken.unixgram)
    waits = [stop.wait()]
    if taken.stream_path is None:
        waits.append(relay.transport_lost_event.wait())
    if taken.control is not None:
        taken.control.on_handover = source.hand_over
        waits.append(taken.control.handed_over.wait())
        if taken.command_fd is None:
            # `quit` ends this relay as it ended the one that handed over (serve);
            # `relaynat run`'s command ends it instead, as before the handover.
            taken.control.on_quit = stop.set
    exited = asyncio.Event()
    if taken.command_fd is not None:
        command_fd = taken.command_fd
        loop.add_reader(command_fd, exited.set)
        waits.append(exited.wait())
        for signum in (signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(signum, _forward_signal, command_fd, signum)
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        if taken.command_fd is not None:
            loop.remove_reader(taken.command_fd)
    if exited.is_set():
        log.info("the command exited")
    return source


def _forward_signal(pidfd: int, signum: int) -> None:
    with contextlib.suppress(OSError):
        signal.pidfd_send_signal(pidfd, signum)
