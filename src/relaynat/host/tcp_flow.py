"""`TcpFlow`, the TCP shell's record of one flow (host/tcp_relay.py), and the calls on a flow's
host socket that need nothing but the socket.

Kernel facts used: SO_PEEK_OFF (socket(7), TCP since Linux 6.10); a non-blocking
connect() has ended once poll() says POLLOUT, POLLERR or POLLHUP (connect(2));
recv(MSG_TRUNC) on TCP discards without copying (tcp(7)); SIOCOUTQ (tcp(7)); TCP_INFO
(struct tcp_info, checked by length, window.TcpInfo); SO_LINGER {1, 0} makes close()
send a RST (socket(7)).
"""

from __future__ import annotations

import contextlib
import fcntl
import select
import socket
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from relaynat.window import TCP_INFO_LEN, SocketFacts, TcpInfo

if TYPE_CHECKING:
    from relaynat.nat_entry import TcpNatEntry

#: asm-generic/socket.h; Python's socket module does not name it.
SO_PEEK_OFF = 42
SIOCOUTQ = 0x5411
_LINGER_RESET = struct.pack("ii", 1, 0)
_CONNECT_ENDED = select.POLLOUT | select.POLLERR | select.POLLHUP
_INT = struct.Struct("i")
#: Flow key: (guest port, destination address as the guest sees it, destination port,
#: guest address); an IPv6 guest may use several source addresses at once.
FlowKey = tuple[int, bytes, int, bytes]


@dataclass(slots=True, eq=False)
class TcpFlow:
    key: FlowKey
    entry: TcpNatEntry
    sock: socket.socket
    connecting: bool = True
    host_readable: bool = False
    peek_offset_supported: bool = True
    scheduled_at: float = float("inf")
    host_addr: tuple[str, int] = ("", 0)
    dirty: bool = field(default=False)
    #: Bytes the guest acknowledged that are still in the socket's receive queue: they
    #: are dropped once per batch (one recv(MSG_TRUNC) for many ACKs), and always before
    #: a rewind or a fallback peek, which count from the queue's head.
    consume_pending: int = 0
    #: Opened by a client of a forwarded port, not by the guest (the egress policy
    #: does not apply to it).
    inbound: bool = False
    #: Guest payloads of this wakeup not yet written to the socket (views into the
    #: transport's buffer, valid until its end of batch): one sendmsg at flush.
    gathered: list[memoryview] | None = None
    #: Bytes in flight toward the guest from which the socket's receive buffer may be
    #: what holds the host peer back (host/pump.py grows it then).
    rcvbuf_watch: int = 1 << 16
    #: Bytes by which host/pump.py grew that buffer (counted in its relay's budget).
    rcvbuf_granted: int = 0


def set_up_host_socket(sock: socket.socket) -> bool:
    """Make `sock` a flow's host socket: no Nagle (the guest runs its own; a second one
    here would only add latency) and the peek offset at the queue's head. False if the
    kernel has no SO_PEEK_OFF for TCP (before 6.10)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
    except OSError:
        return False
    return True


def connect_ended(sock: socket.socket) -> bool:
    """Whether a non-blocking connect() on `sock` already ended, either way."""
    poller = select.poll()
    poller.register(sock, _CONNECT_ENDED)
    return bool(poller.poll(0))


def close_with_reset(sock: socket.socket) -> None:
    """Close so that the peer gets a RST, not a FIN (SO_LINGER {1, 0}, socket(7)):
    a refused or aborted flow must look refused to the host peer."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


def tcp_info(sock: socket.socket) -> TcpInfo | None:
    """The kernel's struct tcp_info of `sock` (None if its struct is too short for the
    fields we read). Raises OSError."""
    return TcpInfo.from_bytes(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO,
                                              TCP_INFO_LEN))


def ioctl_int(sock: socket.socket, request: int) -> int:
    """An ioctl of `sock` that answers one int (SIOCOUTQ, FIONREAD, ...). Raises OSError."""
    value: int = _INT.unpack(fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0"))[0]
    return value


def socket_facts(sock: socket.socket) -> SocketFacts | None:
    """What the window toward the guest is computed from (window.advertised_window);
    None if the socket cannot say (it failed)."""
    try:
        info = tcp_info(sock)
        sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        outq = ioctl_int(sock, SIOCOUTQ)
    except OSError:
        return None
    return SocketFacts(info, sndbuf, outq)


def peek_at(flow: TcpFlow, offset: int, length: int, view: memoryview, send_pos: int
            ) -> memoryview:
    """Up to `length` bytes at `offset` from the head of the receive queue, peeked into
    `view` without moving the flow's send position: SO_PEEK_OFF is set to the offset
    and then back to `send_pos` (it counts from the head too). Without SO_PEEK_OFF,
    a peek from the head, sliced. Raises OSError."""
    sock = flow.sock
    length = min(length, len(view))
    if not flow.peek_offset_supported:
        return memoryview(sock.recv(offset + length, socket.MSG_PEEK))[offset:]
    sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, offset)
    try:
        got = sock.recv_into(view, length, socket.MSG_PEEK)
    finally:
        sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, send_pos)
    return view[:got]


def discard(sock: socket.socket, nbytes: int, scratch: bytearray) -> None:
    """Drop `nbytes` from the head of the receive queue: bytes the guest acknowledged.
    recv(MSG_TRUNC) copies nothing; `scratch` only bounds each call."""
    while nbytes > 0:
        try:
            got = sock.recv_into(scratch, min(nbytes, len(scratch)), socket.MSG_TRUNC)
        except OSError:
            return
        if got <= 0:
            return
        nbytes -= got
