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
import os
import socket
import stat
import struct
from collections import deque

from relaynat.guest_log import guest_logger
from relaynat.transport import WAKEUP_SLICE_S, FrameSink, TransportBase, slice_clock

log = guest_logger("relaynat.stream")

MIN_FRAME = 14
MAX_FRAME = 65535
_LEN = struct.Struct("!I")
_RECV_BUF = 1 << 20
_READS_PER_WAKEUP = 16


class StreamTransport(TransportBase):
    """One connected qemu-stream client.

    `sock` is a connected AF_UNIX stream socket (made non-blocking, closed with the
    transport); `queue_limit` bounds the bytes queued while it is full (the module
    docstring says why frames beyond it drop), as `RelayConfig.guest_queue_limit` does
    for the transports the relay makes itself. `loop` defaults to the running loop.
    `Relay.serve_stream` and `Relay.attach_stream_fd` build it for you.

    `pending_in` and `pending_out` continue another process's transport on the same
    socket (handover.py): the bytes of a frame it had read in part, and what it had
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
        if self._end - self._start >= 4:  # a whole frame handed over unread
            self._loop.call_soon(self._deliver_pending)

    def _deliver_pending(self) -> None:
        sink = self._sink
        if sink is not None and self._deliver(sink):
            sink.end_of_batch()

    def handover_state(self) -> tuple[bytes, bytes]:
        """(pending_in, pending_out) for a transport continuing on this socket in
        another process; call once stopped (`stop`), the frames read so far delivered."""
        return (bytes(self._buf[self._start:self._end]), b"".join(self._queue))

    # -- guest -> relay --------------------------------------------------------------

    def _on_readable(self) -> None:
        sink = self._sink
        assert sink is not None
        deadline = slice_clock() + WAKEUP_SLICE_S
        for _ in range(_READS_PER_WAKEUP):
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
            if not self._deliver(sink):
                return
            if slice_clock() > deadline:
                break
        sink.end_of_batch()
        if self._start == self._end:  # every frame read is delivered and done with
            self._start = self._end = 0

    def _deliver(self, sink: FrameSink) -> bool:
        view, start, end = self._view, self._start, self._end
        while end - start >= 4:
            length = _LEN.unpack_from(view, start)[0]
            if length < MIN_FRAME or length > MAX_FRAME:
                log.error("qemu stream: frame length %d outside %d..%d: closing this client",
                          length, MIN_FRAME, MAX_FRAME)
                self._lost(f"bad frame length {length}")
                return False
            if end - start - 4 < length:
                break
            sink.handle_frame(view[start + 4:start + 4 + length])
            start += 4 + length
            if self.closed:
                return False
        self._start, self._end = start, end
        return True

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
        while self._queue:
            chunk = self._queue[0]
            try:
                sent = self.sock.send(chunk)
            except BlockingIOError:
                return
            except OSError as exc:
                self._lost(f"write failed: {exc}")
                return
            self._queued -= sent
            if sent < len(chunk):
                self._queue[0] = chunk[sent:]
                return
            self._queue.popleft()
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
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self.sock.fileno())
            if self._writer_on:
                self._loop.remove_writer(self.sock.fileno())
        self._sink = None
        self._queue.clear()
        self.sock.close()


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
