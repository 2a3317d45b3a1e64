"""Handing a running relay over to a new relaynat process on the same host, the guest's
connections kept (`relaynat ctl handover`): to upgrade relaynat or change its
configuration under a running guest.

The new relay (B) waits on a unix seqpacket socket (`Receiver`, `relaynat serve
--receive-handover PATH`, mode 0600, only its own user or root may connect). The
running one (A, `Source`) connects and:

1. offers: ``{"offer": {"format", "version", "relaynat", "addressing"}}``; B answers
   ``{"ready": {"relaynat": VERSION}}`` or ``{"error": DESC}`` (its guest-visible
   addressing differs: the guest would lose its address, routes or flows). A refusal
   here leaves A untouched.
2. stops (`_take_out`): the guest transport stops reading at a frame boundary and
   sends nothing more; forwards stop accepting; every established or half-closed TCP
   flow leaves A's tables, its host socket open and untouched (A has dropped the bytes
   the guest acknowledged, so the socket's receive queue starts at the guest's first
   unacknowledged byte). Nothing is lost meanwhile: frames wait in the TAP's or the
   socket's queue, host data in the host sockets, clients in the listeners' backlog.
3. sends ``{"document": BYTES, "fds": N}``, then the N descriptors (SCM_RIGHTS, at most
   250 a message: SCM_MAX_FD is 253), then the document (JSON, in 32 KiB messages).
   B checks all of it (`_plan`: format, version, every field, every descriptor's kind,
   each flow's socket connected to the peer its record names) and answers
   ``{"accepted": {...}}`` or ``{"error": DESC}``; on an error (or silence) A takes
   everything back and serves on (`_give_back`), and B closes its copies.
4. commits: ``{"commit": {"stopped_at": T}}`` (T: A's CLOCK_MONOTONIC when it stopped);
   from here B serves and A only closes its copies of the descriptors (closing a
   descriptor another process holds sends nothing) and exits.

No TCP_REPAIR is needed (nor CAP_NET_ADMIN): the host sockets themselves move, with
their kernel queues. Host-to-guest bytes not yet acknowledged by the guest are still
in each socket's receive queue (the relay peeks with SO_PEEK_OFF), guest-to-host bytes
were acknowledged to the guest only once the host kernel had them.

The document (``"format": "relaynat-handover"``, ``"version": 1``):

- ``relaynat``: A's version; ``addressing``: `addressing_of` A's config.
- ``guest``: ``{"mac": "02:..." or null, "address6": ADDR}``, as A learned them.
- ``transport``: null (no guest attached), ``{"kind": "tap", "fd", "vnet_hdr_len",
  "offload"}``, or ``{"kind": "stream", "fd", "pending_in", "pending_out"}`` (base64:
  the bytes of a frame A had read in part, and what A had queued toward the guest).
- ``stream_listener``, ``control``: null or ``{"fd", "path"}``: the listening socket
  of `serve --socket` and the control socket; B serves them on the same paths.
- ``command``: null or ``{"fd"}``, a pidfd of `relaynat run`'s command: B ends when it
  exits (its exit status is its parent's, A's, to learn, so B exits 0) and forwards
  SIGTERM/SIGHUP to it.
- ``forwards``: ``[{"proto", "host_addr", "host_port", "guest_port", "interface",
  "fd"}]``, the bound (TCP: listening) sockets.
- ``tcp``: a "relaynat-flows" document of kind "live" (flow_state.py): the flows, and
  under ``not_moved`` everything that stays behind and ends with A, with the reason:
  half-open TCP flows (the guest's SYN retransmission opens them again at B), flows to
  A's own DNS-over-TCP responder, UDP flows and ping sessions (the next datagram opens
  a new one at B, from another host port).
- ``stats``: A's counters, which B's continue from.

Every ``fd`` is an index into the descriptors passed; each is used exactly once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import TYPE_CHECKING, Any, cast

from relaynat import __version__
from relaynat.config import RelayConfig
from relaynat.control import ControlServer
from relaynat.flow_move import adopt_flow, not_moved
from relaynat.flow_state import (
    KIND_LIVE,
    LIVE_STATES,
    FlowStateError,
    LiveFlowState,
    LiveSocket,
    live_state_of,
    make_document,
    parse_document,
)
from relaynat.flowinfo import describe_tcp
from relaynat.stream import StreamTransport, bind_unix_listener
from relaynat.tap import TapTransport
from relaynat.tcp_relay import TcpFlow

if TYPE_CHECKING:
    from relaynat.namespace import NamespaceGuest
    from relaynat.relay import Relay
    from relaynat.transport import FrameTransport

log = logging.getLogger("relaynat.handover")

FORMAT = "relaynat-handover"
VERSION = 1
TIMEOUT_S = 10.0
_FDS_PER_MESSAGE = 250
_CHUNK = 32 << 10
_MAX_MESSAGE = 64 << 10
_MAX_DOCUMENT = 256 << 20
_MAX_FDS = 1 << 20
_TUNGETIFF = 0x800454D2
_KEYS = {"format", "version", "relaynat", "addressing", "guest", "transport",
         "stream_listener", "control", "command", "forwards", "tcp", "stats"}


class HandoverError(Exception):
    """A handover that did not happen; the message says why. The relay that offered
    it serves on as before."""


def addressing_of(config: RelayConfig) -> dict[str, object]:
    """What the guest configured itself from (DHCP, RA, `relaynat run`): a relay that
    takes over must present the same, or the guest loses its routes, names or flows."""
    return {"ipv4": config.ipv4, "ipv6": config.ipv6, "address": str(config.guest_ipv4),
            "prefix_len": config.prefix_len_v4, "gateway": str(config.gateway_ipv4),
            "dns": str(config.dns_ipv4), "prefix6": str(config.prefix_v6),
            "address6": str(config.guest_ipv6), "gateway6": str(config.gateway_ipv6),
            "dns6": str(config.dns_ipv6), "gateway_mac": config.gateway_mac.hex(":"),
            "mtu": config.mtu}


def _addressing_differs(ours: dict[str, object], theirs: object) -> str | None:
    if not isinstance(theirs, dict):
        return "the offer carries no addressing"
    diffs = [f"{k} is {theirs.get(k)!r} there, {v!r} here" for k, v in ours.items()
             if theirs.get(k) != v]
    if not diffs:
        return None
    return ("the guest-visible addressing differs from the running relay's: "
            + "; ".join(diffs) + " (start the new relay with the same -a/-g/-D/-m/-4/-6/"
            "--prefix6/--address6/--gateway6/--dns6)")


# -- the wire ---------------------------------------------------------------------------

def _send(sock: socket.socket, obj: object) -> None:
    sock.sendall(json.dumps(obj).encode())


def _recv(sock: socket.socket) -> dict[str, Any]:
    data = sock.recv(_MAX_MESSAGE)
    if not data:
        raise HandoverError("the other relay closed the connection")
    try:
        message = json.loads(data)
    except ValueError:
        raise HandoverError("the other relay sent something that is not JSON") from None
    if not isinstance(message, dict):
        raise HandoverError("the other relay sent something that is not a message")
    return message


def _answer(sock: socket.socket, key: str) -> Any:
    message = _recv(sock)
    if "error" in message:
        raise HandoverError(str(message["error"]))
    if key not in message:
        raise HandoverError(f"the other relay answered {sorted(message)}, not {key!r}")
    return message[key]


def _send_all(sock: socket.socket, doc: bytes, fds: list[int]) -> None:
    _send(sock, {"document": len(doc), "fds": len(fds)})
    for i in range(0, len(fds), _FDS_PER_MESSAGE):
        socket.send_fds(sock, [b"fds"], fds[i:i + _FDS_PER_MESSAGE])
    for i in range(0, len(doc), _CHUNK):
        sock.sendall(doc[i:i + _CHUNK])


def _recv_all(sock: socket.socket, fds: list[int]) -> bytes:
    """The document and its descriptors (appended to `fds` as they come, so that the
    caller closes them whatever fails)."""
    header = _recv(sock)
    size, count = header.get("document"), header.get("fds")
    if (type(size) is not int or type(count) is not int or not 0 < size <= _MAX_DOCUMENT
            or not 0 <= count <= _MAX_FDS):
        raise HandoverError(f"bad handover header {header!r}")
    while len(fds) < count:
        _, got, flags, _ = socket.recv_fds(sock, 16, _FDS_PER_MESSAGE)
        fds.extend(got)
        if flags & socket.MSG_CTRUNC or not got:
            raise HandoverError("descriptors lost in transit (the receiver's open-file "
                                "limit?)")
    doc = bytearray()
    while len(doc) < size:
        chunk = sock.recv(_CHUNK)
        if not chunk:
            raise HandoverError("the document ended early")
        doc += chunk
    if len(fds) != count or len(doc) != size:
        raise HandoverError("more descriptors or bytes than announced")
    return bytes(doc)


# -- the running relay's side -------------------------------------------------------------

@dataclass
class _Held:
    """What a relay took out of service for a handover: to give back, or let go."""

    doc: dict[str, Any]
    fds: list[int]
    transport: FrameTransport | None
    flows: list[tuple[LiveFlowState, socket.socket]]
    stopped_at: float
    own_fds: list[int] = field(default_factory=list)  # opened for the handover


class Source:
    """A running relay that can hand itself over (`hand_over`), with what its process
    owns beside it: the control server, `serve --socket`'s listener path, and the
    command of `relaynat run` (`guest`, or `command_fd`: a pidfd, after a handover)."""

    def __init__(self, relay: Relay, control: ControlServer | None = None, *,
                 stream_path: str | None = None, guest: NamespaceGuest | None = None,
                 command_fd: int | None = None) -> None:
        self.relay = relay
        self.control = control
        self.stream_path = stream_path
        self.guest = guest
        self.command_fd = command_fd
        self.done = False
        self._busy = False

    async def hand_over(self, path: str, timeout: float = TIMEOUT_S) -> dict[str, Any]:
        """Hand everything to the relay waiting at `path`; returns what moved and what
        did not. Raises HandoverError (and serves on) when it did not happen."""
        if self.done or self._busy:
            raise HandoverError("a handover is already done or under way")
        transport = self.relay._transport
        if transport is not None and not isinstance(transport, TapTransport
                                                    | StreamTransport):
            raise HandoverError(f"a {type(transport).__name__} cannot be handed over yet "
                                "(TAP and stream sockets can)")
        self._busy = True
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.settimeout(timeout)
        try:
            return await self._hand_over(sock, path)
        except OSError as exc:
            raise HandoverError(f"{path}: {exc.strerror or exc}") from None
        finally:
            sock.close()
            self._busy = False

    async def _hand_over(self, sock: socket.socket, path: str) -> dict[str, Any]:
        offer = {"format": FORMAT, "version": VERSION, "relaynat": __version__,
                 "addressing": addressing_of(self.relay.config)}

        def offer_it() -> Any:
            sock.connect(path)
            _send(sock, {"offer": offer})
            return _answer(sock, "ready")

        ready = await asyncio.to_thread(offer_it)
        held = self._take_out()
        try:
            data = json.dumps(held.doc).encode()
            accepted = await asyncio.to_thread(self._deliver, sock, data, held.fds)
            _send(sock, {"commit": {"stopped_at": held.stopped_at}})
        except BaseException:
            self._give_back(held)
            raise
        self._let_go(held)
        self.done = True
        tcp = held.doc["tcp"]
        log.info("handed over to %s (relaynat %s): %d TCP flows, %d not moved", path,
                 ready.get("relaynat") if isinstance(ready, dict) else "?",
                 len(tcp["flows"]), len(tcp["not_moved"]))
        return {"to": path, "accepted": accepted, "moved_tcp": len(tcp["flows"]),
                "forwards": len(held.doc["forwards"]), "not_moved": tcp["not_moved"],
                "stopped_at": held.stopped_at}

    @staticmethod
    def _deliver(sock: socket.socket, data: bytes, fds: list[int]) -> Any:
        _send_all(sock, data, fds)
        return _answer(sock, "accepted")

    def _take_out(self) -> _Held:
        """Stop serving and describe everything (module docstring, step 2)."""
        relay = self.relay
        tcp, forwarder, loop = relay._tcp, relay._forwarder, relay._loop
        assert tcp is not None and forwarder is not None and loop is not None
        stopped_at = time.monotonic()
        transport, relay._transport = relay._transport, None
        if transport is not None:
            transport.stop()  # type: ignore[attr-defined]  # Tap or Stream, checked
            if isinstance(transport, StreamTransport):
                transport.stop_writing()
        relay._link.stop_router_adverts()
        forwarder.pause()
        if relay._listener is not None:  # the next stream guest waits in the backlog
            loop.remove_reader(relay._listener.fileno())
        fds: list[int] = []

        def fd(sock: socket.socket | int) -> int:
            fds.append(sock if isinstance(sock, int) else sock.fileno())
            return len(fds) - 1

        now = loop.time()
        own_dns = ("127.0.0.1", relay._dns_tcp.port) if relay._dns_tcp else None
        states: list[LiveFlowState] = []
        moved: list[tuple[LiveFlowState, socket.socket]] = []
        skipped = [not_moved(info, f"{info['protocol']} flows end with the old relay")
                   for part in (relay._udp_relay, relay._icmp) if part
                   for info in part.describe_flows()]
        for flow in list(tcp.flows.values()):
            reason = _unmovable(flow, own_dns)
            if reason is None:
                try:
                    peer = flow.sock.getpeername()[:2]
                except OSError as exc:
                    reason = f"host socket: {exc.strerror}"
            if reason is not None:
                skipped.append(not_moved(describe_tcp(flow), reason))
                continue
            live = LiveSocket(len(fds), peer)

            def snapshot(_sock: socket.socket, flow: TcpFlow = flow,
                         live: LiveSocket = live) -> LiveFlowState:
                return live_state_of(flow.entry, flow.key, flow.inbound, now, live)

            state = tcp.forget(flow, snapshot)
            fd(flow.sock)
            states.append(state)
            moved.append((state, flow.sock))
        own: list[int] = []
        command = None
        if self.command_fd is not None:
            command = {"fd": fd(self.command_fd)}
        elif self.guest is not None and self.guest.proc.returncode is None:
            own.append(os.pidfd_open(self.guest.proc.pid))
            command = {"fd": fd(own[-1])}
        listener = relay._listener
        doc = {
            "format": FORMAT, "version": VERSION, "relaynat": __version__,
            "addressing": addressing_of(relay.config),
            "guest": {"mac": relay._guest_mac.hex(":") if relay._guest_mac else None,
                      "address6": str(ip_address(relay._guest_addr6))},
            "transport": _describe_transport(transport, fd),
            "stream_listener": None if listener is None or self.stream_path is None
            else {"fd": fd(listener), "path": self.stream_path},
            "control": None if self.control is None
            else {"fd": fd(self.control.sock), "path": self.control.path},
            "command": command,
            "forwards": [{k: v for k, v in f.describe().items() if k != "id"}
                         | {"fd": fd(f.sock)} for f in forwarder.forwards
                         if f.sock is not None],
            "tcp": make_document(states, skipped, KIND_LIVE),
            "stats": dict(relay._stats),
        }
        return _Held(doc, fds, transport, moved, stopped_at, own)

    def _give_back(self, held: _Held) -> None:
        """The handover failed: serve on exactly as before it began."""
        relay = self.relay
        assert relay._tcp is not None and relay._forwarder is not None
        assert relay._loop is not None
        if held.transport is not None:
            relay.attach(held.transport)
        now = relay._loop.time()
        c = relay.config
        for state, sock in held.flows:
            adopt_flow(relay._tcp, state, sock, now, mtu=c.mtu,
                       idle_timeout_s=c.tcp_idle_timeout_s, host_addr=state.socket.peer)
        relay._forwarder.resume()
        if relay._listener is not None:
            relay._loop.add_reader(relay._listener.fileno(), relay._on_stream_client)
        for own in held.own_fds:
            os.close(own)
        relay._stats["handovers_failed"] += 1

    def _let_go(self, held: _Held) -> None:
        """The other relay serves: close our copies, without a packet to anyone."""
        for _, sock in held.flows:
            sock.close()
        if held.transport is not None:
            held.transport.close()
        for own in held.own_fds:
            os.close(own)
        if self.command_fd is not None:
            os.close(self.command_fd)
            self.command_fd = None
        if self.guest is not None:
            self.guest.release()
        self.relay._stats["handovers_sent"] += 1


def _unmovable(flow: TcpFlow, own_dns: tuple[str, int] | None) -> str | None:
    state = flow.entry.state
    if flow.connecting or state not in LIVE_STATES:
        return f"half-open or closing ({state.value}): the guest's retransmission " \
               "opens it again"
    if own_dns is not None and tuple(flow.host_addr) == own_dns:
        return "served by the old relay's own DNS-over-TCP responder"
    return None


def _describe_transport(transport: FrameTransport | None,
                        fd: Callable[[socket.socket | int], int]) -> dict[str, Any] | None:
    if isinstance(transport, TapTransport):
        return {"kind": "tap", "fd": fd(transport.fd), "vnet_hdr_len": transport.vnet_hdr_len,
                "offload": transport.offload}
    if isinstance(transport, StreamTransport):
        pending_in, pending_out = transport.handover_state()
        return {"kind": "stream", "fd": fd(transport.sock),
                "pending_in": base64.b64encode(pending_in).decode(),
                "pending_out": base64.b64encode(pending_out).decode()}
    return None


# -- the new relay's side -------------------------------------------------------------------

@dataclass
class Taken:
    """What a relay took over, beside what `Relay` serves itself: the control server
    (serving), `serve --socket`'s path, the pidfd of `relaynat run`'s command."""

    control: ControlServer | None
    stream_path: str | None
    command_fd: int | None
    pause_s: float


class Receiver:
    """Waits at `path` for a relay to hand over (module docstring); `take_over` serves
    what it receives in `relay` (started, with no guest yet)."""

    def __init__(self, path: str) -> None:
        self.path = path
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
                    relay._stats["handovers_refused"] += 1
                    with contextlib.suppress(OSError):
                        _send(conn, {"error": str(exc)})
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
        offer = _recv(conn).get("offer")
        if not isinstance(offer, dict) or offer.get("format") != FORMAT \
                or offer.get("version") != VERSION:
            raise HandoverError(f"not a {FORMAT} version {VERSION} offer")
        differs = _addressing_differs(addressing_of(relay.config), offer.get("addressing"))
        if differs:
            raise HandoverError(differs)
        _send(conn, {"ready": {"relaynat": __version__}})
        doc = _recv_all(conn, fds)
        plan = _plan(doc, fds, relay)
        _send(conn, {"accepted": {"tcp": len(plan.flows), "relaynat": __version__}})
        commit = _recv(conn).get("commit")
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
    if set(doc) != _KEYS:
        raise HandoverError(f"{FORMAT} document keys {sorted(doc)}, not {sorted(_KEYS)}")
    differs = _addressing_differs(addressing_of(relay.config), doc["addressing"])
    if differs:
        raise HandoverError(differs)
    try:
        flows = cast(list[LiveFlowState], parse_document(doc["tcp"], KIND_LIVE))
    except FlowStateError as exc:
        raise HandoverError(f"tcp: {exc}") from None
    assert relay._tcp is not None
    for i, state in enumerate(flows):
        if not relay._addr.is_guest(state.key[3]):
            raise HandoverError(f"tcp flows[{i}]: {state.guest[0]} is not this relay's guest")
    if len(relay._tcp.flows) + len(flows) > relay.config.max_tcp_flows:
        raise HandoverError(f"{len(flows)} TCP flows do not fit max_tcp_flows "
                            f"{relay.config.max_tcp_flows}")
    used: list[int] = []
    check = _Checker(fds, used)
    try:
        _check_parts(doc, flows, check)
    except (KeyError, TypeError, ValueError) as exc:
        raise HandoverError(f"malformed {FORMAT} document: {exc!r}") from None
    if sorted(used) != list(range(len(fds))):
        raise HandoverError(f"{len(fds)} descriptors passed, the document uses "
                            f"{sorted(used)}")
    return _Plan(doc, fds, flows)


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
               listening: bool) -> tuple[Any, Any]:
        """(its address, its peer's or None) once the descriptor proved to be such a
        socket."""
        fd = self.index(value, what)
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            raise HandoverError(f"{what}: descriptor is not a socket") from None
        try:
            accepting = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            if sock.family not in family or sock.type != kind or bool(accepting) != listening:
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
        if peer is None or (ip_address(peer[0]), peer[1]) != (ip_address(want[0]), want[1]):
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
        if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:[pidfd]":
            raise HandoverError("command: descriptor is not a pidfd")
    transport = doc["transport"]
    if transport is None:
        return
    if transport["kind"] == "tap":
        fd = check.index(transport["fd"], "transport")
        try:
            if not stat.S_ISCHR(os.fstat(fd).st_mode):
                raise OSError("not a character device")
            fcntl.ioctl(fd, _TUNGETIFF, bytes(18))
        except OSError as exc:
            raise HandoverError(f"transport: descriptor is not a TAP ({exc})") from None
        if type(transport["vnet_hdr_len"]) is not int or type(transport["offload"]) is not bool:
            raise HandoverError("transport: vnet_hdr_len or offload malformed")
    elif transport["kind"] == "stream":
        check.socket(transport["fd"], "transport", (socket.AF_UNIX,), socket.SOCK_STREAM, False)
        for key in ("pending_in", "pending_out"):
            base64.b64decode(transport[key], validate=True)
    else:
        raise HandoverError(f"transport kind {transport['kind']!r} is not tap or stream")
    mac = doc["guest"]["mac"]
    if mac is not None and len(bytes.fromhex(mac.replace(":", ""))) != 6:
        raise HandoverError(f"guest mac {mac!r}")
    ip_address(doc["guest"]["address6"])


async def _build(plan: _Plan, relay: Relay) -> Taken:
    """Serve everything the plan holds (it was all checked: nothing here refuses)."""
    doc, fds = plan.doc, plan.fds
    tcp, forwarder, loop = relay._tcp, relay._forwarder, relay._loop
    assert tcp is not None and forwarder is not None and loop is not None
    relay._stats.update(doc["stats"])
    guest = doc["guest"]
    if guest["mac"] is not None:
        relay._learn_guest_mac(bytes.fromhex(guest["mac"].replace(":", "")))
    relay._guest_addr6 = ip_address(guest["address6"]).packed
    spec = doc["transport"]
    if spec is not None and spec["kind"] == "tap":
        relay.attach(TapTransport(fds[spec["fd"]], spec["vnet_hdr_len"], spec["offload"]))
    elif spec is not None:
        relay.attach(StreamTransport(
            socket.socket(fileno=fds[spec["fd"]]), relay.config.guest_queue_limit,
            pending_in=base64.b64decode(spec["pending_in"]),
            pending_out=base64.b64decode(spec["pending_out"])))
    now, c = loop.time(), relay.config
    for state in plan.flows:
        sock = socket.socket(fileno=fds[state.socket.fd])
        sock.setblocking(False)
        adopt_flow(tcp, state, sock, now, mtu=c.mtu, idle_timeout_s=c.tcp_idle_timeout_s,
                   host_addr=state.socket.peer)
    for fwd in doc["forwards"]:
        forwarder.adopt(fwd["proto"], fwd["host_addr"], fwd["guest_port"], fwd["interface"],
                        socket.socket(fileno=fds[fwd["fd"]]))
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
    relay._stats["handovers_received"] += 1
    relay._stats["handover_pause_us"] = int(pause * 1e6)
    log.info("took over: %d TCP flows, %d not moved; the guest waited %.1f ms",
             len(plan.flows), len(doc["tcp"]["not_moved"]), pause * 1000)
    return Taken(control, stream["path"] if stream else None,
                 fds[doc["command"]["fd"]] if doc["command"] else None, pause)


async def serve_taken(relay: Relay, taken: Taken, stop: asyncio.Event) -> Source:
    """Serve what was taken over until `stop`, the guest's transport ends (unless a
    stream listener waits for the next guest), the command of `relaynat run` exits,
    or this relay hands over in its turn; returns its `Source` (`done`: handed over)."""
    loop = asyncio.get_running_loop()
    source = Source(relay, taken.control, stream_path=taken.stream_path,
                    command_fd=taken.command_fd)
    waits = [stop.wait()]
    if taken.stream_path is None:
        waits.append(relay.transport_lost_event.wait())
    if taken.control is not None:
        taken.control.on_handover = source.hand_over
        waits.append(taken.control.handed_over.wait())
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
