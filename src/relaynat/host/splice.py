"""Spliced TCP connections: two sockets joined by the kernel, as pasta's tcp_splice.c does.

When the guest is a network namespace the relay can make sockets in (netns/ns_sockets.py),
a forwarded connection from a client on the host's loopback needs no TCP of the relay's
own: the relay connects a socket of the guest's namespace to the guest's loopback, port
the forward names, and moves the bytes between the two sockets with splice(2) through
one pipe per direction. The bytes go from one socket's receive queue into the pipe and
from the pipe into the other's send queue by page reference (SPLICE_F_MOVE), never
through Python buffers. The `-T` forwards (the guest's loopback ports to the host's)
are the same connection the other way round.

Each direction (socket A -> pipe -> socket B) is driven by one edge-triggered epoll
nested in the event loop, as the TCP relay's host sockets are:

- read from A into the pipe while the pipe has room; a full pipe stops reading (A's
  receive queue fills, its window closes: backpressure reaches the sender);
- write from the pipe to B until B's send queue is full (EAGAIN), then wait for B to be
  writable (EPOLLOUT); every write that frees room in the pipe reads A again, since an
  edge-triggered epoll reports A's data only when more arrives;
- A's end of file (its FIN) crosses over as shutdown(B, SHUT_WR) once the pipe is empty,
  so nothing A sent before its FIN is lost; the other direction goes on (half-close);
- an error on either socket (a RST: ECONNRESET, EPIPE, or SO_ERROR on EPOLLERR) resets
  the other (SO_LINGER {1, 0} and close), whatever is left in the pipes with it;
- both directions done: both sockets closed.

A connection is served at most `_ROUNDS` read-and-write rounds per wakeup; one with
more to move goes again after the loop's other callbacks (fairness across connections,
forwards and the guest's own traffic).

The relay's part after start is splice(2), pipe2(2), fcntl(F_SETPIPE_SZ), connect(2),
accept4(2), shutdown(2), setsockopt(SO_LINGER), getsockopt(SO_ERROR), epoll_ctl and
close: no privilege.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import select
import socket
import struct
from collections.abc import MutableMapping
from typing import Protocol

from relaynat.events import Endpoint
from relaynat.flow_info import FlowInfo
from relaynat.guest_log import guest_logger

log = guest_logger("relaynat.splice")

#: Each pipe's size: larger moves more per splice(2) and wakeup; 64 KiB is the kernel's
#: default, and an unprivileged user's pipes together get at most pipe-user-pages-soft
#: (64 MiB) beyond which F_SETPIPE_SZ is refused and the default stays.
PIPE_SIZE = 1 << 20
#: What a relay's pipes may hold together before new ones keep the default size: a
#: pipe is grown to PIPE_SIZE only within this, so many connections whose reader stalls
#: pin little more than the kernel's default pipes would (pipes are kernel memory, not
#: the relay's, and root's are not limited per user).
PIPE_BUDGET = 64 << 20
#: Read-and-write rounds per connection per wakeup before others get their turn.
_ROUNDS = 16
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_EPOLL_FLAGS = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
_LINGER_RESET = struct.pack("ii", 1, 0)
#: Datagrams read per socket per wakeup (-U), and the largest one (IPv6's UDP payload).
_DATAGRAMS_PER_WAKEUP = 64
_DATAGRAM_MAX = 65527


class SocketSource(Protocol):
    """Fresh non-blocking TCP sockets of the guest's namespace (NamespaceSockets)."""

    def take(self, family: int) -> socket.socket | None: ...


def reset(sock: socket.socket) -> None:
    """Close `sock` with a RST to its peer (SO_LINGER {1, 0}, socket(7))."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


class _Direction:
    """One way of a spliced connection: `src` -> pipe -> `dst`."""

    __slots__ = ("dst", "eof", "in_pipe", "moved", "pipe_r", "pipe_w", "shut", "size", "src")

    def __init__(self, src: socket.socket, dst: socket.socket, grow: bool) -> None:
        self.src = src
        self.dst = dst
        self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.size = fcntl.fcntl(self.pipe_w, fcntl.F_GETPIPE_SZ)
        if grow:
            # EPERM beyond pipe-user-pages-soft: the default size stays.
            with contextlib.suppress(OSError):
                self.size = fcntl.fcntl(self.pipe_w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        self.in_pipe = 0
        self.eof = False
        self.shut = False
        self.moved = 0

    def done(self) -> bool:
        return self.shut

    def close(self) -> None:
        for fd in (self.pipe_r, self.pipe_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.pipe_r = self.pipe_w = -1


class _PeerGone(Exception):
    """One of the sockets failed: `sock` is the one whose peer went away."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock


class SplicedConnection:
    """Two connected sockets, `outer` (the client's, or the host peer's for -T) and
    `inner`, spliced both ways; `inbound` says who opened it (a forward's client:
    True; the guest, through -T: False)."""

    __slots__ = ("__weakref__", "backward", "client", "closed", "connecting", "forward",
                 "guest_port", "inbound", "inner", "outer")

    def __init__(self, outer: socket.socket, inner: socket.socket, inbound: bool,
                 guest_port: int, client: Endpoint | None) -> None:
        self.outer = outer
        self.inner = inner
        self.inbound = inbound
        self.guest_port = guest_port
        self.client = client
        self.connecting = True
        #: outer -> inner, inner -> outer; made once the connect succeeded.
        self.forward: _Direction | None = None
        self.backward: _Direction | None = None
        self.closed = False


class Splicer:
    """The spliced connections of one relay, on one edge-triggered epoll nested in the
    loop. `stats` is the relay's counter (the counters are docs/stats.md's
    `splice_*`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stats: MutableMapping[str, int],
                 source: SocketSource, max_connections: int) -> None:
        self._loop = loop
        self._stats = stats
        self._source = source
        self._max = max_connections
        self._epoll = select.epoll()
        self._by_fd: dict[int, SplicedConnection] = {}
        self.connections: set[SplicedConnection] = set()
        self._again: list[SplicedConnection] = []
        self._again_armed = False
        self._listeners: dict[int, tuple[socket.socket, int, int]] = {}
        #: What the open connections' pipes may hold, together (PIPE_BUDGET).
        self._grown = 0
        loop.add_reader(self._epoll.fileno(), self._on_events)

    # -- opening ---------------------------------------------------------------------------

    def open_inbound(self, client_sock: socket.socket, v6: bool, guest_port: int) -> bool:
        """Splice a forward's accepted client to the guest's loopback port `guest_port`
        (::1 for an IPv6 client, 127.0.0.1 for an IPv4 one). False when the guest side
        could not be had (no socket from the factory): the caller takes the client, to
        serve it another way. True: the client is this splicer's, refused or not."""
        inner = self._source.take(6 if v6 else 4)
        if inner is None:
            self._stats["splice_fallback"] += 1
            return False
        client = _endpoint(client_sock, peer=True)
        self._connect(client_sock, inner, ("::1" if v6 else "127.0.0.1", guest_port), True,
                      guest_port, client)
        return True

    def add_reverse(self, listener: socket.socket, v6: bool, host_port: int) -> None:
        """Serve `listener` (bound and listening on the guest's loopback, -T): each
        connection the guest makes to it is spliced to the host's loopback `host_port`,
        in the family of the listener."""
        listener.setblocking(False)
        self._listeners[listener.fileno()] = (listener, 6 if v6 else 4, host_port)
        self._loop.add_reader(listener.fileno(), self._on_accept, listener.fileno())

    def _on_accept(self, fd: int) -> None:
        entry = self._listeners.get(fd)
        if entry is None:
            return
        listener, family, host_port = entry
        for _ in range(64):
            try:
                conn, _peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE: the guest's client waits in the backlog
                log.warning("accept on the guest's loopback: %s", exc)
                return
            conn.setblocking(False)
            try:
                host = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET,
                                     socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            except OSError:
                self._stats["splice_refused"] += 1
                reset(conn)
                continue
            port = conn.getsockname()[1]
            self._connect(host, conn, ("::1" if family == 6 else "127.0.0.1", host_port),
                          False, port, _endpoint(conn, peer=True))

    def _connect(self, outer: socket.socket, inner: socket.socket, to: tuple[str, int],
                 inbound: bool, guest_port: int, client: Endpoint | None) -> None:
        """Connect the socket of the side not connected yet (`inner` for inbound, the
        host's `outer` for -T) to `to`, then splice once it is."""
        if len(self.connections) >= self._max:
            self._stats["splice_refused_limit"] += 1
            reset(outer)
            reset(inner)
            return
        conn = SplicedConnection(outer, inner, inbound, guest_port, client)
        dialing = inner if inbound else outer
        waiting = outer if inbound else inner
        waiting.setblocking(False)
        err = dialing.connect_ex(to)
        if err not in (0, errno.EINPROGRESS):
            self._refused(conn, err)
            return
        self.connections.add(conn)
        self._by_fd[dialing.fileno()] = conn
        self._by_fd[waiting.fileno()] = conn
        self._epoll.register(dialing.fileno(), _EPOLL_FLAGS)
        self._epoll.register(waiting.fileno(), _EPOLL_FLAGS)
        if err == 0:
            self._established(conn)

    def _refused(self, conn: SplicedConnection, err: int) -> None:
        """The side being dialled is not there: the side waiting gets a RST at once."""
        self._stats["splice_refused"] += 1
        log.debug("spliced connect to port %d: %s", conn.guest_port, os.strerror(err))
        self._forget(conn)
        reset(conn.outer)
        reset(conn.inner)

    def _established(self, conn: SplicedConnection) -> None:
        try:
            grow = self._grown + 2 * PIPE_SIZE <= PIPE_BUDGET
            conn.forward = _Direction(conn.outer, conn.inner, grow)
            self._grown += conn.forward.size
            conn.backward = _Direction(conn.inner, conn.outer, grow)
            self._grown += conn.backward.size
        except OSError as exc:  # EMFILE/ENFILE: no pipes
            log.warning("spliced connection: no pipe: %s", exc)
            self._stats["splice_refused"] += 1
            self._abort(conn, None)
            return
        conn.connecting = False
        self._stats["splice_opened" if conn.inbound else "splice_reverse_opened"] += 1
        self._pump(conn)

    # -- moving ----------------------------------------------------------------------------

    def _on_events(self) -> None:
        try:
            events = self._epoll.poll(0, 256)
        except InterruptedError:
            return
        for fd, mask in events:
            conn = self._by_fd.get(fd)
            if conn is None or conn.closed:
                continue
            if conn.connecting:
                dialing = conn.inner if conn.inbound else conn.outer
                if fd != dialing.fileno():
                    if mask & (select.EPOLLERR | select.EPOLLHUP):
                        self._abort(conn, conn.outer if conn.inbound else conn.inner)
                    continue
                err = dialing.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self._refused(conn, err)
                elif mask & select.EPOLLOUT:
                    self._established(conn)
                continue
            if mask & select.EPOLLERR:
                sock = conn.outer if fd == conn.outer.fileno() else conn.inner
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    self._abort(conn, sock)
                    continue
            self._pump(conn)

    def _pump(self, conn: SplicedConnection) -> None:
        assert conn.forward is not None and conn.backward is not None
        try:
            more = _move(conn.forward, _ROUNDS) | _move(conn.backward, _ROUNDS)
        except _PeerGone as gone:
            self._abort(conn, gone.sock)
            return
        if conn.forward.done() and conn.backward.done():
            self._finish(conn)
        elif more:
            self._again.append(conn)
            if not self._again_armed:
                self._again_armed = True
                self._loop.call_soon(self._run_again)

    def _run_again(self) -> None:
        self._again_armed = False
        again, self._again = self._again, []
        for conn in again:
            if not conn.closed:
                self._pump(conn)

    # -- ending ----------------------------------------------------------------------------

    def _forget(self, conn: SplicedConnection) -> None:
        conn.closed = True
        self.connections.discard(conn)
        for sock in (conn.outer, conn.inner):
            fd = sock.fileno()
            if fd >= 0 and self._by_fd.get(fd) is conn:
                del self._by_fd[fd]
                with contextlib.suppress(OSError):
                    self._epoll.unregister(fd)
        for direction in (conn.forward, conn.backward):
            if direction is not None:
                self._add_bytes(conn, direction)
                self._grown -= direction.size
                direction.close()

    def _add_bytes(self, conn: SplicedConnection, direction: _Direction) -> None:
        # `forward` runs outer -> inner, and inner is always the guest's socket.
        toward_guest = direction is conn.forward
        key = "splice_bytes_to_guest" if toward_guest else "splice_bytes_from_guest"
        self._stats[key] += direction.moved

    def _finish(self, conn: SplicedConnection) -> None:
        self._forget(conn)
        conn.outer.close()
        conn.inner.close()
        self._stats["splice_closed"] += 1

    def _abort(self, conn: SplicedConnection, gone: socket.socket | None) -> None:
        """`gone` failed (its peer reset it): reset the other side's peer too."""
        self._forget(conn)
        self._stats["splice_resets"] += 1
        for sock in (conn.outer, conn.inner):
            if sock is gone:
                sock.close()
            else:
                reset(sock)

    def describe_flows(self) -> list[FlowInfo]:
        """The open spliced connections as FlowInfo: state "spliced" (or "connecting"),
        the guest's end on its loopback; no window or RTT of the relay's own."""
        out = []
        for conn in list(self.connections):
            lo = "::1" if conn.inner.family == socket.AF_INET6 else "127.0.0.1"
            to_guest = conn.forward.moved if conn.forward is not None else 0
            from_guest = conn.backward.moved if conn.backward is not None else 0
            service = Endpoint(lo, conn.guest_port)
            if conn.inbound:
                guest_end, far = service, _endpoint(conn.inner, peer=False)
                host_peer = conn.client
            else:
                guest_end, far = conn.client or Endpoint(lo), service
                host_peer = _endpoint(conn.outer, peer=True)
            out.append(FlowInfo(
                protocol="tcp", direction="inbound" if conn.inbound else "outbound",
                guest_end=guest_end, far=far or Endpoint(lo), host_peer=host_peer,
                state="connecting" if conn.connecting else "spliced",
                bytes_from_guest=from_guest, bytes_to_guest=to_guest, guest_window=None,
                rtt_us=None))
        return out

    def close(self) -> None:
        """Reset every spliced connection and stop serving the -T listeners."""
        for conn in list(self.connections):
            self._forget(conn)
            reset(conn.outer)
            reset(conn.inner)
        for fd, (listener, _family, _port) in list(self._listeners.items()):
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(fd)
            listener.close()
        self._listeners.clear()
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self._epoll.fileno())
        self._epoll.close()


def _endpoint(sock: socket.socket, peer: bool) -> Endpoint | None:
    try:
        addr = sock.getpeername() if peer else sock.getsockname()
    except OSError:
        return None
    host = str(addr[0])
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return Endpoint(host, int(addr[1]))


def _move(d: _Direction, rounds: int) -> bool:
    """Move what `d.src` has through the pipe into `d.dst`, at most `rounds` times; True
    if there may be more to move now (the rounds ran out while moving). Raises
    _PeerGone naming the socket that failed."""
    for _ in range(rounds):
        progressed = False
        if not d.eof and d.in_pipe < d.size:
            try:
                n = os.splice(d.src.fileno(), d.pipe_w, d.size - d.in_pipe, flags=_SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                pass  # src empty, or the pipe out of slots: its next data wakes us
            except OSError:  # ECONNRESET, ETIMEDOUT...: src's peer is gone
                raise _PeerGone(d.src) from None
            else:
                if n == 0:
                    d.eof = True
                else:
                    d.in_pipe += n
                    progressed = True
        if d.in_pipe:
            try:
                n = os.splice(d.pipe_r, d.dst.fileno(), d.in_pipe, flags=_SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                return False  # dst full: its EPOLLOUT wakes us
            except OSError:  # EPIPE, ECONNRESET: dst's peer is gone
                raise _PeerGone(d.dst) from None
            d.in_pipe -= n
            d.moved += n
            progressed = progressed or n > 0
        if d.eof and not d.in_pipe and not d.shut:
            d.shut = True
            # ENOTCONN: dst's peer reset it; its error event follows.
            with contextlib.suppress(OSError):
                d.dst.shutdown(socket.SHUT_WR)
        if not progressed:
            return False
    return True


class LoopbackDatagrams:
    """pasta's -U: datagrams the guest sends to `bound` (a socket bound to a port of its
    loopback, in its namespace) go to the host's loopback `host_port` from one connected
    host socket per guest sender, and what comes back on that socket goes back to the
    sender from `bound`, so replies come from the port it sent to. Datagrams are copied
    (there is no splice(2) for them), at most `_DATAGRAMS_PER_WAKEUP` per socket per
    wakeup; at most `max_flows` senders at once, each ended after `idle_s` without a
    datagram either way."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stats: MutableMapping[str, int],
                 bound: socket.socket, v6: bool, host_port: int, max_flows: int = 1024,
                 idle_s: float = 180.0) -> None:
        self._loop = loop
        self._stats = stats
        self._bound = bound
        self._family = socket.AF_INET6 if v6 else socket.AF_INET
        self._to = ("::1" if v6 else "127.0.0.1", host_port)
        self._max = max_flows
        self._idle_s = idle_s
        #: Guest sender -> [host socket, last activity].
        self._flows: dict[tuple[object, ...], list[object]] = {}
        bound.setblocking(False)
        loop.add_reader(bound.fileno(), self._from_guest)
        self._sweeper = loop.call_later(idle_s / 4, self._sweep)

    def _from_guest(self) -> None:
        for _ in range(_DATAGRAMS_PER_WAKEUP):
            try:
                data, sender = self._bound.recvfrom(_DATAGRAM_MAX)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # an ICMP error for an earlier reply (udp(7))
                continue
            flow = self._flows.get(sender)
            if flow is None:
                flow = self._open(sender)
                if flow is None:
                    continue
            host = flow[0]
            assert isinstance(host, socket.socket)
            flow[1] = self._loop.time()
            try:
                host.send(data)
            except OSError:  # ECONNREFUSED: nothing on the host's port (yet); EAGAIN
                self._stats["loopback_udp_dropped"] += 1
                continue
            self._stats["loopback_udp_from_guest"] += 1

    def _open(self, sender: tuple[object, ...]) -> list[object] | None:
        if len(self._flows) >= self._max:
            self._stats["loopback_udp_dropped"] += 1
            return None
        try:
            host = socket.socket(self._family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
            host.connect(self._to)
        except OSError:
            self._stats["loopback_udp_dropped"] += 1
            return None
        flow: list[object] = [host, self._loop.time()]
        self._flows[sender] = flow
        self._stats["loopback_udp_flows"] += 1
        self._loop.add_reader(host.fileno(), self._from_host, sender)
        return flow

    def _from_host(self, sender: tuple[object, ...]) -> None:
        flow = self._flows.get(sender)
        if flow is None:
            return
        host = flow[0]
        assert isinstance(host, socket.socket)
        for _ in range(_DATAGRAMS_PER_WAKEUP):
            try:
                data = host.recv(_DATAGRAM_MAX)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ECONNREFUSED of an earlier datagram
                continue
            flow[1] = self._loop.time()
            try:
                self._bound.sendto(data, sender)
            except OSError:
                self._stats["loopback_udp_dropped"] += 1
                continue
            self._stats["loopback_udp_to_guest"] += 1

    def _sweep(self) -> None:
        cutoff = self._loop.time() - self._idle_s
        for sender, flow in list(self._flows.items()):
            last = flow[1]
            assert isinstance(last, float)
            if last < cutoff:
                self._end(sender)
        self._sweeper = self._loop.call_later(self._idle_s / 4, self._sweep)

    def _end(self, sender: tuple[object, ...]) -> None:
        flow = self._flows.pop(sender)
        host = flow[0]
        assert isinstance(host, socket.socket)
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(host.fileno())
        host.close()

    def close(self) -> None:
        self._sweeper.cancel()
        for sender in list(self._flows):
            self._end(sender)
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self._bound.fileno())
        self._bound.close()
