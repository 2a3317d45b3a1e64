"""`Relay`'s inbound forwards: host ports forwarded to the guest (`add_forward`,
`remove_forward`, `forwards`), and the inbound flows their clients open
(host/forward.py accepts them; `TcpRelay.open_inbound` and `UdpRelay.on_forwarded`
serve them).

`RelayForwards` is a base class of `Relay`, kept in a module of its own so that relay.py
stays about the guest's frames. It declares the parts of the relay it works on, which
`Relay` builds (`Relay.__init__`, `Relay.start`); it is not meant to be used alone.
"""

from __future__ import annotations

import socket
from collections import Counter
from typing import TYPE_CHECKING

from relaynat.addressing import AddressMap
from relaynat.config import RelayConfig
from relaynat.errors import RelayClosedError
from relaynat.guest_log import in_guest_scope
from relaynat.host.forward import Forward, Forwarder, ForwardError, SockAddr, client_address
from relaynat.host.tcp_flow import close_with_reset
from relaynat.host.tcp_relay import TcpRelay
from relaynat.host.udp_relay import UdpRelay
from relaynat.link.services import LinkServices
from relaynat.transports.base import FrameTransport


class RelayForwards:
    """Inbound forwards and their flows; see the module docstring."""

    # The parts of the relay this works on (`Relay.__init__` and `Relay.start`).
    name: str | None
    config: RelayConfig
    _stats: Counter[str]
    _closed: bool
    _transport: FrameTransport | None
    _tcp: TcpRelay | None
    _udp_relay: UdpRelay | None
    _forwarder: Forwarder | None
    _link: LinkServices
    _addr: AddressMap
    _guest_mac: bytes | None
    _guest_ip: bytes
    _guest_addr6: bytes

    if TYPE_CHECKING:
        def _check_open(self, call: str) -> None: ...

    @in_guest_scope
    def add_forward(self, proto: str, host_addr: str | None, host_port: int,
                    guest_port: int, interface: str | None = None) -> Forward:
        """Forward `proto` ("tcp" or "udp") host `host_addr` (None: all, both families)
        port `host_port` (0: pick one; the returned Forward says which) to the guest's
        `guest_port`. Raises ForwardError saying why not (port in use, bad address,
        unknown protocol, already forwarded)."""
        self._check_open("add_forward")
        assert self._forwarder is not None
        return self._forwarder.add(proto, host_addr, host_port, guest_port, interface)

    @in_guest_scope
    def remove_forward(self, proto: str | None = None, host_addr: str | None = None,
                       host_port: int | None = None, *,
                       forward_id: int | None = None) -> Forward:
        """Stop forwarding: the forward with `forward_id`, or the one on (proto,
        host_addr, host_port). TCP connections already open stay, the UDP flows of the
        forward end with its socket. Raises ForwardError."""
        if self._closed:
            raise RelayClosedError("Relay.remove_forward(): the relay is closed")
        if self._forwarder is None:
            raise ForwardError("the relay is not running")
        forward = self._forwarder.lookup(proto, host_addr, host_port, forward_id)
        if forward.sock is not None and self._udp_relay is not None:
            self._udp_relay.forward_closed(forward.sock)
        self._forwarder.remove(forward)
        return forward

    def forwards(self) -> list[dict[str, object]]:
        """The forwards in force, with the host ports the kernel chose for port 0."""
        if self._forwarder is None:
            return []
        return [f.describe() for f in self._forwarder.forwards]

    def _inbound_ends(self, client: bytes) -> tuple[bytes, bytes] | None:
        """(guest address, source the guest sees) for a client of a forward: the guest
        is reached in the client's family (the other one if it runs only that), passt's
        rule. None when no guest is attached. A guest that has not spoken yet is asked
        for its MAC (LinkServices.solicit_guest): the flow's first frame is on its way."""
        if self._transport is None:
            return None
        c = self.config
        v6 = (len(client) == 16 and c.ipv6) or not c.ipv4
        guest = self._guest_addr6 if v6 else self._guest_ip
        if self._guest_mac is None:
            self._link.solicit_guest(guest)
        return guest, self._addr.inbound_source(client, v6)

    def _open_inbound(self, sock: socket.socket, client: bytes, client_port: int,
                      guest_port: int) -> bool:
        ends = self._inbound_ends(client)
        if ends is None or self._tcp is None:
            self._stats["tcp_inbound_no_guest"] += 1
            close_with_reset(sock)
            return False
        return self._tcp.open_inbound(sock, ends[0], guest_port, ends[1], client_port)

    def _forwarded_datagram(self, forward: Forward, data: bytes,
                            peer: SockAddr) -> None:
        ends = self._inbound_ends(client_address(peer))
        if ends is None or self._udp_relay is None or forward.sock is None:
            self._stats["udp_inbound_no_guest"] += 1
            return
        self._udp_relay.on_forwarded(forward.sock, peer, data, ends[0], forward.guest_port,
                                     ends[1], peer[1])
