"""What the TCP core (`TcpNatEntry`) asks the shell (`TcpRelay`) to do, as plain data.

The core decides and the shell executes, in order: frames for the guest, bytes to drop
from the host socket, a rewind of the peek offset, the resend of one hole, a half-close,
a close. Keeping these apart from the state machine lets tests and simulators
(tests/support/tcp_sim.py) read the decisions without importing the machinery that makes them.
"""

from __future__ import annotations

from dataclasses import dataclass

from relaynat.wire import ACK, FIN, RST, SYN, TcpSegment

M32 = 0xFFFFFFFF
#: The most one `ResendHost` asks for: the shell peeks it into one buffer (host/pump.py).
RESEND_BYTES_MAX = 1 << 20


@dataclass(slots=True)
class SendFrame:
    """Write `head` then `payload` to the guest as one frame."""

    head: bytes
    payload: bytes | memoryview = b""


@dataclass(slots=True)
class ConsumeHost:
    """The guest acknowledged `nbytes`: drop them from the host socket's receive queue."""

    nbytes: int


@dataclass(slots=True)
class RewindHost:
    """Retransmit: set the host socket's peek offset back to the first unacked byte."""


@dataclass(slots=True)
class ResendHost:
    """Retransmit one hole the guest's SACK blocks left, or the last segment sent as a
    tail loss probe (`probe`): peek `length` bytes at `offset` from the first unacked
    byte (once the pending `ConsumeHost`s are done), hand them to
    `TcpNatEntry.on_host_resend`, and put the peek offset back where it was."""

    offset: int
    length: int
    probe: bool = False


@dataclass(slots=True)
class ShutdownHostWrite:
    """The guest sent FIN: shutdown(SHUT_WR) the host socket (half-close)."""


@dataclass(slots=True)
class CloseHost:
    """The flow is over. `abortive`: reset the peer (SO_LINGER {1, 0}) before close."""

    abortive: bool


Action = SendFrame | ConsumeHost | RewindHost | ResendHost | ShutdownHostWrite | CloseHost


def rst_for_unknown(seg: TcpSegment) -> tuple[int, int, int] | None:
    """(seq, ack, flags) of the RST answering a segment of no known flow
    (RFC 9293 §3.10.7.1), or None when the segment is itself a RST."""
    if seg.flags & RST:
        return None
    if seg.flags & ACK:
        return seg.ack, 0, RST
    length = len(seg.payload) + (1 if seg.flags & SYN else 0) + (1 if seg.flags & FIN else 0)
    return 0, (seg.seq + length) & M32, RST | ACK
