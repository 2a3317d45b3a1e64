"""One flow as a `FlowInfo` (relaynat.flow_info, which documents the fields), for
`Relay.flows()` and the control socket's `flows`.

Every relay part (TCP, UDP, ICMP echo) describes its flows through these functions, so
the fields mean the same whatever the protocol. Reading a flow never changes it; the
only system call is getsockopt(TCP_INFO) on TCP host sockets (about half a microsecond
each).
"""

from __future__ import annotations

from ipaddress import ip_address
from typing import TYPE_CHECKING

from relaynat.events import Endpoint
from relaynat.flow_info import FlowInfo
from relaynat.host.tcp_flow import tcp_info
from relaynat.tcp_actions import M32

if TYPE_CHECKING:
    from relaynat.host.icmp_relay import EchoSession
    from relaynat.host.tcp_flow import TcpFlow
    from relaynat.udp_flow import UdpFlow

__all__ = ["FlowInfo", "describe_echo", "describe_tcp", "describe_udp"]


def _ip(packed: bytes) -> str:
    return str(ip_address(packed))


def _host_peer(addr: object) -> Endpoint | None:
    """A socket address as an Endpoint; None if unknown. An IPv4 client of a
    dual-stack forward shows as IPv4, not ::ffff:a.b.c.d."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]
        return Endpoint(host, int(addr[1]))
    return None


def describe_tcp(flow: TcpFlow) -> FlowInfo:
    """A TCP flow. `guest_window`: bytes the guest's last advertised window still
    allows us to send (its right edge minus what we sent). `rtt_us`: the host socket's
    smoothed RTT as the kernel measures it (tcpi_rtt of TCP_INFO, microseconds); None
    while connecting or when the kernel's struct is too short."""
    entry = flow.entry
    guest_port, far, far_port, guest = flow.key
    room = (entry.guest_wnd_edge - entry.snd_nxt) & M32
    rtt = None
    if not flow.connecting and flow.sock.fileno() >= 0:
        try:
            info = tcp_info(flow.sock)
        except OSError:
            info = None
        rtt = info.rtt_us if info is not None else None
    return FlowInfo(
        protocol="tcp",
        direction="inbound" if flow.inbound else "outbound",
        guest_end=Endpoint(_ip(guest), guest_port),
        far=Endpoint(_ip(far), far_port),
        host_peer=_host_peer(flow.host_addr),
        state=entry.state.value,
        bytes_from_guest=entry.bytes_from_guest,
        bytes_to_guest=entry.bytes_to_guest,
        # A window the guest shrank below what is in flight leaves no room (not 4 GiB).
        guest_window=room if room < 1 << 31 else 0,
        rtt_us=rtt,
    )


def describe_udp(flow: UdpFlow) -> FlowInfo:
    guest_port, far, far_port, guest = flow.key
    if flow.peer is not None:
        peer = _host_peer(flow.peer)
    else:
        try:
            peer = _host_peer(flow.sock.getpeername()) if flow.sock is not None else None
        except OSError:
            peer = None
    return FlowInfo(
        protocol="udp",
        direction="inbound" if flow.peer is not None else "outbound",
        guest_end=Endpoint(_ip(guest), guest_port),
        far=Endpoint(_ip(far), far_port),
        host_peer=peer,
        # conntrack's words: a flow is "assured" once the far end has answered.
        state="answered" if flow.replied else "unanswered",
        bytes_from_guest=flow.bytes_from_guest,
        bytes_to_guest=flow.bytes_to_guest,
        guest_window=None,
        rtt_us=None,
    )


def describe_echo(session: EchoSession) -> FlowInfo:
    ident, far, guest = session.key
    return FlowInfo(
        protocol="icmp",
        direction="outbound",
        guest_end=Endpoint(_ip(guest), ident),
        far=Endpoint(_ip(far), None),
        host_peer=Endpoint(session.host_ip, None),
        state="open",
        bytes_from_guest=session.bytes_from_guest,
        bytes_to_guest=session.bytes_to_guest,
        guest_window=None,
        rtt_us=None,
    )
