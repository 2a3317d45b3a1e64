"""Moving an established host TCP socket to another socket, even on another host, with
the kernel's repair mode (TCP_REPAIR, Linux 3.5+; needs CAP_NET_ADMIN).

`dump(sock)` puts the socket in repair mode and reads what a new socket needs to carry
on the same connection: both sequence numbers, both queues' bytes (sent-but-unacked
and unsent data toward the peer, received-but-unread data), the negotiated options
(MSS, window scales, SACK, timestamps), the window state, and the timestamp clock.
`restore(state)` builds that socket where it is called (the network namespace of the
calling thread), bound to the same local address and port and connected to the same
peer, without a packet on the wire until it leaves repair mode.

Why each piece moves (as CRIU's and passt's migration code found):
- TCP_QUEUE_SEQ sets where the queues start: the send queue at the first unacknowledged
  byte (write_seq minus the queue), the receive queue at the first unread byte.
- Data written in repair mode to the send queue counts as sent and unacknowledged (the
  kernel skips transmission, tcp_write_xmit), so after repair the RTO retransmits
  whatever the peer did not acknowledge; data written to the receive queue is readable
  at once (tcp_send_rcvq).
- The timestamp clock must continue: PAWS (RFC 7323 §5) makes the peer drop segments
  whose TSval went backwards, so TCP_TIMESTAMP moves the clock offset over.
- TCP_REPAIR_WINDOW restores the send and receive windows; it must come after the
  receive queue (the kernel refuses rcv_wup beyond rcv_nxt).
- Leaving repair mode with 0 (not TCP_REPAIR_OFF_NO_WP) sends a window probe, so the
  peer learns at once that the connection lives on and resumes sending.

Restore before the new host's link carries the connection's traffic: a peer segment
that arrives first (a retransmission, a zero-window probe) finds no socket and the
kernel answers it with a RST, which ends the connection at the peer.

Only ESTABLISHED sockets move: a half-closed or half-open one raises RepairError.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import termios

from relaynat.host.sockets import SO_RCVBUFFORCE, SO_SNDBUFFORCE
from relaynat.host.tcp_flow import SO_PEEK_OFF, ioctl_int
from relaynat.repair_state import RepairError, RepairState

TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_REPAIR_OPTIONS = 22
TCP_TIMESTAMP = 24
TCP_REPAIR_WINDOW = 29
TCP_NO_QUEUE, TCP_RECV_QUEUE, TCP_SEND_QUEUE = 0, 1, 2
TCPOPT_MSS, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
#: tcp_info.tcpi_options bits (linux/tcp.h).
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE = 1, 2, 4
TCP_ESTABLISHED = 1
#: Unsent bytes of the send queue (linux/sockios.h); SIOCOUTQ is TIOCOUTQ.
SIOCOUTQNSD = 0x894B
#: Leave repair mode without the window probe (linux/tcp.h).
TCP_REPAIR_OFF_NO_WP = -1
_WINDOW = struct.Struct("=5I")  # struct tcp_repair_window
_OPT = struct.Struct("=2I")  # struct tcp_repair_opt
def _queue(sock: socket.socket, queue: int) -> tuple[int, bytes, int]:
    """(TCP_QUEUE_SEQ, the queue's bytes, unsent bytes) of one queue, in repair mode."""
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, queue)
    seq = struct.unpack("=I", sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ, 4))[0]
    if queue == TCP_SEND_QUEUE:
        length, unsent = ioctl_int(sock, termios.TIOCOUTQ), ioctl_int(sock, SIOCOUTQNSD)
    else:
        length, unsent = ioctl_int(sock, termios.FIONREAD), 0
    # In repair mode, MSG_PEEK reads the selected queue (tcp_peek_sndq for the send
    # queue), all of it in one call.
    data = sock.recv(length, socket.MSG_PEEK | socket.MSG_DONTWAIT) if length else b""
    if len(data) != length:
        raise RepairError(f"read {len(data)} of {length} queued bytes")
    return seq, data, unsent


def dump(sock: socket.socket) -> RepairState:
    """Put `sock` in repair mode (it stays there: closing it then sends nothing to the
    peer) and read its state."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    if info[0] != TCP_ESTABLISHED:
        raise RepairError(f"socket is in TCP state {info[0]}, not ESTABLISHED")
    options, wscales = info[5], info[6]
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
    except PermissionError:
        raise RepairError("TCP_REPAIR needs CAP_NET_ADMIN") from None
    # A peek offset (SO_PEEK_OFF, TCP since Linux 6.10) also moves a repair-mode
    # MSG_PEEK of the receive queue (tcp_recvmsg_locked): the dump would start past
    # the queue's head. -1 switches it off.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, -1)
    send_end, send_queue, unsent = _queue(sock, TCP_SEND_QUEUE)
    recv_end, recv_queue, _ = _queue(sock, TCP_RECV_QUEUE)
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
    timestamps = bool(options & TCPI_OPT_TIMESTAMPS)
    wscale = bool(options & TCPI_OPT_WSCALE)
    return RepairState(
        family=sock.family, local=sock.getsockname()[:2], peer=sock.getpeername()[:2],
        # TCP_QUEUE_SEQ reads write_seq (past the send queue's end) and rcv_nxt (past
        # the receive queue's end); the queues start that many bytes earlier.
        send_seq=(send_end - len(send_queue)) & 0xFFFFFFFF,
        recv_seq=(recv_end - len(recv_queue)) & 0xFFFFFFFF,
        send_queue=send_queue, unsent=unsent, recv_queue=recv_queue,
        mss=sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG),
        snd_wscale=wscales & 0xF if wscale else None,
        rcv_wscale=wscales >> 4 if wscale else None,
        sack=bool(options & TCPI_OPT_SACK),
        timestamp=struct.unpack("=I", sock.getsockopt(socket.IPPROTO_TCP, TCP_TIMESTAMP,
                                                      4))[0] if timestamps else None,
        window=_WINDOW.unpack(sock.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW,
                                              _WINDOW.size)),
        sndbuf=sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
        rcvbuf=sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))


def _write_all(sock: socket.socket, data: bytes, what: str) -> None:
    """Write all of `data` (to the selected queue in repair mode); the socket is
    non-blocking, so bytes that do not fit raise instead of waiting for room nothing
    will make."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except BlockingIOError:
            raise RepairError(f"{len(view)} of {len(data)} {what} bytes do not fit the "
                              "socket's buffer") from None


def _fill(sock: socket.socket, queue: int, data: bytes) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, queue)
    _write_all(sock, data, "queued")


def restore(state: RepairState, *, stay_in_repair: bool = False) -> socket.socket:
    """A socket carrying `state`'s connection, out of repair mode, blocking. Raises
    RepairError (nothing half-restored stays open).

    `stay_in_repair`: stop just before leaving repair mode, non-blocking, so that a
    caller restoring many connections can give up on all of them silently (closing a
    socket in repair mode sends nothing) if one fails; `leave_repair` finishes it."""
    sock = socket.socket(state.family, socket.SOCK_STREAM)
    try:
        _restore_into(sock, state)
        if not stay_in_repair:
            leave_repair(sock, state)
    except OSError as exc:
        sock.close()
        if isinstance(exc, RepairError):
            raise
        raise RepairError(f"restoring {state.local} -> {state.peer}: {exc}") from None
    return sock


def _restore_into(sock: socket.socket, state: RepairState) -> None:
    # TCP_REPAIR also lets the socket bind a port in use (sk_reuse = SK_FORCE_REUSE):
    # an accepted connection's port is its listener's. SO_REUSEADDR must not follow:
    # it would set sk_reuse back to 1, and bind() then fails with EADDRINUSE.
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
    except PermissionError:
        raise RepairError("TCP_REPAIR needs CAP_NET_ADMIN") from None
    # The kernel reports twice what was set (socket(7)); the FORCE variants pass
    # wmem_max/rmem_max, as CAP_NET_ADMIN (which repair needs anyway) allows. Setting
    # them stops autotuning for this socket, the price of carrying full queues over.
    sndbuf = max(state.sndbuf, 2 * len(state.send_queue) + (1 << 16)) // 2
    rcvbuf = max(state.rcvbuf, 2 * len(state.recv_queue) + (1 << 16)) // 2
    sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, sndbuf)
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
    sock.setblocking(False)
    sock.bind(state.local)
    for queue, seq in ((TCP_SEND_QUEUE, state.send_seq), (TCP_RECV_QUEUE, state.recv_seq)):
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, queue)
        sock.setsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ, struct.pack("=I", seq))
    if state.timestamp is not None:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_TIMESTAMP, struct.pack("=I", state.timestamp))
    sock.connect(state.peer)  # in repair mode: ESTABLISHED at once, no SYN
    opts = [(TCPOPT_MSS, state.mss)]
    if state.snd_wscale is not None and state.rcv_wscale is not None:
        opts.append((TCPOPT_WINDOW, state.snd_wscale | state.rcv_wscale << 16))
    if state.sack:
        opts.append((TCPOPT_SACK_PERM, 0))
    if state.timestamp is not None:
        opts.append((TCPOPT_TIMESTAMP, 0))
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_OPTIONS,
                    b"".join(_OPT.pack(*opt) for opt in opts))
    _fill(sock, TCP_RECV_QUEUE, state.recv_queue)
    # Only what was transmitted goes in as "sent": bytes the source never sent (the
    # peer's window was closed, say) would otherwise wait for a retransmission timeout
    # with exponential backoff; they are written normally after repair mode, as CRIU
    # does, and go out as the peer's window allows.
    transmitted = len(state.send_queue) - state.unsent
    _fill(sock, TCP_SEND_QUEUE, state.send_queue[:transmitted])
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, _WINDOW.pack(*state.window))
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)


def leave_repair(sock: socket.socket, state: RepairState) -> None:
    """Finish `restore(state, stay_in_repair=True)`: out of repair mode (with a window
    probe), the never-transmitted bytes queued, blocking."""
    transmitted = len(state.send_queue) - state.unsent
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 0)  # leaves with a window probe
    _write_all(sock, state.send_queue[transmitted:], "unsent")
    sock.setblocking(True)
