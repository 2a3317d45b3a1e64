"""`FrameTransport.keeps_frames`: every frame a transport hands out stays intact until the
`end_of_batch` that follows, not only during `handle_frame`, for the relay writes a
batch's guest payloads to a host socket at once (host/tcp_relay.py, `gathered`).

Each transport reads real frames from a real peer of its kind (a TAP fed through a
packet socket on its interface, a stream and a datagram socket pair, a veth under an
`InterfaceTransport`) into a sink that keeps the views it was given, not copies; at each
end of batch every view must still hold the bytes it had when it was handed out. The
frames are large and many, so batches fill the transports' buffers and wrap (the TAP's
and the datagram slots, the stream buffer's compaction).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator

import pytest

from relaynat.transports.base import FrameTransport
from relaynat.transports.interface import InterfaceTransport
from relaynat.transports.stream import StreamTransport
from relaynat.transports.tap import TapTransport, open_tap
from relaynat.transports.unixgram import UnixgramTransport

pytestmark = pytest.mark.integration

GUEST_MAC = bytes.fromhex("525400123456")
FRAMES = 120


def frames(seed: int, largest: int) -> list[bytes]:
    """Ethernet frames with an unknown ethertype, random lengths up to `largest`, each
    filled with bytes of its own."""
    rnd = random.Random(seed)
    out = []
    for i in range(FRAMES):
        body = rnd.randbytes(rnd.randrange(50, largest - 14))
        out.append(b"\xff" * 6 + GUEST_MAC + struct.pack("!H", 0x88B5) + body + bytes([i]))
    return out


class KeepingSink:
    """Keeps every view it is handed, with a copy taken at that moment, and checks them
    all at each end of batch; done once `expected` frames arrived."""

    def __init__(self, expected: int, skip: int = 0) -> None:
        self.expected, self.skip = expected, skip
        self.batch: list[tuple[memoryview, bytes]] = []
        self.seen: list[bytes] = []
        self.batches = 0
        self.largest_batch = 0
        self.broken: list[str] = []
        self.done = asyncio.Event()

    def handle_frame(self, frame: memoryview) -> None:
        self.batch.append((frame, bytes(frame)))

    def end_of_batch(self) -> None:
        for i, (view, copy) in enumerate(self.batch):
            if bytes(view) != copy:
                self.broken.append(f"batch {self.batches}: frame {i} of {len(self.batch)} "
                                   "changed before the end of its batch")
        self.seen += [copy for _, copy in self.batch]
        self.largest_batch = max(self.largest_batch, len(self.batch))
        self.batches += 1
        self.batch = []
        if len(self.seen) >= self.expected:
            self.done.set()

    def transport_lost(self, transport: FrameTransport, reason: str) -> None:
        self.broken.append(f"transport lost: {reason}")
        self.done.set()


async def _serve(transport: FrameTransport, sink: KeepingSink, feed: Callable[[], None]) -> None:
    """Start `transport` only once `feed` queued everything, so that batches are full."""
    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    await asyncio.to_thread(feeder.join, 30)
    transport.start(sink)
    try:
        await asyncio.wait_for(sink.done.wait(), 30)
    finally:
        transport.close()


def _check(sink: KeepingSink, sent: list[bytes]) -> None:
    assert not sink.broken, sink.broken[:5]
    assert sink.seen == sent
    assert sink.largest_batch > 1  # frames were held across a batch


def test_stream_transport_keeps_frames() -> None:
    sent = frames(1, 65535)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)

    def feed() -> None:
        # More than the transport's 1 MiB buffer: it compacts mid-wakeup.
        theirs.sendall(b"".join(struct.pack("!I", len(f)) + f for f in sent))

    async def main() -> KeepingSink:
        sink = KeepingSink(len(sent))
        transport = StreamTransport(ours)
        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()  # the sender blocks until the transport reads: feed while serving
        transport.start(sink)
        try:
            await asyncio.wait_for(sink.done.wait(), 30)
        finally:
            transport.close()
        feeder.join(10)
        return sink

    try:
        _check(asyncio.run(main()), sent)
    finally:
        theirs.close()


def test_unixgram_transport_keeps_frames() -> None:
    sent = frames(2, 65535)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for s in (ours, theirs):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)

    def feed() -> None:
        for f in sent:
            theirs.send(f)

    async def main() -> KeepingSink:
        sink = KeepingSink(len(sent))
        await _serve(UnixgramTransport(ours, connected=True), sink, feed)
        return sink

    try:
        _check(asyncio.run(main()), sent)
    finally:
        theirs.close()


@contextlib.contextmanager
def _packet_socket(ifname: str) -> Iterator[socket.socket]:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 20)
        s.bind((ifname, 0))
        yield s


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


def _fed_by_packet_socket(ifname: str, transport: Callable[[], FrameTransport],
                          sent: list[bytes]) -> None:
    """Send `sent` through a packet socket on `ifname` into the transport `transport()`
    builds (reading the other end), then check what came out. 16 MiB of socket
    buffers hold the frames until it starts."""
    with _packet_socket(ifname) as s:
        def feed() -> None:
            for f in sent:
                s.send(f)

        async def main() -> KeepingSink:
            sink = KeepingSink(len(sent))
            await _serve(transport(), sink, feed)
            return sink

        sink = asyncio.run(main())
    # The interface's own frames (router solicitations, MLD) may come first.
    assert not sink.broken, sink.broken[:5]
    assert [f for f in sink.seen if f[6:12] == GUEST_MAC] == sent
    assert sink.largest_batch > 1


def test_tap_transport_keeps_frames() -> None:
    # Frames the stack sends out of the TAP interface arrive at its fd: a packet socket
    # on the interface is the guest here.
    fd, vnet_hdr_len, offload = open_tap("kf0")
    made: list[TapTransport] = []  # the transport closes the fd

    def transport() -> TapTransport:
        made.append(TapTransport(fd, vnet_hdr_len, offload))
        return made[-1]

    try:
        _ip("link", "set", "kf0", "up")
        _ip("link", "set", "kf0", "txqueuelen", "10000")
        _fed_by_packet_socket("kf0", transport, frames(3, 1514))
    finally:
        if not made:
            os.close(fd)


def test_interface_transport_keeps_frames() -> None:
    _ip("link", "add", "kfa", "type", "veth", "peer", "name", "kfb")
    try:
        for name in ("kfa", "kfb"):
            _ip("link", "set", name, "up")
        _fed_by_packet_socket("kfb", lambda: InterfaceTransport.open("kfa", vnet_hdr=False),
                              frames(4, 1514))
    finally:
        _ip("link", "del", "kfa")
