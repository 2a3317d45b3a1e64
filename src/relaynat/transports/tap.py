"""TAP transport: frames from and to a TAP file descriptor.

The TAP is opened with IFF_VNET_HDR when the kernel offers it (netns/guest.py): every
frame then starts with a virtio-net header, and with TUNSETOFFLOAD(TUN_F_CSUM |
TUN_F_TSO4 | TUN_F_TSO6) the guest's kernel hands us GSO super-frames of up to 64 KiB
with partial checksums even at MTU 1500, and accepts the same from us. Without the
header, each read/write is exactly one Ethernet frame.

Reads are drained per wakeup into one preallocated buffer (`readv` into it: no
allocation per frame), up to a bound so that other work gets its turn. Each frame of a
wakeup gets its own stretch of the buffer, so frames stay valid until the end of the
batch (`keeps_frames`) and the relay writes their payloads to a host socket at once.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import struct

from relaynat.guest_log import guest_logger
from relaynat.transports.base import WAKEUP_SLICE_S, FrameSink, TransportBase, slice_clock

log = guest_logger("relaynat.tap")

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUNGETFEATURES = 0x800454CF
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
#: virtio-net header with num_buffers (VIRTIO_NET_F_MRG_RXBUF layout): 12 bytes.
VNET_HDR_LEN = 12

_FRAMES_PER_WAKEUP = 128
#: The most one read returns: a 64 KiB GSO frame and its vnet header.
_FRAME_MAX = 65536 + 256
#: Frames one batch keeps: about twice what a 0.5 ms slice reads of 64 KiB frames here
#: (transport.WAKEUP_SLICE_S); a batch that fills it ends early. Pages never touched
#: (small frames) cost no memory.
_BUF_SIZE = 16 * _FRAME_MAX


def open_tap(name: str, want_vnet_hdr: bool = True) -> tuple[int, int, bool]:
    """Create or attach TAP `name` in the current network namespace.

    Returns (fd, vnet_hdr_len, offload). Falls back to a plain TAP when the kernel
    lacks IFF_VNET_HDR or refuses the offloads.
    """
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        features = struct.unpack("I", fcntl.ioctl(fd, TUNGETFEATURES, b"\0" * 4))[0]
        vnet = want_vnet_hdr and bool(features & IFF_VNET_HDR)
        flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet else 0)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
        if not vnet:
            return fd, 0, False
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
        except OSError as exc:
            log.info("TAP offloads refused (%s); using the vnet header without them", exc)
            return fd, VNET_HDR_LEN, False
        return fd, VNET_HDR_LEN, True
    except BaseException:
        os.close(fd)
        raise


class TapTransport(TransportBase):
    """A TAP fd (opened by `open_tap` here or by the caller, e.g. a launcher).

    `vnet_hdr_len` is the virtio-net header size the fd was set up with (TUNSETVNETHDRSZ;
    0: none) and `offload` whether TUNSETOFFLOAD accepted checksum and TSO offloads (only
    with a header): exactly what `open_tap` returns, so `TapTransport(*open_tap(name))`.
    The fd is made non-blocking and closed with the transport. `loop` defaults to the
    running loop.
    """

    keeps_frames = True

    def __init__(self, fd: int, vnet_hdr_len: int = 0, offload: bool = False,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.fd = fd
        self.vnet_hdr_len = vnet_hdr_len
        self.offload = offload and vnet_hdr_len > 0
        self._loop = loop or asyncio.get_running_loop()
        self._buf = bytearray(_BUF_SIZE)
        self._view = memoryview(self._buf)
        self._sink: FrameSink | None = None
        self.send_errors = 0
        os.set_blocking(fd, False)

    def start(self, sink: FrameSink) -> None:
        self._sink = sink
        self._loop.add_reader(self.fd, self._on_readable)

    def _on_readable(self) -> None:
        sink = self._sink
        assert sink is not None
        view, skip = self._view, self.vnet_hdr_len
        end = len(view) - _FRAME_MAX
        at = 0
        deadline = slice_clock() + WAKEUP_SLICE_S
        for _ in range(_FRAMES_PER_WAKEUP):
            if at > end:
                sink.end_of_batch()  # the frames read so far are done with
                at = 0
            try:
                n = os.readv(self.fd, (view[at:at + _FRAME_MAX],))
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                self._lost(f"TAP read failed: {exc}")
                return
            if n == 0:
                self._lost("TAP closed")
                return
            sink.handle_frame(view[at + skip:at + n])
            # The next frame starts on a cache line of its own.
            at += (n + 63) & ~63
            if slice_clock() > deadline:
                break
        sink.end_of_batch()

    def send(self, head: bytes, payload: bytes | memoryview = b"") -> None:
        try:
            if payload:
                os.writev(self.fd, (head, payload))
            else:
                os.write(self.fd, head)
        except OSError as exc:
            # EIO while the interface is down, EAGAIN under pressure: the frame is lost
            # like on a wire, and TCP recovers it.
            self.send_errors += 1
            log.debug("TAP write failed: %s", exc)

    def stop(self) -> None:
        """`HandoverTransport`: stop reading, the fd open; frames wait in the TAP's queue."""
        if self._sink is not None:
            self._loop.remove_reader(self.fd)
            self._sink = None

    def close(self) -> None:
        if self._sink is not None:
            self._loop.remove_reader(self.fd)
            self._sink = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
