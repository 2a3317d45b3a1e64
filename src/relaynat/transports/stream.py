"""qemu stream transport: Ethernet frames over a unix stream socket.

Wire format (qemu's `-netdev stream`, also libkrun's and passt's): each frame is a
4-byte big-endian length followed by that many bytes of Ethernet frame; no virtio-net
header, so no offload: frames toward the guest are at most MTU-sized segments and
carry full checksums.

A length under 14 (no Ethernet header) or over 65535 means the peer is not speaking
this protocol or has lost framing; there is no way to resynchronise a byte stream, so
that client is closed with a logged error and the server accepts the next one.

Toward the guest, frames go out with one `sendmsg` of (length, head, payload). When
the socket is full, the rest is queued, up to `queue_limit` bytes; beyond it frames
are dropped and counted (TCP retransmits them; dropping instead of growing is what
keeps a stalled guest from eating the relay's memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import stat
import struct
from collections import deque
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

log = guest_logger("relaynat.stream")

MIN_FRAME = 14
MAX_FRAME = 65535
_LEN = struct.Struct("!I")
_RECV_BUF = 1 << 20
_READS_PER_WAKEUP = 16
#: Frames one sendmsg takes from the queue (Linux's UIO_MAXIOV).
_IOV_MAX = 1024


class StreamTransport(TransportBase):
    """One connected qemu-stream client.

    `sock` is a connected AF_UNIX stream socket (made non-blocking, closed with the
    transport); `queue_limit` bounds the bytes queued while it is full (the module
    docstring says why frames beyond it drop), as `RelayConfig.guest_queue_limit` does
    for the transports the relay makes itself. `loop` defaults to the running loop.
    `Relay.serve_stream` and `Relay.attach_stream_fd` build it for you.

    `pending_in` and `pending_out` continue another process's transport on the same
    socket (moving/handover.py): the bytes of a frame it had read in part, and what it had
    queued toward the guest, sent before anything else (`handover_state` gives them).
    """

    vnet_hdr_len = 0
    offload = False
    #: Frames stay where they were read until the batch ends: the buffer is rewound or
    #: compacted only after `end_of_batch`.
    keeps_frames = True

    def __init__(self, sock: socket.socket, queue_limit: int = 8 << 20,
                 loop: asyncio.AbstractEventLoop | None = None, *, pending_in: bytes = b"",
                 pending_out: bytes = b"") -> None:
        sock.setblocking(False)
        self.sock = sock
        self._loop = loop or asyncio.get_running_loop()
        self._buf = bytearray(_RECV_BUF)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._sink: FrameSink | None = None
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._queue_limit = queue_limit
        self._writer_on = False
        self.frames_dropped = 0
        self.closed = False
        #: The queued continuation of a turn that left whole frames unread (`_turn`).
        self._resume: asyncio.Handle | None = None
        if len(pending_in) > _RECV_BUF:
            raise ValueError(f"{len(pending_in)} bytes of a partial frame do not fit")
        self._buf[:len(pending_in)] = pending_in
        self._end = len(pending_in)
        if pending_out:
            self._queue.append(pending_out)
            self._queued = len(pending_out)

    def start(self, sink: FrameSink) -> None:
        self._sink = sink
        self._loop.add_reader(self.sock.fileno(), self._on_readable)
        if self._queue and not self._writer_on:
            self._writer_on = True
            self._loop.add_writer(self.sock.fileno(), self._on_writable)
        self._resume_if_backlogged()  # whole frames handed over unread

    def handover_state(self) -> tuple[bytes, bytes]:
        """(pending_in, pending_out) for a transport continuing on this socket in
        another process; call once stopped (`stop`). pending_in is what was read and
        not delivered: a frame read in part, and whole frames a slice left over."""
        return (bytes(self._buf[self._start:self._end]), b"".join(self._queue))

    # -- guest -> relay --------------------------------------------------------------

    def _on_readable(self) -> None:
        # With a continuation queued, this loop iteration's turn is the continuation's
        # (it reads too): a backlogged guest gets one turn per iteration, not two.
        if self._resume is None:
            self._turn()

    def _resumed(self) -> None:
        self._resume = None
        self._turn()

    def _turn(self) -> None:
        """One wakeup's share: deliver what is buffered and read more, for at most
        `WAKEUP_SLICE_S` (checked per frame, so a read of a mebibyte of small costly
        frames is not delivered whole) and `_READS_PER_WAKEUP` reads. Whole frames left
        when the slice ends stay in the buffer for a continuation on the next loop
        iteration: the socket may hold nothing more, so its reader would not fire."""
        sink = self._sink
        if sink is None:
            return
        deadline = slice_clock() + WAKEUP_SLICE_S
        for _ in range(_READS_PER_WAKEUP):
            delivered = self._deliver(sink, deadline)
            if delivered is not True:
                if delivered is None:  # lost
                    return
                break  # the slice is over
            if self._end == len(self._buf):
                # Move the partial frame to the front to make room, once the frames
                # delivered before it are done with (`keeps_frames`).
                sink.end_of_batch()
                if self.closed:
                    return
                pending = self._end - self._start
                self._buf[:pending] = self._buf[self._start:self._end]
                self._start, self._end = 0, pending
            try:
                n = self.sock.recv_into(self._view[self._end:])
            except BlockingIOError:
                break
            except OSError as exc:
                self._lost(f"read failed: {exc}")
                return
            if n == 0:
                self._lost("guest closed the connection")
                return
            self._end += n
        sink.end_of_batch()
        if self.closed:
            return
        if self._start == self._end:  # every frame read is delivered and done with
            self._start = self._end = 0
        self._resume_if_backlogged()

    def _resume_if_backlogged(self) -> None:
        """A whole frame is buffered but not delivered: come back on the next loop
        iteration (after every other ready callback, so other guests have their turn)."""
        if (self._sink is not None and self._resume is None
                and self._end - self._start >= 4
                and self._end - self._start - 4 >= _LEN.unpack_from(self._view, self._start)[0]):
            self._resume = self._loop.call_soon(self._resumed)

    def _deliver(self, sink: FrameSink, deadline: float) -> bool | None:
        """Hand the buffered whole frames to `sink` until the slice ends: True when none
        is left, False when the slice ended first, None when the link was lost."""
        view, start, end = self._view, self._start, self._end
        drained: bool | None = True
        while end - start >= 4:
            length = _LEN.unpack_from(view, start)[0]
            if length < MIN_FRAME or length > MAX_FRAME:
                log.error("qemu stream: frame length %d outside %d..%d: closing this client",
                          length, MIN_FRAME, MAX_FRAME)
                self._lost(f"bad frame length {length}")
                return None
            if end - start - 4 < length:
                break
            sink.handle_frame(view[start + 4:start + 4 + length])
            start += 4 + length
            if self.closed:
                return None
            if slice_clock() > deadline:
                drained = False
                break
        self._start = start
        return drained

    # -- relay -> guest --------------------------------------------------------------

    def send(self, head: bytes, payload: bytes | memoryview = b"") -> None:
        if self.closed:
            return
        length = len(head) + len(payload)
        prefix = _LEN.pack(length)
        if not self._queue:
            try:
                sent = self.sock.sendmsg((prefix, head, payload) if payload else (prefix, head))
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._lost(f"write failed: {exc}")
                return
            if sent == length + 4:
                return
            rest = (prefix + head + bytes(payload))[sent:]
        else:
            rest = prefix + head + bytes(payload)
        # A frame partly written must still be finished, so only whole frames drop.
        if (self._queued and self._queued + len(rest) > self._queue_limit
                and len(rest) == length + 4):
            self.frames_dropped += 1
            return
        self._queue.append(rest)
        self._queued += len(rest)
        if not self._writer_on:
            self._writer_on = True
            self._loop.add_writer(self.sock.fileno(), self._on_writable)

    def _on_writable(self) -> None:
        """Send what is queued, many frames per sendmsg, for at most the slice: a queue
        of 8 MiB of 42-byte ARP replies is 200,000 frames, which one `send` each would
        take a third of a second to drain while every other guest waits. The writer
        stays registered while anything is left (the socket is level-triggered)."""
        queue = self._queue
        deadline = slice_clock() + WAKEUP_SLICE_S
        while queue:
            batch = list(itertools.islice(queue, _IOV_MAX))
            try:
                sent = self.sock.sendmsg(batch)
            except BlockingIOError:
                return
            except OSError as exc:
                self._lost(f"write failed: {exc}")
                return
            self._queued -= sent
            for chunk in batch:
                if sent < len(chunk):
                    queue[0] = chunk[sent:]
                    return  # the socket is full
                sent -= len(chunk)
                queue.popleft()
            if slice_clock() > deadline:
                return
        self._writer_on = False
        self._loop.remove_writer(self.sock.fileno())

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting for the socket to take them."""
        return self._queued

    def stop(self) -> None:
        """`HandoverTransport`: stop reading, the socket open (queued frames still go
        out); a frame read in part is finished by the next relay's reads."""
        if self._sink is not None and not self.closed:
            self._loop.remove_reader(self.sock.fileno())
        self._sink = None
        self._cancel_resume()

    def _cancel_resume(self) -> None:
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None

    def stop_writing(self) -> None:
        """Stop sending the queued bytes too (they go to another process with
        `handover_state`); `start` resumes both."""
        if self._writer_on and not self.closed:
            self._loop.remove_writer(self.sock.fileno())
        self._writer_on = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._cancel_resume()
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self.sock.fileno())
            if self._writer_on:
                self._loop.remove_writer(self.sock.fileno())
        self._sink = None
        self._queue.clear()
        self.sock.close()


class StreamRelay(Protocol):
    """What `StreamServer` needs of `relaynat.relay.Relay`."""

    config: RelayConfig

    @property
    def transport(self) -> FrameTransport | None: ...

    def attach(self, transport: FrameTransport) -> None: ...

    def count(self, name: str, n: int = 1) -> None: ...


class StreamServer:
    """`relay` serves qemu stream clients on the unix stream socket listening at
    `path`, one guest at a time (`Relay.serve_stream` makes it).

    `sock` is the listening socket: bound here (`bind_unix_listener`), or `listener`,
    listening at `path` already (passed by the relay this one took over from,
    moving/handover.py). Each client accepted while no guest is attached becomes the
    relay's `StreamTransport`, counted as "stream_clients" in the relay's stats; one
    that connects while a guest is served is closed at once, logged and counted as
    "stream_clients_refused". When the served client goes away the relay closes its
    flows and the next client is accepted.

    Construct it in the relay's guest scope (relaynat/guest_log.py): the listener's
    reader, and so the lines it logs, belong to that guest.
    """

    def __init__(self, relay: StreamRelay, path: str, listener: socket.socket | None = None,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.relay = relay
        self.path = path
        self.sock = listener or bind_unix_listener(path)
        #: The socket file as bound (device, inode): `close` removes the path only while
        #: it is still this file, never one another process bound there since.
        self._file = _file_id(path)
        self._loop = loop or asyncio.get_running_loop()
        self.resume()

    def pause(self) -> None:
        """Stop accepting: a client that connects meanwhile waits in the backlog."""
        self._loop.remove_reader(self.sock.fileno())

    def resume(self) -> None:
        """Accept again (as after construction)."""
        self._loop.add_reader(self.sock.fileno(), self._on_client)

    def close(self, unlink: bool = False) -> None:
        """Stop accepting and close the listening socket; with `unlink`, remove its
        socket file too (if the path is still the file bound here). A handover closes
        without `unlink`: the next relay listens on the same file."""
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
        if unlink and self._file is not None and _file_id(self.path) == self._file:
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def _on_client(self) -> None:
        try:
            client, _ = self.sock.accept()
        except BlockingIOError:
            return
        relay = self.relay
        if relay.transport is not None:
            log.warning("a second guest tried to connect while one is served; refused")
            relay.count("stream_clients_refused")
            client.close()
            return
        log.info("guest connected on the stream socket")
        relay.count("stream_clients")
        relay.attach(StreamTransport(client, relay.config.guest_queue_limit, self._loop))


def _file_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def bind_unix_listener(path: str, backlog: int = 4,
                       kind: int = socket.SOCK_STREAM) -> socket.socket:
    """Listen on `path` (a `kind` socket: stream, or seqpacket), replacing a stale
    socket file (nobody accepting on it).

    Refuses to replace a live socket (another relay is serving it) or a non-socket.
    The file is mode 0600 from the moment it exists: Linux gives a bound socket file
    the mode of the socket's inode (less the umask), so fchmod before bind leaves no
    window in which another user could connect.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, kind)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # stale: left by a relay that is gone
        else:
            raise OSError(f"{path} is in use by another process")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, kind)
    try:
        os.fchmod(sock.fileno(), 0o600)
        sock.bind(path)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock
