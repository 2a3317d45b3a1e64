"""The guest transport's part of a handover document (moving/handover.py): how the running
relay describes its link (`describe`), how the new one checks the description against
the descriptor it came with (`check`) and serves it (`build`).

``transport`` is null (no guest attached) or one of these kinds; ``fd`` is an index
into the descriptors passed:

- ``{"kind": "tap", "fd", "vnet_hdr_len", "offload"}``: the TAP.
- ``{"kind": "stream", "fd", "pending_in", "pending_out"}`` (base64: the bytes of a
  frame read in part, and what was queued toward the guest): a qemu stream socket.
- ``{"kind": "unixgram", "fd", "path", "connected", "peer", "peer_connected",
  "peer_waits", "peer_gone", "pending_out"}``: the unix datagram socket. ``path``: the
  path `serve --unixgram` bound (the new relay serves it, and removes it when it
  ends), null for `--fd`; ``connected``: the socket has a fixed peer (`--fd` of a
  connected socket); ``peer``: the guest's address as learned from its first
  datagram (base64 of the raw sun_path, so abstract names survive), or null;
  ``peer_connected``: the socket is connected to that peer (a qemu-style peer,
  transports/unixgram.py); ``peer_waits``: a full peer means "wait", not "drop"; ``peer_gone``:
  the peer refused us and the next sender replaces it; ``pending_out``: base64 frames
  queued toward the guest, each one datagram. vfkit's `VFKT` handshake leaves
  nothing beyond the learned peer.
- ``{"kind": "interface", "fd", "name", "vnet_hdr_len", "ignores_outgoing",
  "ifindex", "mtu"}``: the bound AF_PACKET socket of `serve --interface`, with its
  options (PACKET_VNET_HDR, PACKET_IGNORE_OUTGOING, the promiscuous membership and the
  buffer sizes belong to the socket and move with it).

unixgram and interface came after the first relaynat that could hand over; a relay
that predates them refuses such a document ("transport kind 'unixgram' is not tap or
stream"), and the running relay serves on. Relays that know them say so in the offer
(``"transport": KIND``) too, so that a newer kind is refused before anything stops.
"""

from __future__ import annotations

import base64
import fcntl
import os
import socket
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from relaynat.errors import Error
from relaynat.transports.interface import (
    PACKET_VNET_HDR,
    PACKET_VNET_HDR_LEN,
    SOL_PACKET,
    InterfaceTransport,
)
from relaynat.transports.stream import StreamTransport
from relaynat.transports.tap import TapTransport
from relaynat.transports.unixgram import Address, UnixgramServer, UnixgramState, UnixgramTransport

if TYPE_CHECKING:
    from relaynat.relay import Relay
    from relaynat.transports.base import FrameTransport

KINDS = ("tap", "stream", "unixgram", "interface")
_TUNGETIFF = 0x800454D2

Stats = Callable[[], dict[str, int]]


class TransportError(Error, ValueError):
    """The transport's description does not hold (the message says what)."""


class Checker(Protocol):
    """Checks a descriptor index of the document against the descriptor
    (moving/handover_receive.py)."""

    def index(self, value: Any, what: str) -> int: ...

    def socket(self, value: Any, what: str, family: tuple[int, ...], kind: int,
               listening: bool) -> tuple[Any, Any]: ...


def kind_of(transport: FrameTransport | None) -> str | None:
    """The document kind of `transport`; None for none. TypeError for a transport no
    relay can take over."""
    for cls, kind in ((TapTransport, "tap"), (StreamTransport, "stream"),
                      (UnixgramTransport, "unixgram"), (InterfaceTransport, "interface")):
        if isinstance(transport, cls):
            return kind
    if transport is None:
        return None
    raise TypeError(f"a {type(transport).__name__} cannot be handed over")


def stop_sending(transport: FrameTransport) -> None:
    """Stop sending on a link whose reading stopped already (`Relay.suspend`): what was
    queued toward the guest moves with the document. The other kinds send nothing
    once stopped (unixgram) or queue nothing (tap, interface)."""
    if isinstance(transport, StreamTransport):
        transport.stop_writing()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _address(addr: Address | None) -> str | None:
    if addr is None:
        return None
    return _b64(os.fsencode(addr) if isinstance(addr, str) else addr)


def _parse_address(text: str | None) -> Address | None:
    if text is None:
        return None
    raw = base64.b64decode(text, validate=True)
    return raw if raw.startswith(b"\0") else os.fsdecode(raw)  # abstract: bytes, as recvfrom


def describe(transport: FrameTransport | None, fd: Callable[[socket.socket | int], int],
             unixgram: UnixgramServer | None) -> dict[str, Any] | None:
    """`transport`, stopped, as the document's ``transport``; `fd` numbers each
    descriptor; `unixgram`: the server whose path the transport serves, if any."""
    if isinstance(transport, TapTransport):
        return {"kind": "tap", "fd": fd(transport.fd), "vnet_hdr_len": transport.vnet_hdr_len,
                "offload": transport.offload}
    if isinstance(transport, StreamTransport):
        pending_in, pending_out = transport.handover_state()
        return {"kind": "stream", "fd": fd(transport.sock), "pending_in": _b64(pending_in),
                "pending_out": _b64(pending_out)}
    if isinstance(transport, UnixgramTransport):
        state = transport.handover_state()
        served = unixgram is not None and unixgram.transport is transport
        return {"kind": "unixgram", "fd": fd(transport.sock),
                "path": unixgram.path if served and unixgram else None,
                "connected": transport.connected, "peer": _address(state.peer),
                "peer_connected": state.sock_peer, "peer_waits": state.can_wait,
                "peer_gone": state.peer_dead,
                "pending_out": [_b64(frame) for frame in state.pending_out]}
    if isinstance(transport, InterfaceTransport):
        return {"kind": "interface", "fd": fd(transport.sock), "name": transport.name,
                "vnet_hdr_len": transport.vnet_hdr_len,
                "ignores_outgoing": transport.ignores_outgoing,
                "ifindex": transport.ifindex, "mtu": transport.mtu}
    return None


def check(spec: dict[str, Any], check_fd: Checker, mtu: int) -> None:
    """Raise TransportError (or KeyError, TypeError, ValueError for a malformed field)
    unless `spec` describes the descriptor it names; `mtu`: the new relay's guest MTU."""
    kind = spec["kind"]
    if kind == "tap":
        fd = check_fd.index(spec["fd"], "transport")
        try:
            if not stat.S_ISCHR(os.fstat(fd).st_mode):
                raise OSError("not a character device")
            fcntl.ioctl(fd, _TUNGETIFF, bytes(18))
        except OSError as exc:
            raise TransportError(f"transport: descriptor is not a TAP ({exc})") from None
        if type(spec["vnet_hdr_len"]) is not int or type(spec["offload"]) is not bool:
            raise TransportError("transport: vnet_hdr_len or offload malformed")
    elif kind == "stream":
        check_fd.socket(spec["fd"], "transport", (socket.AF_UNIX,), socket.SOCK_STREAM, False)
        for key in ("pending_in", "pending_out"):
            base64.b64decode(spec[key], validate=True)
    elif kind == "unixgram":
        _check_unixgram(spec, check_fd)
    elif kind == "interface":
        _check_interface(spec, check_fd, mtu)
    else:
        raise TransportError(f"transport kind {kind!r} is not one of {', '.join(KINDS)}")


def _check_unixgram(spec: dict[str, Any], check_fd: Checker) -> None:
    name, peer = check_fd.socket(spec["fd"], "transport", (socket.AF_UNIX,),
                                 socket.SOCK_DGRAM, False)
    flags = ("connected", "peer_connected", "peer_waits", "peer_gone")
    if any(type(spec[key]) is not bool for key in flags):
        raise TransportError(f"transport: {', '.join(flags)} must be true or false")
    path, learned = spec["path"], _parse_address(spec["peer"])
    if path is not None and (spec["connected"] or name != path):
        raise TransportError(f"transport: the socket is bound at {name!r}, not {path!r}")
    if spec["connected"] and peer is None:
        raise TransportError("transport: the socket is not connected")
    if spec["peer_connected"] and (learned is None or peer != learned):
        raise TransportError(f"transport: the socket is connected to {peer!r}, not to the "
                             f"guest at {learned!r}")
    for frame in spec["pending_out"]:
        base64.b64decode(frame, validate=True)


def _check_interface(spec: dict[str, Any], check_fd: Checker, mtu: int) -> None:
    fd = check_fd.index(spec["fd"], "transport")
    sock = socket.socket(fileno=fd)
    try:
        if sock.family != socket.AF_PACKET or sock.type != socket.SOCK_RAW:
            raise TransportError("transport: descriptor is not a packet socket")
        bound = sock.getsockname()[0]
        vnet_hdr = sock.getsockopt(SOL_PACKET, PACKET_VNET_HDR) != 0
    finally:
        sock.detach()
    if bound != spec["name"]:
        raise TransportError(f"transport: the packet socket is bound to {bound!r}, not "
                             f"{spec['name']!r}")
    if spec["vnet_hdr_len"] != (PACKET_VNET_HDR_LEN if vnet_hdr else 0):
        raise TransportError(f"transport: vnet_hdr_len {spec['vnet_hdr_len']!r}, the socket "
                             f"has PACKET_VNET_HDR {'on' if vnet_hdr else 'off'}")
    if type(spec["ignores_outgoing"]) is not bool or type(spec["ifindex"]) is not int:
        raise TransportError("transport: ignores_outgoing or ifindex malformed")
    if type(spec["mtu"]) is not int or mtu > spec["mtu"]:
        raise TransportError(f"transport: guest MTU {mtu} is larger than the MTU of "
                             f"interface {spec['name']} ({spec['mtu']!r})")


def build(spec: dict[str, Any] | None, fds: list[int],
          relay: Relay) -> tuple[UnixgramServer | None, Stats]:
    """Serve the (checked) transport in `relay`: the unixgram server when it serves a
    path, and the transport's counters for `--stats`."""
    if spec is None:
        return None, dict
    kind, fd = spec["kind"], fds[spec["fd"]]
    if kind == "tap":
        relay.attach(TapTransport(fd, spec["vnet_hdr_len"], spec["offload"]))
        return None, dict
    if kind == "stream":
        relay.attach(StreamTransport(
            socket.socket(fileno=fd), relay.config.guest_queue_limit,
            pending_in=base64.b64decode(spec["pending_in"]),
            pending_out=base64.b64decode(spec["pending_out"])))
        return None, dict
    sock = socket.socket(fileno=fd)
    if kind == "interface":
        sock.setblocking(False)
        interface = InterfaceTransport(sock, spec["name"], spec["ifindex"], spec["mtu"],
                                       spec["vnet_hdr_len"] != 0, spec["ignores_outgoing"])
        relay.attach(interface)
        return None, interface.stats
    state = UnixgramState(_parse_address(spec["peer"]), spec["peer_connected"],
                          spec["peer_waits"], spec["peer_gone"],
                          [base64.b64decode(f) for f in spec["pending_out"]])
    if spec["path"] is not None:
        server = UnixgramServer(relay, spec["path"], sock, state)
        return server, server.stats
    transport = UnixgramTransport(sock, connected=spec["connected"], state=state,
                                  queue_limit=relay.config.guest_queue_limit)
    relay.attach(transport)
    return None, transport.stats
