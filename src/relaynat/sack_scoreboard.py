"""What the guest says it holds of the data we sent it: the sender's SACK scoreboard.

Pure bookkeeping for `TcpNatEntry` (nat_entry.py), no I/O. The guest's SACK blocks
(RFC 2018 §3) name bytes beyond the cumulative ACK that it has received; the gaps
between them below the highest SACKed byte are holes. Without this, the relay's only
recovery toward the guest was go-back-N from snd_una (three duplicate ACKs, or the
RTO), which sends the whole flight again for one lost frame: on a wire losing 5% of
frames that is most of every window (docs/threat-model.md, the lossy-wire figures).

Loss recovery follows RFC 6675 in the parts that apply to a relay that keeps no
congestion window toward a local guest (it sends what the guest's window allows), and
RFC 8985 (RACK) in when a hole counts as lost (`lost_holes`):

* Each lost hole is resent once per round (RFC 6675 §5, NextSeg rule 1: a hole not
  yet retransmitted); `rxt_next` marks how far that went, `fence` how far we had sent
  when it did.
* What no SACK block can reveal, a hole at the tail with nothing SACKed above it or
  a resend lost while the window allows nothing new, is left to the RTO: the first
  expiry sends the holes again (`restart`), the next falls back to go-back-N and
  clears the board (RFC 6675 §5.1: the receiver may have reneged, RFC 2018 §8).

Bounds. A guest chooses its blocks: ACKs that each move one byte and name three new
one-byte blocks grew the board by three a time, and every ACK sorted and walked all of
it (6,700 such ACKs took 33 s of the loop every guest shares). The board keeps at most
MAX_BLOCKS blocks and forgets the lowest beyond that (`dropped`): a forgotten block only
makes its bytes look missing, so at worst they are sent again (a sender must be ready
to resend SACKed data anyway: RFC 2018 §8 lets a receiver renege). Each ACK's blocks are
found by bisection and merged in place; `lost_holes` starts at the first hole not
resent yet and sends at most RESEND_HOLES holes and RESEND_FRAMES frames of data a call
(the next ACK goes on where it stopped, as RFC 6675's NextSeg is asked once per ACK), so
an ACK costs its own blocks and what it sends, not the board.

Positions are bytes from the flow's start of this board (`_base` is snd_una's), so the
cumulative ACK moving (`advance`) is an addition and sequence wrap-around never enters
the arithmetic; the blocks are two sorted arrays of 64-bit positions (16 bytes a block).
The public view is in offsets from snd_una (`blocks`, `rxt_next`, `fence`).
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right

from relaynat.tcp_actions import RESEND_BYTES_MAX
from relaynat.wire import seq_diff

#: Blocks the board keeps; the lowest beyond go. Twice what one flow's out-of-order
#: queue holds toward the host (ooo_queue.MAX_BLOCKS): a guest losing 5% of a
#: 4 MiB flight at MTU 1500 leaves about 150 holes.
MAX_BLOCKS = 256
#: Holes one ACK (or RTO) sends again, and frames of data: the rest goes on at the next
#: ACK, which each resend that arrives brings.
RESEND_HOLES = 64
RESEND_FRAMES = 64


class SackScoreboard:
    """Disjoint, sorted, not touching [start, end) ranges beyond snd_una that the guest
    holds (see the module docstring)."""

    __slots__ = ("_base", "_ends", "_fence", "_rxt", "_starts", "dropped")

    def __init__(self) -> None:
        self._base = 0
        self._starts = array("q")
        self._ends = array("q")
        #: Holes that start below this position were resent in this recovery.
        self._rxt = 0
        #: The send position when holes were last resent; None: none since.
        self._fence: int | None = None
        #: Blocks forgotten at MAX_BLOCKS.
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._starts)

    def __eq__(self, other: object) -> bool:
        """The same blocks and recovery state, in offsets (a value, as a dataclass's)."""
        if not isinstance(other, SackScoreboard):
            return NotImplemented
        return ((self.blocks, self.rxt_next, self.fence, self.dropped)
                == (other.blocks, other.rxt_next, other.fence, other.dropped))

    __hash__ = None  # type: ignore[assignment]  # mutable

    @property
    def blocks(self) -> list[tuple[int, int]]:
        """The blocks as [start, end) offsets from snd_una (for tests and logs)."""
        base = self._base
        return [(lo - base, hi - base) for lo, hi in zip(self._starts, self._ends, strict=True)]

    @property
    def rxt_next(self) -> int:
        """Offset below which every hole was resent in this recovery."""
        return self._rxt - self._base

    @property
    def fence(self) -> int | None:
        """The send position (offset) when holes were last resent; None: none since."""
        return None if self._fence is None else self._fence - self._base

    def add(self, sack: list[tuple[int, int]], una: int, sent: int) -> None:
        """Merge the blocks of one ACK (left, right sequence numbers, RFC 2018 §3).
        Only bytes in (una, una + sent] count: a block at or below the cumulative ACK is
        a D-SACK (RFC 2883) or stale, one beyond what was sent is bogus (RFC 2018 §3 asks
        nothing of it either way)."""
        base = self._base
        starts, ends = self._starts, self._ends
        for left, right in sack:
            lo = seq_diff(left, una)
            hi = min(seq_diff(right, una), sent)
            if lo <= 0 or lo >= hi:
                continue
            lo += base
            hi += base
            # Blocks i..j-1 overlap or touch [lo, hi]: they become one.
            i = bisect_left(ends, lo)
            j = bisect_right(starts, hi, i)
            if i == j:
                starts.insert(i, lo)
                ends.insert(i, hi)
                continue
            starts[i] = min(lo, starts[i])
            ends[i] = max(hi, ends[j - 1])
            del starts[i + 1:j], ends[i + 1:j]
        excess = len(starts) - MAX_BLOCKS
        if excess > 0:
            del starts[:excess], ends[:excess]
            self.dropped += excess

    def advance(self, nbytes: int) -> None:
        """The cumulative ACK moved `nbytes` forward."""
        base = self._base = self._base + nbytes
        starts, ends = self._starts, self._ends
        acked = bisect_right(ends, base)
        if acked:
            del starts[:acked], ends[:acked]
        if not starts:
            self._rxt = base  # recovery is over: nothing beyond a hole is held
            self._fence = None
            return
        if starts[0] < base:
            starts[0] = base
        if self._rxt < base:
            self._rxt = base
        if self._fence is not None and self._fence <= base:
            self._fence = None

    def lost_holes(self, limit: int, sent: int, frame_bytes: int) -> list[tuple[int, int]]:
        """The holes, as [start, end) offsets below `limit` (the send position: what
        was sent since the last rewind), that are lost and not resent yet, lowest first,
        at most RESEND_HOLES of them and RESEND_FRAMES frames of `frame_bytes` (the last
        one cut short); they count as resent from now on. `sent`: the offset of the
        highest byte ever sent.

        Every hole below a SACKed byte is lost. RFC 6675 §4 waits for DupThresh
        segments above a hole in case the network reordered them, but the guest's link
        keeps order (a TAP, a unix socket, a virtio queue): a later frame that arrived
        means the earlier one will not. This is RACK (RFC 8985 §6.2) with the guest's
        round trip of microseconds as the reordering window. Waiting for three frames
        of 64 KiB instead stalled a guest whose window held fewer, until the RTO.

        A resend can be lost as well: once a byte sent after a round of resends (beyond
        `sent` as it was then) is SACKed, the holes that round left are lost again and go
        out once more, where RFC 6675 would wait for the RTO (200 ms at least)."""
        holes: list[tuple[int, int]] = []
        starts, ends = self._starts, self._ends
        if not starts:
            return holes
        base = self._base
        if self._fence is not None and ends[-1] > self._fence:
            self._rxt = base
        rxt = self._rxt
        top = base + limit
        budget = min(RESEND_FRAMES * frame_bytes, RESEND_BYTES_MAX)
        # The first hole not resent yet ends at the first block that starts beyond rxt.
        first = bisect_right(starts, rxt)
        prev_end = ends[first - 1] if first else base
        for k in range(first, min(len(starts), first + RESEND_HOLES)):
            begin = max(prev_end, rxt)
            if begin >= top or budget <= 0:
                break
            end = min(starts[k], top, begin + budget)
            holes.append((begin - base, end - base))
            budget -= end - begin
            rxt = end
            prev_end = ends[k]
        if holes:
            self._rxt = rxt
            self._fence = base + sent
        return holes

    def restart(self) -> None:
        """Count every hole as not resent yet (after an RTO)."""
        self._rxt = self._base
        self._fence = None

    def clear(self) -> None:
        del self._starts[:], self._ends[:]
        self._rxt = self._base
        self._fence = None
