"""unixgram transport: one Ethernet frame per AF_UNIX SOCK_DGRAM datagram.

Wire format, shared by qemu's `-netdev dgram` (net/dgram.c), vfkit's
`virtio-net,unixSocketPath=` (Apple's VZFileHandleNetworkDeviceAttachment), krunkit
and libkrun's `krun_add_net_unixgram`, and gvproxy's `--listen-vfkit unixgram://`:
each datagram is exactly one Ethernet frame, no length prefix, no virtio-net header
(so no offload: frames toward the guest are at most one MTU with full checksums).
vfkit and libkrun/krunkit (with NET_FLAG_VFKIT) first send the 4 bytes `VFKT` as one
datagram, so the server learns their address before any frame; a datagram that is
exactly `VFKT` is that handshake, never a frame (14 bytes is the shortest frame).

Two ways to get the socket:

* server (`serve_unixgram`): bind a path; the guest's address is learned from the
  first datagram (recvfrom) and frames go back with sendto. qemu binds its own
  `local.path` and sends from it without a handshake; vfkit binds a temporary path
  and connects to ours. One guest per transport: a datagram from any other address
  is dropped and counted (or refused by the kernel, see below), unless the served
  peer's socket is gone (a connect() probe is refused), in which case the newcomer
  replaces it: the old guest's flows are reset and a fresh transport serves the new
  one, starting with that datagram. Senders without an address (unbound sockets)
  cannot be answered and are dropped.
* inherited fd (`attach_unixgram_fd`, `relaynat serve --fd N`): a SOCK_DGRAM socket
  already connected by a launcher (e.g. one end of a socketpair); send/recv.

Framing cannot desynchronise on datagrams, so a datagram under 14 bytes (no Ethernet
header) or over 65535 bytes is dropped and counted and the guest stays served.

Backpressure toward the guest. Linux lets at most net.unix.max_dgram_qlen (10)
datagrams wait in a receiver that is not connected back to the sender; beyond that a
non-blocking send fails with EAGAIN, and poll() reports the queue draining only to a
sender *connected* to that receiver (unix_dgram_poll). qemu's dgram socket is such a
receiver, so the server connects to a peer whose socket is unconnected (probe: OPEN);
EAGAIN then parks frames in a bounded queue until the socket is writable. Dropping
them instead, as a NIC drops on a full ring, lost two thirds of the frames of a qemu
guest's download at MTU 1500 (32 MiB in 105 s; queued: no drops, 3.8 s). While
connected, the kernel refuses other senders itself (EPERM, not counted here); a timer
probes the peer every second and disconnects once it is gone, so the next guest can be
learned; the gone guest's flows end then (the relay's transport_lost, counted as
peers_gone), not at their timeouts: its UDP flows would otherwise hold their host
sockets, and answers to it, for 30 s or more. vfkit's end is connected to ours (probe:
CONNECTED): the queue limit does not apply, EAGAIN means our send buffer is full and
poll() reports it freeing. ENOBUFS, a full queue, and EAGAIN toward a peer of unknown
kind drop the frame and count it; TCP retransmits it.

Linux does not tell a datagram socket that its peer closed: in fd mode that shows as
ECONNREFUSED on the next send, which ends the transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import socket
import stat
import struct
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from relaynat.config import RelayConfig
from relaynat.guest_log import guest_logger
from relaynat.transports.base import (
    WAKEUP_SLICE_S,
    FrameSink,
    FrameTransport,
    TransportBase,
    slice_clock,
)

log = guest_logger("relaynat.unixgram")

MIN_FRAME = 14
MAX_FRAME = 65535
VFKIT_MAGIC = b"VFKT"
_DATAGRAMS_PER_WAKEUP = 128
#: Receive slots (each a frame and the byte that tells an oversized one) a batch
#: fills before it ends early, as transports/tap.py.
_SLOT = MAX_FRAME + 1
_BATCH_SLOTS = 16
#: Asked for; Linux caps it at net.core.wmem_max * 2 (212992 * 2 by default).
_SNDBUF = 4 << 20
_RCVBUF = 4 << 20
#: At most one liveness probe of the served peer per this many seconds.
_PROBE_INTERVAL_S = 1.0
_DROP_ERRNOS = (errno.EAGAIN, errno.ENOBUFS)
_PEER_GONE_ERRNOS = (errno.ECONNREFUSED, errno.ECONNRESET, errno.ENOENT, errno.ENOTCONN)

Address = str | bytes


class RelayLike(Protocol):
    """What the server needs of `relaynat.relay.Relay`: attach(), transport_lost() and
    the config."""

    config: RelayConfig

    def attach(self, transport: FrameTransport) -> None: ...

    def transport_lost(self, transport: FrameTransport, reason: str) -> None: ...


def _tune(sock: socket.socket) -> None:
    for opt, size in ((socket.SO_SNDBUF, _SNDBUF), (socket.SO_RCVBUF, _RCVBUF)):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, size)


GONE, CONNECTED, OPEN = "gone", "connected", "open"


def probe_peer(addr: Address) -> str:
    """What is bound at `addr`, found by connect()ing a probe to it (nothing is sent).

    GONE: ENOENT (no file) or ECONNREFUSED (a leftover socket file, nobody bound).
    CONNECTED: EPERM, bound but connected to some socket (vfkit's end is connected to
    ours, and unix_may_send() refuses everyone else). OPEN: bound, not connected
    (qemu's -netdev dgram socket, which sends with sendto).
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        probe.connect(addr)
    except (ConnectionRefusedError, FileNotFoundError):
        return GONE
    except OSError:
        return CONNECTED
    finally:
        probe.close()
    return OPEN


def peer_alive(addr: Address) -> bool:
    return probe_peer(addr) != GONE


def _disconnect(sock: socket.socket) -> None:
    """Dissolve a datagram socket's association: connect() to AF_UNSPEC (unix(7)).
    Python's connect() takes no AF_UNSPEC address for AF_UNIX, hence libc."""
    sa = struct.pack("H", socket.AF_UNSPEC) + bytes(14)
    if _libc.connect(sock.fileno(), sa, len(sa)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class UnixgramState:
    """What a transport continuing on the same socket in another process needs
    (`UnixgramTransport.handover_state`): the socket itself keeps the rest (its bound
    path, its connection to a qemu-style peer, the datagrams queued in it)."""

    peer: Address | None
    #: The socket is connected to `peer` (a qemu-style peer; see the module docstring).
    sock_peer: bool
    #: EAGAIN means "wait for writability" for this peer.
    can_wait: bool
    peer_dead: bool
    #: Frames queued toward the guest, not yet taken by the socket.
    pending_out: list[bytes] = field(default_factory=list)


class UnixgramTransport(TransportBase):
    """One guest on a unix datagram socket.

    connected=True: the socket has a fixed peer (inherited fd); send/recv.
    connected=False: server mode; the peer is learned from the first datagram with an
    address and answered with sendto. `on_new_peer(data, addr)`, if given, is called
    when a datagram comes from another address while the served peer is gone; the
    caller replaces this transport (`UnixgramServer` does). `on_peer_gone(reason)`, if
    given, is called (from the loop, never inside `send`) once the served peer is found
    gone by the liveness probe or a refused send, so that its flows end then rather than
    at their timeouts. Frames that meet a full
    socket wait in a queue of up to `queue_limit` bytes (module docstring). `first`,
    a (datagram, address) pair, is served before anything is read (the datagram that
    made a previous transport give way); `state`, what another process's transport
    on this socket had learned (a handover). `serve_unixgram` and `attach_unixgram_fd`
    build it for you.
    """

    vnet_hdr_len = 0
    offload = False
    keeps_frames = True

    def __init__(self, sock: socket.socket, *, connected: bool,
                 loop: asyncio.AbstractEventLoop | None = None,
                 first: tuple[bytes, Address] | None = None,
                 on_new_peer: Callable[[bytes, Address], None] | None = None,
                 queue_limit: int = 8 << 20, state: UnixgramState | None = None,
                 on_peer_gone: Callable[[str], None] | None = None) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.connected = connected
        self.peer: Address | None = None
        self.counters: Counter[str] = Counter()
        self.closed = False
        self._loop = loop or asyncio.get_running_loop()
        # A batch's datagrams each in their own slot (`keeps_frames`), one byte more
        # than the largest frame: a datagram filling it is oversized.
        self._buf = bytearray(_BATCH_SLOTS * _SLOT)
        self._view = memoryview(self._buf)
        self._sink: FrameSink | None = None
        self._first = first
        self._on_new_peer = on_new_peer
        self._on_peer_gone = on_peer_gone
        self._last_probe = -_PROBE_INTERVAL_S
        self._peer_dead = False
        #: Server mode: our socket is connected to the learned peer (send(), not sendto).
        self._sock_peer = False
        #: EAGAIN means "wait for writability" (fd mode, or a peer that poll() reports).
        self._can_wait = connected
        self._timer: asyncio.TimerHandle | None = None
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._queue_limit = queue_limit
        self._writer_on = False
        _tune(sock)
        if state is not None:
            self.peer, self._sock_peer = state.peer, state.sock_peer
            self._can_wait, self._peer_dead = state.can_wait, state.peer_dead
            self._queue.extend(state.pending_out)
            self._queued = sum(map(len, state.pending_out))

    def start(self, sink: FrameSink) -> None:
        self._sink = sink
        first, self._first = self._first, None
        if first is not None:  # the datagram that made the previous transport give way
            data, addr = first
            self._buf[:len(data)] = data
            self._datagram(sink, 0, len(data), addr)
            if self.closed:
                return
            sink.end_of_batch()
        self._loop.add_reader(self.sock.fileno(), self._on_readable)
        if self._queue and not self._writer_on:  # resumed after a stop, or handed over
            self._writer_on = True
            self._loop.add_writer(self.sock.fileno(), self._on_writable)
        if self._sock_peer and self._timer is None:
            self._timer = self._loop.call_later(_PROBE_INTERVAL_S, self._check_peer)

    def stop(self) -> None:
        """`HandoverTransport`: stop reading and sending, the socket open. Each read
        takes one whole datagram, so this is a frame boundary: what the guest sends
        meanwhile waits in the socket, and the frames queued toward it stay queued
        (`handover_state` hands them on; `start` resumes)."""
        if self.closed:
            return
        with contextlib.suppress(ValueError, OSError):
            if self._sink is not None:
                self._loop.remove_reader(self.sock.fileno())
            if self._writer_on:
                self._loop.remove_writer(self.sock.fileno())
        self._writer_on = False
        self._sink = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def handover_state(self) -> UnixgramState:
        """What a transport on this socket in another process continues from; call
        once stopped."""
        return UnixgramState(self.peer, self._sock_peer, self._can_wait, self._peer_dead,
                             list(self._queue))

    # -- guest -> relay --------------------------------------------------------------

    def _on_readable(self) -> None:
        sink = self._sink
        assert sink is not None
        sock, view = self.sock, self._view
        last, at = len(view) - _SLOT, 0
        deadline = slice_clock() + WAKEUP_SLICE_S
        for _ in range(_DATAGRAMS_PER_WAKEUP):
            if at > last:
                sink.end_of_batch()  # the frames read so far are done with
                if self.closed:
                    return
                at = 0
            slot = view[at:at + _SLOT]
            try:
                if self.connected:
                    n, addr = sock.recv_into(slot), None
                else:
                    n, addr = sock.recvfrom_into(slot)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError as exc:
                if self.connected and exc.errno in _PEER_GONE_ERRNOS:
                    self._lost(f"peer gone: {exc}")
                    return
                # Server mode: an error queued by a failed send (ECONNREFUSED from a
                # peer that went away) is reported once and cleared; keep serving.
                self.counters["recv_errors"] += 1
                log.debug("unixgram recv: %s", exc)
                continue
            self._datagram(sink, at, n, addr)
            if self.closed:
                return
            at += (n + 63) & ~63  # the next datagram on a cache line of its own
            if slice_clock() > deadline:
                break
        sink.end_of_batch()

    def _datagram(self, sink: FrameSink, at: int, n: int, addr: Address | None) -> None:
        """The datagram of `n` bytes read into the buffer at `at`."""
        counters = self.counters
        if not self.connected:
            if not addr:  # None or "": an unbound sender we could never answer
                counters["drop_unnamed_peer"] += 1
                return
            if addr != self.peer:
                if self.peer is None:
                    self._learn(addr)
                elif not self._peer_gone():
                    counters["drop_foreign_peer"] += 1
                    return
                else:
                    counters["peers_replaced"] += 1
                    log.info("unixgram: guest at %r is gone; now serving %r", self.peer, addr)
                    if self._on_new_peer is not None:
                        data = bytes(self._buf[at:at + n])
                        self._on_new_peer(data, addr)
                        return
                    self._learn(addr)
        if n == len(VFKIT_MAGIC) and self._buf[at:at + n] == VFKIT_MAGIC:
            counters["handshakes"] += 1
            return
        if n < MIN_FRAME:
            counters["drop_short_frame"] += 1
            return
        if n > MAX_FRAME:
            counters["drop_long_frame"] += 1
            return
        counters["frames_in"] += 1
        sink.handle_frame(self._view[at:at + n])

    def _learn(self, addr: Address) -> None:
        self.peer = addr
        self._peer_dead = False
        self.counters["peers"] += 1
        kind = probe_peer(addr)
        log.info("unixgram: serving the guest at %r (%s)", addr, kind)
        self._can_wait = kind == CONNECTED
        if kind == OPEN:
            try:
                self.sock.connect(addr)
            except OSError as exc:
                log.info("unixgram: cannot connect to %r (%s); drops on a full queue", addr,
                         exc)
            else:
                self._sock_peer = self._can_wait = True
                self._timer = self._loop.call_later(_PROBE_INTERVAL_S, self._check_peer)

    def _check_peer(self) -> None:
        self._timer = None
        if self.closed or not self._sock_peer:
            return
        assert self.peer is not None
        if peer_alive(self.peer):
            self._timer = self._loop.call_later(_PROBE_INTERVAL_S, self._check_peer)
            return
        log.info("unixgram: guest at %r is gone; waiting for the next", self.peer)
        self._forget_peer()
        with contextlib.suppress(OSError):
            _disconnect(self.sock)
        self._gone("its socket refuses connections")

    def _gone(self, why: str) -> None:
        """Tell `on_peer_gone` the served peer left. Scheduled, not called: a refused
        send happens inside the relay's output path, where ending flows must not."""
        if self._on_peer_gone is not None:
            self._loop.call_soon(self._on_peer_gone, f"guest at {self.peer!r} gone: {why}")

    def _forget_peer(self) -> None:
        """The served peer is gone (its socket refused us): let the next one in."""
        self._peer_dead = True
        self._sock_peer = self._can_wait = False
        self._queue.clear()
        self._queued = 0

    def _peer_gone(self) -> bool:
        if self._peer_dead:
            return True
        now = time.monotonic()
        if now - self._last_probe < _PROBE_INTERVAL_S:
            return False
        self._last_probe = now
        assert self.peer is not None
        return not peer_alive(self.peer)

    # -- relay -> guest --------------------------------------------------------------

    def send(self, head: bytes, payload: bytes | memoryview = b"") -> None:
        if self.closed:
            return
        if self._queue:
            self._enqueue(head + bytes(payload))
            return
        try:
            if not self._send_one((head, payload) if payload else (head,)):
                return
        except BlockingIOError:
            if self._can_wait:
                self._enqueue(head + bytes(payload))
            else:
                self.counters["drop_send_full"] += 1
            return
        except OSError as exc:
            self._send_failed(exc)
            return
        self.counters["frames_out"] += 1

    def _send_one(self, parts: tuple[bytes | memoryview, ...]) -> bool:
        if self.connected or self._sock_peer:
            self.sock.sendmsg(parts)
        elif self.peer is not None and not self._peer_dead:
            self.sock.sendmsg(parts, (), 0, self.peer)
        else:
            self.counters["drop_no_peer"] += 1
            return False
        return True

    def _send_failed(self, exc: OSError) -> None:
        if exc.errno in _DROP_ERRNOS:
            self.counters["drop_send_full"] += 1
        elif exc.errno in _PEER_GONE_ERRNOS:
            self.counters["drop_send_error"] += 1
            if self.connected:
                self._lost(f"peer gone: {exc}")
            elif self.peer is not None and not self._peer_dead:
                # Sending to a dead connected peer also dissolves the connection.
                log.info("unixgram: guest at %r is gone (%s)", self.peer, exc)
                self._forget_peer()
                self._gone(str(exc))
        else:  # lost like on a wire
            self.counters["drop_send_error"] += 1
            log.debug("unixgram send: %s", exc)

    def _enqueue(self, frame: bytes) -> None:
        if self._queued + len(frame) > self._queue_limit:
            self.counters["drop_send_full"] += 1
            return
        self._queue.append(frame)
        self._queued += len(frame)
        if not self._writer_on:
            self._writer_on = True
            self._loop.add_writer(self.sock.fileno(), self._on_writable)

    def _on_writable(self) -> None:
        queue = self._queue
        while queue:
            frame = queue[0]
            try:
                sent = self._send_one((frame,))
            except BlockingIOError:
                return
            except OSError as exc:
                self._send_failed(exc)
                if self.closed:
                    return
                sent = False
            if not queue:  # _send_failed forgot the peer and cleared the queue
                break
            queue.popleft()
            self._queued -= len(frame)
            if sent:
                self.counters["frames_out"] += 1
        self._writer_on = False
        self._loop.remove_writer(self.sock.fileno())

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting for the socket to take them."""
        return self._queued

    def stats(self) -> dict[str, int]:
        """The transport's counters (drops by reason), prefixed `unixgram_`."""
        return {f"unixgram_{k}": v for k, v in self.counters.items()}

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        with contextlib.suppress(ValueError, OSError):
            if self._sink is not None:
                self._loop.remove_reader(self.sock.fileno())
            if self._writer_on:
                self._loop.remove_writer(self.sock.fileno())
        self._sink = None
        self._queue.clear()
        self.sock.close()


def bind_unixgram(path: str) -> socket.socket:
    """Bind a unix datagram socket at `path`, replacing a leftover socket file.

    A socket file nobody is bound to (connect() refused: a relay that exited) is
    unlinked; one that is bound (another relay serving it) or a non-socket file is
    refused. The socket is made 0600: whoever can send to it is the guest.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(f"{path} exists and is not a socket; refusing to replace it")
        if peer_alive(path):
            raise OSError(f"{path} is in use by another process")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class UnixgramServer:
    """`relay` serves one guest at a time on the unix datagram socket bound at `path`.

    The bound socket stays with the server; each transport works on a dup of it, so
    when a new guest replaces a gone one (the relay's attach() closes the previous
    transport) no queued datagram is lost and the path never disappears. `sock` and
    `state`: a socket already bound at `path` and what the previous process's
    transport on it had learned (a handover, moving/handover_transport.py).
    """

    def __init__(self, relay: RelayLike, path: str, sock: socket.socket | None = None,
                 state: UnixgramState | None = None) -> None:
        self.relay = relay
        self.path = path
        self.sock = bind_unixgram(path) if sock is None else sock
        self.transport: UnixgramTransport | None = None
        self.counters: Counter[str] = Counter()
        try:
            self._attach(None, state)
        except BaseException:
            # A relay that refuses the guest (closed) leaves no socket file bound here.
            self.close(unlink=sock is None)
            raise

    def _attach(self, first: tuple[bytes, Address] | None,
                state: UnixgramState | None = None) -> None:
        old = self.transport
        if old is not None:
            self.counters.update(old.counters)
        dup = socket.socket(fileno=os.dup(self.sock.fileno()))
        self.transport = transport = UnixgramTransport(
            dup, connected=False, first=first, queue_limit=self.relay.config.guest_queue_limit,
            on_new_peer=self._new_peer, state=state,
            on_peer_gone=lambda reason: self._peer_gone(transport, reason))
        self.relay.attach(transport)

    def _new_peer(self, data: bytes, addr: Address) -> None:
        self._attach((data, addr))

    def _peer_gone(self, transport: UnixgramTransport, reason: str) -> None:
        """The served guest left (its transport found its socket gone): its flows end
        now, as when a stream guest disconnects (the relay's transport_lost), and a fresh
        transport on the same bound socket waits for the next guest."""
        if transport is not self.transport or transport.closed:
            return  # replaced (a new guest came first) or closed meanwhile
        self.counters["peers_gone"] += 1
        self.relay.transport_lost(transport, reason)
        transport.close()
        self._attach(None)

    def stats(self) -> dict[str, int]:
        """The counters of every transport the server has had, prefixed `unixgram_`."""
        total = Counter(self.counters)
        if self.transport is not None:
            total.update(self.transport.counters)
        return {f"unixgram_{k}": v for k, v in total.items()}

    def close(self, unlink: bool = True) -> None:
        """Close the transport and the bound socket, and remove the path if `unlink`."""
        if self.transport is not None:
            self.counters.update(self.transport.counters)
            self.transport.close()
            self.transport = None
        self.sock.close()
        if unlink:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def serve_unixgram(relay: RelayLike, path: str) -> UnixgramServer:
    """Serve one guest at a time on a unix datagram socket bound at `path`."""
    return UnixgramServer(relay, path)


def attach_unixgram_fd(relay: RelayLike, fd: int) -> UnixgramTransport:
    """Serve the guest on an inherited unix datagram socket (`--fd N`).

    The socket should be connected (a socketpair end, or connect()ed by the launcher);
    an unconnected one is served like a server socket: its peer is learned from the
    first datagram.
    """
    sock = socket.socket(fileno=fd)
    if sock.type != socket.SOCK_DGRAM or sock.family != socket.AF_UNIX:
        sock.detach()
        raise ValueError(f"fd {fd} is not a unix datagram socket")
    try:
        sock.getpeername()
        connected = True
    except OSError:
        connected = False
    transport = UnixgramTransport(sock, connected=connected,
                                  queue_limit=relay.config.guest_queue_limit)
    relay.attach(transport)
    return transport

