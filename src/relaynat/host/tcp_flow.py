"""`TcpFlow`, the TCP shell's record of one flow (host/tcp_relay.py), and the calls on a flow's
host socket that need nothing but the socket.

What the per-flow half of the shell (host/flow_executor.py, host/pump.py) asks of a flow is
two protocols: `HostSocket`, the calls on its host socket, and `HostFlow`, those and the
shell's bookkeeping of the flow. `TcpFlow` implements them on a kernel socket;
tests/support/tcp_sim.py on a simulated one, so that the simulator runs the executor the
relay runs.

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
from typing import TYPE_CHECKING, Protocol

from relaynat.host.sockets import SO_RCVBUFFORCE
from relaynat.window import TCP_INFO_LEN, SocketFacts, TcpInfo

if TYPE_CHECKING:
    from relaynat.egress_gate import EgressGate, Verdict
    from relaynat.first_flight import FirstFlight
    from relaynat.nat_entry import TcpNatEntry

#: asm-generic/socket.h; Python's socket module does not name it.
SO_PEEK_OFF = 42
SIOCOUTQ = 0x5411
_LINGER_RESET = struct.pack("ii", 1, 0)
_CONNECT_ENDED = select.POLLOUT | select.POLLERR | select.POLLHUP
_INT = struct.Struct("i")
_MSG_PEEK = socket.MSG_PEEK
#: tcpi_state of an established connection (include/net/tcp_states.h).
_TCP_ESTABLISHED = 1
#: Flow key: (guest port, destination address as the guest sees it, destination port,
#: guest address); an IPv6 guest may use several source addresses at once.
FlowKey = tuple[int, bytes, int, bytes]


class HostSocket(Protocol):
    """A flow's host socket, as the shell uses it: the host socket's receive queue is the
    flow's send buffer toward the guest (nat_entry.py), read by peeking at the send
    position (SO_PEEK_OFF) and dropped from once the guest acknowledged. A call the
    kernel would fail raises OSError; BlockingIOError where it would say EAGAIN."""

    def peek(self, view: memoryview, nbytes: int, send_pos: int) -> memoryview:
        """Up to `nbytes` new bytes at the send position, `send_pos` bytes after the
        queue's head, peeked into `view` (or a buffer of its own); the send position
        moves past them. Empty: the peer closed and every byte was peeked.
        BlockingIOError: nothing new yet."""
        ...

    def peek_at(self, offset: int, length: int, view: memoryview, send_pos: int
                ) -> memoryview:
        """Up to `length` bytes at `offset` from the queue's head, peeked into `view`,
        the send position (`send_pos`) left where it is."""
        ...

    def write(self, data: memoryview | list[bytes] | list[memoryview]) -> int:
        """Send `data` (one buffer, or several at once) to the peer; the bytes taken."""
        ...

    def discard(self, nbytes: int, scratch: bytearray) -> None:
        """Drop `nbytes` from the queue's head (the send position moves back with it);
        `scratch` is for a kernel that copies. Stops early if the socket fails."""
        ...

    def rewind(self) -> None:
        """The send position back to the queue's head."""
        ...

    def shutdown_write(self) -> None:
        """shutdown(SHUT_WR): our FIN to the peer."""
        ...

    def close_socket(self, abortive: bool) -> None:
        """Close the socket; `abortive`: with a RST to the peer instead of a FIN."""
        ...

    def facts(self) -> SocketFacts | None:
        """What the window toward the guest is computed from; None if the socket cannot
        say."""
        ...

    def rcvbuf(self) -> int:
        """SO_RCVBUF, as the kernel reports it (twice what was set, socket(7))."""
        ...

    def set_rcvbuf(self, size: int, force: bool) -> None:
        """Ask for a receive buffer SO_RCVBUF reports as `size`; `force`: beyond
        net.core.rmem_max (SO_RCVBUFFORCE, PermissionError without CAP_NET_ADMIN)."""
        ...


class HostFlow(HostSocket, Protocol):
    """One flow as the per-flow shell (host/flow_executor.py, host/pump.py) keeps it: its
    entry, its host socket, and the shell's bookkeeping (see `TcpFlow`)."""

    entry: TcpNatEntry
    connecting: bool
    host_readable: bool
    consume_pending: int
    gathered: list[memoryview] | None
    rcvbuf_watch: int
    rcvbuf_granted: int
    host_addr: tuple[str, int]


@dataclass(slots=True, eq=False)
class FirstFlightHold:
    """A flow whose name is checked on the wire (first_flight.py), from the relay's
    SYN-ACK until its first flight is in the host socket: the policy's verdict and the
    gate that gave it, the bytes held, and once decided (`decided`) the name read and
    what of the held bytes the host socket has not taken yet (`unsent`)."""

    gate: EgressGate
    verdict: Verdict
    flight: FirstFlight
    deadline: float
    decided: bool = False
    wire_name: str | None = None
    unsent: memoryview | None = None
    #: Its `FlowOpened` was emitted (the name passed, the connect began).
    announced: bool = False

    def held_bytes(self) -> int:
        """Bytes of guest data this flow holds now."""
        return len(self.flight.held) + (0 if self.unsent is None else len(self.unsent))


@dataclass(slots=True, eq=False)
class TcpFlow:
    """A flow of a `TcpRelay`: its entry and its kernel socket (`HostFlow`)."""

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
    #: When the flow entered the table (loop time), for its duration when it closes.
    opened_at: float = 0.0
    #: How the flow ended, in events.py's words (`FlowClosed.how`), when the shell knows
    #: it before the close (a policy cut, a detach); else worked out at the close.
    end_how: str | None = None
    #: Set while the flow's first flight is held before (and while) its host connect:
    #: a domain rule's flow whose name is checked on the wire.
    first: FirstFlightHold | None = None

    # -- HostSocket, on the kernel socket ------------------------------------------------

    def peek(self, view: memoryview, nbytes: int, send_pos: int) -> memoryview:
        sock = self.sock
        if self.peek_offset_supported:
            return view[:sock.recv_into(view, nbytes, _MSG_PEEK)]
        # No peek offset: peek from the queue's head and skip what the guest already
        # has. Only an empty peek is EOF; one that holds nothing beyond the bytes in
        # flight just means no new data yet.
        raw = sock.recv(send_pos + nbytes, _MSG_PEEK)
        if raw and len(raw) <= send_pos:
            raise BlockingIOError
        return memoryview(raw)[send_pos:]

    def peek_at(self, offset: int, length: int, view: memoryview, send_pos: int
                ) -> memoryview:
        # SO_PEEK_OFF is set to the offset and then back to `send_pos` (it counts from
        # the head too). Without SO_PEEK_OFF, a peek from the head, sliced.
        sock = self.sock
        length = min(length, len(view))
        if not self.peek_offset_supported:
            return memoryview(sock.recv(offset + length, _MSG_PEEK))[offset:]
        sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, offset)
        try:
            got = sock.recv_into(view, length, _MSG_PEEK)
        finally:
            sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, send_pos)
        return view[:got]

    def write(self, data: memoryview | list[bytes] | list[memoryview]) -> int:
        return self.sock.send(data) if type(data) is memoryview else self.sock.sendmsg(data)

    def discard(self, nbytes: int, scratch: bytearray) -> None:
        # recv(MSG_TRUNC) copies nothing; `scratch` only bounds each call.
        sock = self.sock
        while nbytes > 0:
            try:
                got = sock.recv_into(scratch, min(nbytes, len(scratch)), socket.MSG_TRUNC)
            except OSError:
                return
            if got <= 0:
                return
            nbytes -= got

    def rewind(self) -> None:
        if self.peek_offset_supported:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)

    def shutdown_write(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def close_socket(self, abortive: bool) -> None:
        if abortive:
            close_with_reset(self.sock)
        else:
            self.sock.close()

    def facts(self) -> SocketFacts | None:
        # What window.advertised_window needs; None if the socket failed.
        sock = self.sock
        try:
            info = tcp_info(sock)
            sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            outq = ioctl_int(sock, SIOCOUTQ)
        except OSError:
            return None
        return SocketFacts(info, sndbuf, outq)

    def facts_if_connected(self) -> SocketFacts | None:
        """The facts, if the socket's connect() already ended with the handshake done
        (struct tcp_info's first byte, tcpi_state, is TCP_ESTABLISHED); else None. A
        loopback connect() finishes the handshake before it returns, so one TCP_INFO read
        answers both questions where poll() and SO_ERROR would be two more syscalls."""
        sock = self.sock
        try:
            blob = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)
            if not blob or blob[0] != _TCP_ESTABLISHED:
                return None
            sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        except OSError:
            return None
        # Nothing was written yet: SIOCOUTQ is 0.
        return SocketFacts(TcpInfo.from_bytes(blob), sndbuf, 0)

    def rcvbuf(self) -> int:
        size: int = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        return size

    def set_rcvbuf(self, size: int, force: bool) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE if force else socket.SO_RCVBUF,
                             size // 2)



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
