"""What the guest says it holds of the data we sent it: the sender's SACK scoreboard.

Pure bookkeeping for `TcpNatEntry` (nat_entry.py), no I/O. The guest's SACK blocks
(RFC 2018 §3) name bytes beyond the cumulative ACK that it has received; the gaps
between them below the highest SACKed byte are holes. Without this, the relay's only
recovery toward the guest was go-back-N from snd_una (three duplicate ACKs, or the
RTO), which sends the whole flight again for one lost frame: on a wire losing 5% of
frames that is most of every window (README, the lossy-wire figures).

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

Offsets are bytes from snd_una, so sequence wrap-around never enters the arithmetic;
`advance` moves them when the cumulative ACK moves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from relaynat.wire import seq_diff


@dataclass(slots=True)
class SackScoreboard:
    """Disjoint, sorted [start, end) offsets from snd_una that the guest holds."""

    blocks: list[tuple[int, int]] = field(default_factory=list)
    #: Holes that start below this offset were resent in this recovery.
    rxt_next: int = 0
    #: The send position (offset) when holes were last resent; None: none since.
    fence: int | None = None

    def add(self, sack: list[tuple[int, int]], una: int, sent: int) -> None:
        """Merge the blocks of one ACK (left, right sequence numbers, RFC 2018 §3).
        Only bytes in (una, una + sent] count: a block at or below the cumulative ACK is
        a D-SACK (RFC 2883) or stale, one beyond what was sent is bogus (RFC 2018 §3 asks
        nothing of it either way)."""
        blocks = self.blocks
        changed = False
        for left, right in sack:
            lo = seq_diff(left, una)
            hi = min(seq_diff(right, una), sent)
            if lo <= 0 or lo >= hi:
                continue
            blocks.append((lo, hi))
            changed = True
        if not changed:
            return
        blocks.sort()
        merged = [blocks[0]]
        for lo, hi in blocks[1:]:
            last_lo, last_hi = merged[-1]
            if lo <= last_hi:
                if hi > last_hi:
                    merged[-1] = (last_lo, hi)
            else:
                merged.append((lo, hi))
        self.blocks = merged

    def advance(self, nbytes: int) -> None:
        """The cumulative ACK moved `nbytes` forward."""
        self.blocks = [(max(lo - nbytes, 0), hi - nbytes) for lo, hi in self.blocks
                       if hi > nbytes]
        self.rxt_next = max(0, self.rxt_next - nbytes)
        if self.fence is not None:
            self.fence = self.fence - nbytes if self.fence > nbytes else None
        if not self.blocks:
            self.rxt_next = 0  # recovery is over: nothing beyond a hole is held
            self.fence = None

    def lost_holes(self, limit: int, sent: int) -> list[tuple[int, int]]:
        """The holes, as [start, end) offsets below `limit` (the send position: what
        was sent since the last rewind), that are lost and not resent yet; they count as
        resent from now on. `sent`: the offset of the highest byte ever sent.

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
        blocks = self.blocks
        if not blocks:
            return holes
        fence = self.fence
        if fence is not None and blocks[-1][1] > fence:
            self.rxt_next = 0
        start = 0
        for lo, hi in blocks:
            end = min(lo, limit)
            begin = max(start, self.rxt_next)
            if begin < end:
                holes.append((begin, end))
                self.rxt_next = end
            start = hi
        if holes:
            self.fence = sent
        return holes

    def restart(self) -> None:
        """Count every hole as not resent yet (after an RTO)."""
        self.rxt_next = 0
        self.fence = None

    def clear(self) -> None:
        self.blocks = []
        self.rxt_next = 0
        self.fence = None
