"""A bounded out-of-order queue for one flow's guest -> host data, and SACK blocks.

The relay writes the guest's in-order data straight into the host socket and
acknowledges only what the socket took (nat_entry.py). Data beyond a hole
used to be dropped, so every segment that overtook another on the guest's wire (jitter,
reordering, a loss) cost a retransmission of everything after the hole. `OooQueue`
keeps such segments instead, as RFC 9293 §3.10.7.4 lets a receiver do ("segments with
higher beginning sequence numbers ... may be held for later processing"); when the
hole fills, the now contiguous data goes to the host socket and only then is it
acknowledged. The cumulative ACK never covers a byte the host kernel has not taken.

What is held is reported to the guest in SACK blocks (RFC 2018), so that it resends
only the holes. RFC 2018 §8 lets a receiver discard data it has SACKed ("reneging");
the guest keeps SACKed data until it is cumulatively acknowledged and resends it on
its RTO. The queue reneges only under memory pressure (below), and counts it.

Bounds. Each flow holds only data inside the window it advertised (the right edge is
a parameter of `insert`) and at most MAX_BLOCKS separate blocks (so a guest sending
one-byte segments with one-byte holes cannot make every insertion walk a long list).
All queues of one relay share an `OooBudget` of bytes, each chunk charged its length
plus CHUNK_OVERHEAD for the Python objects that hold it. A segment that would exceed
the budget first takes room from its own flow's highest queued blocks, if they lie
beyond it (data nearer the hole is worth more: it is written sooner); otherwise it is
dropped, counted, and the guest retransmits it as it would without a queue.

Time. A guest chooses its segment sizes, so what one segment costs must not grow with
what is held: 120,000 contiguous one-byte segments beyond a hole cost 25 s of the loop
every guest shares when each insert rebuilt its block's list of chunks. A segment now
joins its block in place (the blocks it bridges are appended to it, the shorter list
onto the longer), and a piece that fits with the chunk beside it into COALESCE_BYTES is
copied onto that chunk instead of becoming one more (what Linux does with small skbs
in its out-of-order queue, tcp_try_coalesce): a queue of one-byte segments holds a
chunk per KiB, not per byte. Each insert is then O(log blocks) plus copying at most
COALESCE_BYTES, the blocks it merges paid for by their own inserts.

Positions. Sequence numbers wrap (RFC 9293 §3.4), so the queue works on unwrapped
positions: `rcv_nxt` is position `_nxt_pos`, and any sequence number inside the
window is `_nxt_pos + seq_diff(seq, rcv_nxt)`. Blocks are three parallel sorted lists
(starts, ends, chunk lists), searched with bisect.

No I/O: the entry (nat_entry.py) calls `insert`, `advance`, `ready`, `sack_blocks`.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import Counter

from relaynat.wire import seq_diff

M32 = 0xFFFFFFFF
#: Bytes charged per queued chunk beyond its payload: a bytes object's header (33),
#: its slot in a list (8), and a share of the block lists around it.
CHUNK_OVERHEAD = 64
#: Separate blocks (holes + 1) one flow may hold; a segment that would open another
#: is dropped (`tcp_ooo_drop_blocks`). Real reordering leaves a handful of holes.
MAX_BLOCKS = 128
#: Chunks handed to one sendmsg() (Linux's IOV_MAX is 1024).
IOV_CHUNKS = 512
#: A piece of a segment and the chunk it continues (or precedes) become one chunk when
#: together they are no larger: copying a KiB costs less than the 64 bytes of
#: bookkeeping, a list slot and a write's iovec per piece. Full-sized segments (1448
#: bytes at MTU 1500) stay as they came, uncopied.
COALESCE_BYTES = 1024
#: Blocks remembered as recently reported, for the order of SACK blocks (RFC 2018 §4).
_RECENT_MAX = 4


class OooBudget:
    """Bytes the out-of-order queues of one relay may hold together, and the counters
    of what was queued, dropped and reneged (`counters`, usually the relay's stats)."""

    __slots__ = ("counters", "limit", "used")

    def __init__(self, limit: int, counters: Counter[str] | None = None) -> None:
        self.limit = limit
        self.used = 0
        self.counters: Counter[str] = Counter() if counters is None else counters

    def take(self, cost: int) -> bool:
        if self.used + cost > self.limit:
            return False
        self.used += cost
        if self.used > self.counters["tcp_ooo_peak_bytes"]:
            self.counters["tcp_ooo_peak_bytes"] = self.used
        return True

    def give(self, cost: int) -> None:
        self.used -= cost


def _cost(chunks: list[bytes]) -> int:
    return sum(len(c) for c in chunks) + CHUNK_OVERHEAD * len(chunks)


# A piece was charged as a chunk of its own (`insert`); when it is copied onto another
# chunk instead (COALESCE_BYTES), that chunk's overhead is given back, so the budget is
# always what `_cost` says of the lists.

def _append(chunks: list[bytes], piece: bytes, budget: OooBudget) -> None:
    """`piece` after the last of `chunks`."""
    if len(chunks[-1]) + len(piece) <= COALESCE_BYTES:
        chunks[-1] += piece
        budget.give(CHUNK_OVERHEAD)
    else:
        chunks.append(piece)


def _prepend(chunks: list[bytes], piece: bytes, budget: OooBudget) -> None:
    """`piece` before the first of `chunks`."""
    if len(chunks[0]) + len(piece) <= COALESCE_BYTES:
        chunks[0] = piece + chunks[0]
        budget.give(CHUNK_OVERHEAD)
    else:
        chunks.insert(0, piece)


def _concat(left: list[bytes], right: list[bytes], budget: OooBudget) -> list[bytes]:
    """`left`'s chunks then `right`'s, in whichever of the two lists is longer (the
    shorter one's slots are copied, the longer one's move in one memmove at most)."""
    joint = len(left[-1]) + len(right[0]) <= COALESCE_BYTES
    if joint:
        budget.give(CHUNK_OVERHEAD)
    if len(right) > len(left):
        if joint:
            right[0] = left.pop() + right[0]
        right[0:0] = left
        return right
    if joint:
        left[-1] += right[0]
        left.extend(right[1:])
    else:
        left.extend(right)
    return left


class OooQueue:
    """One flow's out-of-order guest data (see the module docstring)."""

    __slots__ = ("_budget", "_chunks", "_ends", "_nxt_pos", "_nxt_seq", "_recent", "_starts",
                 "fin_pos")

    def __init__(self, budget: OooBudget, rcv_nxt: int) -> None:
        self._budget = budget
        self._nxt_seq = rcv_nxt
        self._nxt_pos = 0
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._chunks: list[list[bytes]] = []
        #: Starts of the blocks most recently added to, newest first (RFC 2018 §4).
        self._recent: list[int] = []
        #: Position of a FIN that arrived out of order (its sequence number).
        self.fin_pos: int | None = None

    def __bool__(self) -> bool:
        return bool(self._starts) or self.fin_pos is not None

    @property
    def nbytes(self) -> int:
        """Payload bytes held (without the accounting overhead)."""
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))

    def _pos(self, seq: int) -> int:
        return self._nxt_pos + seq_diff(seq, self._nxt_seq)

    def _seq(self, pos: int) -> int:
        return (self._nxt_seq + pos - self._nxt_pos) & M32

    def blocks(self) -> list[tuple[int, int, bytes]]:
        """(start seq, end seq, data) of every block, lowest first: for tests."""
        return [(self._seq(s), self._seq(e), b"".join(c))
                for s, e, c in zip(self._starts, self._ends, self._chunks, strict=True)]

    # -- arrival ----------------------------------------------------------------------

    def insert(self, seq: int, payload: memoryview | bytes, fin: bool, edge: int) -> None:
        """A segment at `seq` beyond rcv_nxt; `edge` is the right edge of the window we
        advertised. Keeps the part of it inside the window that is not held yet."""
        counters = self._budget.counters
        s = self._pos(seq)
        e = s + len(payload)
        limit = self._pos(edge)
        if fin and e <= limit and self.fin_pos is None:
            # The FIN fixes the stream's end: anything held beyond it was never data.
            self.fin_pos = e
            self._drop_above(e)
        if self.fin_pos is not None:
            limit = min(limit, self.fin_pos)
        lo_clip = max(s, self._nxt_pos)
        hi_clip = min(e, limit)
        if hi_clip < e:
            counters["tcp_ooo_drop_window"] += 1
        if hi_clip <= lo_clip:
            return
        base, s, e = s, lo_clip, hi_clip
        starts, ends = self._starts, self._ends
        # Blocks [lo, hi) touch or overlap [s, e]: the segment joins them into one.
        lo = bisect_left(ends, s)
        hi = bisect_right(starts, e)
        gaps: list[tuple[int, int]] = []
        cursor = s if lo == hi else min(s, starts[lo])
        for j in range(lo, hi):
            if cursor < starts[j]:
                gaps.append((cursor, starts[j]))
            cursor = ends[j]
        if cursor < e:
            gaps.append((cursor, e))
        new = [bytes(payload[a - base:b - base]) for a, b in gaps]
        cost = _cost(new)
        if lo == hi and len(starts) >= MAX_BLOCKS:
            counters["tcp_ooo_drop_blocks"] += 1
            return
        if cost and not self._budget.take(cost):
            # Memory pressure: renege on this flow's blocks beyond the segment, highest
            # first (RFC 2018 §8), or drop the segment if none lie beyond it.
            while len(starts) > hi:
                self._renege_last()
                if self._budget.take(cost):
                    break
            else:
                counters["tcp_ooo_drop_budget"] += 1
                return
        counters["tcp_ooo_segments"] += 1
        if lo == hi:
            starts.insert(lo, s)
            ends.insert(lo, e)
            self._chunks.insert(lo, new)
            start = s
        else:
            start = min(s, starts[lo])
            merged = self._join(lo, hi, new, s < starts[lo])
            end = max(e, ends[hi - 1])
            starts[lo:hi] = [start]
            ends[lo:hi] = [end]
            self._chunks[lo:hi] = [merged]
        self._recent = [start, *(r for r in self._recent if self._block_of(r) not in (-1, lo))]
        del self._recent[_RECENT_MAX:]

    def _join(self, lo: int, hi: int, new: list[bytes], head: bool) -> list[bytes]:
        """The chunks of blocks lo..hi-1 with the `new` pieces in the gaps around and
        between them (one before block lo if `head`), as one list: each block's list
        is taken into the longer of it and what came before, in place, so a segment
        that continues a long block costs as much as one that continues a short one."""
        lists, budget = self._chunks, self._budget
        pieces = iter(new)
        merged = lists[lo]
        if head:
            _prepend(merged, next(pieces), budget)
        for j in range(lo + 1, hi):
            # Blocks never touch: a piece of the segment fills the gap before block j.
            _append(merged, next(pieces), budget)
            merged = _concat(merged, lists[j], budget)
        for piece in pieces:  # the part beyond the last block, if any
            _append(merged, piece, budget)
        return merged

    def _block_of(self, pos: int) -> int:
        """Index of the block holding `pos`, or -1."""
        i = bisect_right(self._starts, pos) - 1
        return i if i >= 0 and self._ends[i] > pos else -1

    def _renege_last(self) -> None:
        """Give up the highest block (a FIN held after it stays: it is no data)."""
        self._starts.pop()
        self._ends.pop()
        chunks = self._chunks.pop()
        self._budget.give(_cost(chunks))
        self._budget.counters["tcp_ooo_reneged_bytes"] += sum(len(c) for c in chunks)

    def _drop_above(self, pos: int) -> None:
        """Forget what is held beyond `pos`."""
        while self._starts and self._ends[-1] > pos:
            if self._starts[-1] >= pos:
                self._starts.pop()
                self._ends.pop()
                self._budget.give(_cost(self._chunks.pop()))
                continue
            chunks = self._chunks[-1]
            keep, acc = [], self._starts[-1]
            for c in chunks:
                if acc + len(c) <= pos:
                    keep.append(c)
                elif acc < pos:
                    keep.append(c[:pos - acc])
                acc += len(c)
            self._budget.give(_cost(chunks) - _cost(keep))
            self._chunks[-1] = keep
            self._ends[-1] = pos

    # -- departure --------------------------------------------------------------------

    def advance(self, rcv_nxt: int) -> None:
        """rcv_nxt moved (the host socket took bytes): forget what is now below it."""
        self._nxt_pos += (rcv_nxt - self._nxt_seq) & M32
        self._nxt_seq = rcv_nxt
        nxt = self._nxt_pos
        starts, ends, chunk_lists = self._starts, self._ends, self._chunks
        n = bisect_right(ends, nxt)
        if n:
            self._budget.give(sum(_cost(c) for c in chunk_lists[:n]))
            del starts[:n], ends[:n], chunk_lists[:n]
        if starts and starts[0] < nxt:
            # The bytes below nxt leave, and the chunks that held only those (walked
            # once, as they go: the rest of the list stays where it is).
            chunks = chunk_lists[0]
            acc = starts[0]
            i = 0
            while acc + len(chunks[i]) <= nxt:
                acc += len(chunks[i])
                i += 1
            del chunks[:i]
            chunks[0] = chunks[0][nxt - acc:]
            self._budget.give(nxt - starts[0] + CHUNK_OVERHEAD * i)
            starts[0] = nxt
        if self.fin_pos is not None and self.fin_pos < nxt:
            self.fin_pos = None

    def ready(self) -> tuple[list[bytes], bool] | None:
        """The held data that now starts at rcv_nxt (at most IOV_CHUNKS chunks), and
        whether the guest's FIN follows it; None when a hole remains at rcv_nxt."""
        nxt = self._nxt_pos
        if self._starts and self._starts[0] == nxt:
            chunks = self._chunks[0]
            if len(chunks) > IOV_CHUNKS:
                return chunks[:IOV_CHUNKS], False
            return list(chunks), self._ends[0] == self.fin_pos
        if self.fin_pos == nxt:
            return [], True
        return None

    def clear(self) -> None:
        """The flow ends (or stops receiving): give everything back to the budget."""
        self._budget.give(sum(_cost(c) for c in self._chunks))
        self._starts.clear()
        self._ends.clear()
        self._chunks.clear()
        self._recent.clear()
        self.fin_pos = None

    # -- SACK (RFC 2018) --------------------------------------------------------------

    def sack_blocks(self, limit: int) -> list[tuple[int, int]]:
        """Up to `limit` (left edge, right edge) sequence pairs: first the block that
        holds the most recently queued segment, then the others most recently added to
        first (RFC 2018 §4), then the rest from the lowest."""
        out: list[int] = []
        for pos in self._recent:
            i = self._block_of(pos)
            if i >= 0 and i not in out:
                out.append(i)
        for i in range(len(self._starts)):
            if len(out) >= limit:
                break
            if i not in out:
                out.append(i)
        return [(self._seq(self._starts[i]), self._seq(self._ends[i])) for i in out[:limit]]
