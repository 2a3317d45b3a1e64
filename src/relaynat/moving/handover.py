"""Handing a running relay over to a new relaynat process on the same host, the guest's
connections kept (`relaynat ctl handover`): to upgrade relaynat or change its
configuration under a running guest.

The new relay (B) waits on a unix seqpacket socket (`Receiver`, `relaynat serve
--receive-handover PATH`, mode 0600, only its own user or root may connect).
`relaynat ctl handover --to PATH` connects to it, with the operator's rights, and
passes the connected socket to the running relay (A, `Source`) over A's control
socket (control/server.py: a confined relay can connect to no path); A then, on that
socket (or on one it connects itself, given only the path: an unconfined relay asked
by an older client):

1. offers: ``{"offer": {"format", "version", "relaynat", "addressing", "transport"}}``
   (``transport``: the kind of A's guest link, or null; relays before the unixgram and
   interface kinds send none); B answers ``{"ready": {"relaynat": VERSION, "takes":
   ["udp", "icmp"]}}`` or ``{"error": DESC}`` (its guest-visible addressing differs:
   the guest would lose its address, routes or flows; or it cannot serve that kind of
   link). A refusal here leaves A untouched. ``takes`` names what B takes over beside
   TCP (a relay before UDP flows and ping sessions moved sends none: A leaves them
   out of the document, and they end with A as they did then).
2. stops (`Source._take_out`): the guest transport stops reading at a frame boundary and
   sends nothing more; forwards stop accepting; every established or half-closed TCP
   flow leaves A's tables, its host socket open and untouched (A has dropped the bytes
   the guest acknowledged, so the socket's receive queue starts at the guest's first
   unacknowledged byte); so does every UDP flow and ping session, if B takes them.
   Nothing is lost meanwhile: frames wait in the TAP's or the socket's queue, host
   data and datagrams in the host sockets, clients in the listeners' backlog.
3. sends ``{"document": BYTES, "fds": N}``, then the N descriptors (SCM_RIGHTS, at most
   250 a message: SCM_MAX_FD is 253), then the document (JSON, in 32 KiB messages).
   B checks all of it (handover_receive.py: format, version, every field, every
   descriptor's kind, each flow's socket connected to the peer its record names, room
   for the flows) and answers
   ``{"accepted": {...}}`` or ``{"error": DESC}``; on an error (or silence) A takes
   everything back and serves on (`Source._give_back`), and B closes its copies.
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
- ``transport``: null (no guest attached) or the guest link: a TAP, a qemu stream
  socket, a unix datagram socket or the packet socket of `serve --interface`, with
  what A had read in part or queued toward the guest (moving/handover_transport.py lists
  the kinds and their fields; kinds were added in a backward-compatible way: a relay
  that does not know one refuses the document, and A serves on).
- ``stream_listener``, ``control``: null or ``{"fd", "path"}``: the listening socket
  of `serve --socket` and the control socket; B serves them on the same paths.
- ``command``: null or ``{"fd"}``, a pidfd of `relaynat run`'s namespace child (the
  process that starts the command in its own user and PID namespaces and passes
  signals on to it, netns/child.py): B ends when it exits (its exit status is its
  parent's, A's, to learn, so B exits 0) and forwards SIGTERM/SIGHUP to it.
- ``forwards``: ``[{"proto", "host_addr", "host_port", "guest_port", "interface",
  "fd"}]``, the bound (TCP: listening) sockets.
- ``tcp``: a "relaynat-flows" document of kind "live" (flow_state.py): the flows, and
  under ``not_moved`` everything that stays behind and ends with A, with the reason:
  half-open TCP flows (the guest's SYN retransmission opens them again at B), flows to
  A's own DNS-over-TCP responder, UDP flows and ping sessions when B does not take
  them (the next datagram opens a new one at B, from another host port), a UDP flow
  whose socket failed.
- ``stats``: A's counters, which B's continue from.
- ``udp`` (only when B ``takes`` it; absent: none): the UDP flows, DNS forwarding's
  included, each a `udp_flow.UdpFlowState` record: an outbound flow's connected socket
  by ``fd`` (its peer checked), an inbound flow's forward by its index in ``forwards``
  and its client's address; how long it has been idle (its timeout goes on where it
  was), whether the far end answered, the quote for an ICMP error, its own timeout
  (DNS and inbound flows), its byte counts.
- ``icmp`` (likewise): the ping sessions, each a `icmp_echo.EchoSessionState` record: its
  ping socket by ``fd`` (the kernel's identifier of the session, the socket's bound
  port, moves with it), the guest's identifier and addresses, its idle time and counts.

Every ``fd`` is an index into the descriptors passed; each is used exactly once.

This module is the protocol and the running relay's side (`Source`);
moving/handover_receive.py is the new relay's (`Receiver`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from dataclasses import dataclass, field, replace
from ipaddress import ip_address
from typing import TYPE_CHECKING, Any

from relaynat import __version__
from relaynat.config import RelayConfig
from relaynat.control.server import ControlServer, RequestError
from relaynat.errors import Error
from relaynat.flow_state import KIND_LIVE, make_document
from relaynat.host.flow_move import Suspended
from relaynat.moving import handover_transport

if TYPE_CHECKING:
    from relaynat.netns.guest import NamespaceGuest
    from relaynat.relay import Relay
    from relaynat.transports.unixgram import UnixgramServer

log = logging.getLogger("relaynat.handover")

FORMAT = "relaynat-handover"
VERSION = 1
TIMEOUT_S = 10.0
_FDS_PER_MESSAGE = 250
_CHUNK = 32 << 10
_MAX_MESSAGE = 64 << 10
_MAX_DOCUMENT = 256 << 20
_MAX_FDS = 1 << 20


class HandoverError(RequestError, Error):
    """A handover that did not happen; the message says why. The relay that offered
    it serves on as before. A RequestError, so `relaynat ctl handover` gets the reason
    as its answer, not an internal error."""


def addressing_of(config: RelayConfig) -> dict[str, object]:
    """What the guest configured itself from (DHCP, RA, `relaynat run`): a relay that
    takes over must present the same, or the guest loses its routes, names or flows."""
    return {"ipv4": config.ipv4, "ipv6": config.ipv6, "address": str(config.guest_ipv4),
            "prefix_len": config.prefix_len_v4, "gateway": str(config.gateway_ipv4),
            "dns": str(config.dns_ipv4), "prefix6": str(config.prefix_v6),
            "address6": str(config.guest_ipv6), "gateway6": str(config.gateway_ipv6),
            "dns6": str(config.dns_ipv6), "gateway_mac": config.gateway_mac.hex(":"),
            "mtu": config.mtu}


def addressing_differs(ours: dict[str, object], theirs: object) -> str | None:
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

def send_message(sock: socket.socket, obj: object) -> None:
    sock.sendall(json.dumps(obj).encode())


def recv_message(sock: socket.socket) -> dict[str, Any]:
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
    message = recv_message(sock)
    if "error" in message:
        raise HandoverError(str(message["error"]))
    if key not in message:
        raise HandoverError(f"the other relay answered {sorted(message)}, not {key!r}")
    return message[key]


def send_document(sock: socket.socket, doc: bytes, fds: list[int]) -> None:
    send_message(sock, {"document": len(doc), "fds": len(fds)})
    for i in range(0, len(fds), _FDS_PER_MESSAGE):
        socket.send_fds(sock, [b"fds"], fds[i:i + _FDS_PER_MESSAGE])
    for i in range(0, len(doc), _CHUNK):
        sock.sendall(doc[i:i + _CHUNK])


def recv_document(sock: socket.socket, fds: list[int]) -> bytes:
    """The document and its descriptors (appended to `fds` as they come, so that the
    caller closes them whatever fails)."""
    header = recv_message(sock)
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

def _connected(fd: int, path: str) -> socket.socket:
    """A socket object on the passed descriptor `fd` (to detach, not close, after):
    HandoverError unless it is a unix seqpacket socket connected to a peer."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise HandoverError(f"the descriptor passed for {path} is not a socket "
                            f"({exc.strerror}): pass one connected to the new relay's "
                            "--receive-handover socket") from None
    try:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
            raise HandoverError(f"the socket passed for {path} is not a unix seqpacket "
                                "socket (a --receive-handover socket is one)")
        sock.getpeername()  # ENOTCONN for a socket never connected
    except OSError as exc:
        sock.detach()
        raise HandoverError(f"the socket passed for {path} is not connected "
                            f"({exc.strerror})") from None
    except HandoverError:
        sock.detach()
        raise
    return sock


@dataclass
class _Held:
    """What a relay took out of service for a handover: to give back, or let go."""

    doc: dict[str, Any]
    fds: list[int]
    suspended: Suspended
    own_fds: list[int] = field(default_factory=list)  # opened for the handover


class Source:
    """A running relay that can hand itself over (`hand_over`), with what its process
    owns beside it: the control server, `serve --socket`'s listener path, the server of
    `serve --unixgram` (`unixgram`: its path moves with its socket), and the command of
    `relaynat run` (`guest`, or `command_fd`: a pidfd, after a handover)."""

    def __init__(self, relay: Relay, control: ControlServer | None = None, *,
                 stream_path: str | None = None, guest: NamespaceGuest | None = None,
                 command_fd: int | None = None,
                 unixgram: UnixgramServer | None = None) -> None:
        self.relay = relay
        self.control = control
        self.stream_path = stream_path
        self.guest = guest
        self.command_fd = command_fd
        self.unixgram = unixgram
        self.done = False
        self._busy = False

    async def hand_over(self, path: str, timeout: float = TIMEOUT_S, *,
                        fd: int | None = None) -> dict[str, Any]:
        """Hand everything to the relay waiting at `path`; returns what moved and what
        did not. Raises HandoverError (and serves on) when it did not happen. `fd`: a
        socket already connected to it (passed by `relaynat ctl`; it stays the
        caller's to close), `path` then only names it."""
        if self.done or self._busy:
            raise HandoverError("a handover is already done or under way")
        try:
            kind = handover_transport.kind_of(self.relay.transport)
        except TypeError as exc:
            raise HandoverError(str(exc)) from None
        sock = _connected(fd, path) if fd is not None else socket.socket(
            socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._busy = True
        sock.settimeout(timeout)
        try:
            return await self._hand_over(sock, path, kind, connect=fd is None)
        except OSError as exc:
            raise HandoverError(f"{path}: {exc.strerror or exc}") from None
        finally:
            if fd is None:
                sock.close()
            else:
                sock.detach()
            self._busy = False

    async def _hand_over(self, sock: socket.socket, path: str, kind: str | None,
                         connect: bool = True) -> dict[str, Any]:
        offer = {"format": FORMAT, "version": VERSION, "relaynat": __version__,
                 "addressing": addressing_of(self.relay.config), "transport": kind}

        def offer_it() -> Any:
            if connect:
                sock.connect(path)
            send_message(sock, {"offer": offer})
            return _answer(sock, "ready")

        ready = await asyncio.to_thread(offer_it)
        takes = ready.get("takes") if isinstance(ready, dict) else None
        held = self._take_out(isinstance(takes, list) and {"udp", "icmp"} <= set(takes))
        try:
            data = json.dumps(held.doc).encode()
            accepted = await asyncio.to_thread(self._deliver, sock, data, held.fds)
            send_message(sock, {"commit": {"stopped_at": held.suspended.stopped_at}})
        except BaseException:
            self._give_back(held)
            raise
        self._let_go(held)
        self.done = True
        tcp, out = held.doc["tcp"], held.suspended
        log.info("handed over to %s (relaynat %s): %d TCP flows, %d UDP flows, %d ping "
                 "sessions, %d not moved", path,
                 ready.get("relaynat") if isinstance(ready, dict) else "?",
                 len(tcp["flows"]), len(out.udp), len(out.icmp), len(tcp["not_moved"]))
        return {"to": path, "accepted": accepted, "moved_tcp": len(tcp["flows"]),
                "moved_udp": len(out.udp), "moved_icmp": len(out.icmp),
                "forwards": len(held.doc["forwards"]), "not_moved": tcp["not_moved"],
                "stopped_at": out.stopped_at}

    @staticmethod
    def _deliver(sock: socket.socket, data: bytes, fds: list[int]) -> Any:
        send_document(sock, data, fds)
        return _answer(sock, "accepted")

    def _take_out(self, datagrams: bool = True) -> _Held:
        """Stop serving and describe everything (module docstring, step 2); UDP flows
        and ping sessions too if `datagrams` (the new relay takes them)."""
        relay = self.relay
        out = relay.suspend(datagrams)
        if out.transport is not None:
            handover_transport.stop_sending(out.transport)  # a kind that moves: checked
        fds: list[int] = []

        def fd(sock: socket.socket | int) -> int:
            fds.append(sock if isinstance(sock, int) else sock.fileno())
            return len(fds) - 1

        for state, sock in out.flows:  # each state names its socket by this index
            index = fd(sock)
            assert index == state.socket.fd
        own: list[int] = []
        command = None
        if self.command_fd is not None:
            command = {"fd": fd(self.command_fd)}
        elif self.guest is not None and self.guest.proc.returncode is None:
            own.append(os.pidfd_open(self.guest.proc.pid))
            command = {"fd": fd(own[-1])}
        listener = out.stream_listener
        doc = {
            "format": FORMAT, "version": VERSION, "relaynat": __version__,
            "addressing": addressing_of(relay.config),
            "guest": {"mac": out.guest_mac.hex(":") if out.guest_mac else None,
                      "address6": str(ip_address(out.guest_addr6))},
            "transport": handover_transport.describe(out.transport, fd, self.unixgram),
            "stream_listener": None if listener is None or self.stream_path is None
            else {"fd": fd(listener), "path": self.stream_path},
            "control": None if self.control is None
            else {"fd": fd(self.control.sock), "path": self.control.path},
            "command": command,
            "forwards": [{k: v for k, v in f.describe().items() if k != "id"}
                         | {"fd": fd(f.sock)} for f in out.forwards if f.sock is not None],
            "tcp": make_document([state for state, _ in out.flows], out.not_moved,
                                 KIND_LIVE),
            "stats": out.stats,
        }
        if datagrams:  # a relay that does not take them would refuse the keys
            doc["udp"] = [replace(state, fd=None if state.forward is not None
                                  else fd(sock)).to_dict() for state, sock in out.udp]
            doc["icmp"] = [replace(state, fd=fd(sock)).to_dict() for state, sock in out.icmp]
        return _Held(doc, fds, out, own)

    def _give_back(self, held: _Held) -> None:
        """The handover failed: serve on exactly as before it began."""
        self.relay.resume(held.suspended)
        for own in held.own_fds:
            os.close(own)
        self.relay.count("handovers_failed")

    def _let_go(self, held: _Held) -> None:
        """The other relay serves: close our copies, without a packet to anyone."""
        for _, sock in held.suspended.flows:
            sock.close()
        for udp, sock in held.suspended.udp:
            if udp.forward is None:  # an inbound flow's is its forward's, closed with it
                sock.close()
        for _, sock in held.suspended.icmp:
            sock.close()
        if held.suspended.transport is not None:
            held.suspended.transport.close()
        if held.suspended.stream_listener is not None:
            self.relay.release_listener()
        if self.control is not None:
            # The listening socket is the new relay's now: a client connecting from here
            # on must reach it, not this relay's copy (the handover's own answer goes out
            # on its connection, which stays).
            self.control.stop_accepting()
        for own in held.own_fds:
            os.close(own)
        if self.command_fd is not None:
            os.close(self.command_fd)
            self.command_fd = None
        if self.guest is not None:
            self.guest.release()
        self.relay.count("handovers_sent")
