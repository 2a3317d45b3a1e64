"""What every frame transport offers the relay, and what the relay offers it.

A transport owns one guest link (a TAP fd, a qemu stream socket, ...). It reads
frames and hands each to `FrameSink.handle_frame` as a memoryview into its own
receive buffer, valid only during the call (the relay copies nothing it keeps); after
draining what one wakeup had, it calls `end_of_batch`, which is where the relay sends
coalesced ACKs and moves host data. Frames toward the guest arrive as `send(head,
payload)`, written with one writev/sendmsg so payloads are never concatenated.
"""

from __future__ import annotations

import time
from typing import Protocol

#: The longest one transport keeps handling frames in one wakeup; with the frame count
#: per wakeup, it is each guest's turn in a loop shared by many guests (`Guests`): a
#: guest whose frames are costly (a SYN flood costs a socket and a connect each) gets
#: the same slice of the loop as one whose frames are cheap ACKs, and the level-
#: triggered reader brings it back on the next iteration. Half a millisecond is one
#: 64 KiB GSO frame or about a hundred ACKs here, so a single busy guest loses nothing
#: but an extra epoll round.
WAKEUP_SLICE_S = 0.0005
#: The clock of the slice (a vDSO call, ~50 ns).
slice_clock = time.perf_counter


class FrameSink(Protocol):
    def handle_frame(self, frame: memoryview) -> None: ...

    def end_of_batch(self) -> None: ...

    def transport_lost(self, transport: FrameTransport, reason: str) -> None: ...


class FrameTransport(Protocol):
    #: Bytes of virtio-net header in front of every frame both ways (0: none).
    vnet_hdr_len: int
    #: The guest accepts NEEDS_CSUM/GSO frames (needs a vnet header).
    offload: bool

    def start(self, sink: FrameSink) -> None: ...

    def send(self, head: bytes, payload: bytes | memoryview = b"") -> None: ...

    def close(self) -> None: ...


class TransportBase:
    """What every transport does the same way when its guest link dies."""

    _sink: FrameSink | None

    def close(self) -> None:
        raise NotImplementedError

    def _lost(self, reason: str) -> None:
        """Close, then tell the sink why; the sink is taken first, as close() drops it."""
        sink = self._sink
        self.close()
        if sink is not None:
            sink.transport_lost(self, reason)  # type: ignore[arg-type]

