"""What every frame transport offers the relay, and what the relay offers it.

A transport owns one guest link (a TAP fd, a qemu stream socket, ...). It reads
frames and hands each to `FrameSink.handle_frame` as a memoryview into its own
receive buffer, valid only during the call (the relay copies nothing it keeps) or, for
a transport that `keeps_frames`, until the batch ends; after draining what one wakeup
had, it calls `end_of_batch`, which is where the relay writes gathered guest data,
sends coalesced ACKs and moves host data. Frames toward the guest arrive as `send(head,
payload)`, written with one writev/sendmsg so payloads are never concatenated.
"""

from __future__ import annotations

import time
from typing import Protocol, runtime_checkable

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
    """What a transport feeds: the `relaynat.Relay` it is attached to."""

    def handle_frame(self, frame: memoryview) -> None:
        """One Ethernet frame from the guest (after the vnet header, if any, was
        skipped); the view is valid only during the call, or until `end_of_batch` if
        the transport `keeps_frames`."""

    def end_of_batch(self) -> None:
        """The frames one wakeup had are delivered: time to send coalesced replies."""

    def transport_lost(self, transport: FrameTransport, reason: str) -> None:
        """`transport` has closed itself (the guest is gone or its link failed)."""


class FrameTransport(Protocol):
    """One guest link, as `relaynat.Relay.attach` takes it."""

    vnet_hdr_len: int
    """Bytes of virtio-net header in front of every frame both ways (0: none)."""
    offload: bool
    """The guest accepts NEEDS_CSUM/GSO frames (needs a vnet header)."""
    keeps_frames: bool
    """Every frame handed to `FrameSink.handle_frame` stays valid (its bytes untouched)
    until the `end_of_batch` that follows, not only during the call: the relay may then
    gather a wakeup's payloads for one host write."""

    def start(self, sink: FrameSink) -> None:
        """Start reading the guest's frames into `sink` (the relay calls it in attach)."""

    def send(self, head: bytes, payload: bytes | memoryview = b"") -> None:
        """Send one frame to the guest: `head` (the vnet header, if any, and the
        protocol headers) then `payload`, in one writev/sendmsg, so the payload is never
        copied. Never raises: a frame the link cannot take now is queued or dropped and
        counted (TCP retransmits it); a link that is gone ends the transport, which
        tells the sink (`FrameSink.transport_lost`)."""

    def close(self) -> None:
        """Stop reading and release the link; idempotent."""


@runtime_checkable
class HandoverTransport(FrameTransport, Protocol):
    """A transport that can pass from one relay to another, its link open
    (`Relay.detach(keep_transport=True)`, when flows move between relays)."""

    def stop(self) -> None:
        """Stop reading and forget the sink, keeping the link open: the next `start`
        (by another relay) resumes. Frames the guest sends meanwhile wait in the link."""


class TransportBase(FrameTransport):
    """What every transport does the same way when its guest link dies.

    Subclassing the protocol makes a transport that lacks one of its methods a type
    error (an abstract class), and lends the protocol's docstrings to its methods."""

    _sink: FrameSink | None
    keeps_frames = False

    def _lost(self, reason: str) -> None:
        """Close, then tell the sink why; the sink is taken first, as close() drops it."""
        sink = self._sink
        self.close()
        if sink is not None:
            sink.transport_lost(self, reason)
