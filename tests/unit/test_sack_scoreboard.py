"""The sender's SACK scoreboard (sack_scoreboard.py), against a model that keeps the
guest's held bytes as a plain set of offsets; its bounds: at most
MAX_BLOCKS blocks, the lowest forgotten first, resends a call bounded, and an ACK's work
that of its own blocks."""

from __future__ import annotations

import time
from itertools import pairwise
from unittest import mock

from hypothesis import given
from hypothesis import strategies as st

from relaynat import sack_scoreboard
from relaynat.sack_scoreboard import (
    MAX_BLOCKS,
    RESEND_FRAMES,
    RESEND_HOLES,
    SackScoreboard,
)

M32 = 0xFFFFFFFF
#: Payload per frame: large enough that no hole of these tests is cut short.
FRAME = 1460

una_values = st.one_of(st.integers(0, M32), st.sampled_from([0, M32, M32 - 50]))
ranges = st.lists(st.tuples(st.integers(-20, 140), st.integers(0, 60)), max_size=6)


def covered(board: SackScoreboard) -> set[int]:
    return {off for lo, hi in board.blocks for off in range(lo, hi)}


@given(una_values, st.lists(ranges, min_size=1, max_size=5), st.integers(0, 120),
       st.integers(0, 120))
def test_blocks_holes_and_advance_agree_with_a_model(una: int, acks: list, sent: int,
                                                     limit: int) -> None:
    limit = min(limit, sent)  # the send position is never past the highest byte sent
    board = SackScoreboard()
    held: set[int] = set()
    resent: set[int] = set()
    for blocks in acks:
        sack = [((una + lo) & M32, (una + lo + n) & M32) for lo, n in blocks]
        board.add(sack, una, sent)
        for lo, n in blocks:
            # Only bytes beyond the cumulative ACK and within what was sent count.
            if 0 < lo < min(lo + n, sent):
                held.update(range(lo, min(lo + n, sent)))
        assert covered(board) == held
        # Sorted, disjoint, not even touching: one block per run of held bytes.
        for (_, a_hi), (b_lo, _) in pairwise(board.blocks):
            assert a_hi < b_lo
        holes = board.lost_holes(limit, sent, FRAME)
        for lo, hi in holes:
            assert 0 <= lo < hi <= limit
            assert not held & set(range(lo, hi)), "a hole the guest holds"
            assert any(off >= hi for off in held), "a hole with nothing held above it"
            resent.update(range(lo, hi))
        # Nothing new was SACKed beyond what was sent: nothing to send again.
        assert board.lost_holes(limit, sent, FRAME) == []
        # Every hole (a byte below the send position, not held, below a held one) went
        # out again at some point.
        top = max(held, default=0)
        assert {off for off in range(min(limit, top)) if off not in held} <= resent
    # The cumulative ACK moves on: the rest keeps its place relative to it.
    acked = sent // 2
    board.advance(acked)
    assert covered(board) == {off - acked for off in held if off >= acked}
    assert board.rxt_next >= 0
    if not board.blocks:
        assert board.rxt_next == 0 and board.fence is None


def test_every_hole_below_a_sacked_byte_is_lost_once() -> None:
    """The link to the guest keeps order: a hole below SACKed data is lost (RACK, RFC
    8985 §6.2, with a reordering window of nothing), and is sent once per round."""
    board = SackScoreboard()
    board.add([(1000, 1500), (3000, 3200)], 0, 5000)
    assert board.lost_holes(5000, 5000, FRAME) == [(0, 1000), (1500, 3000)]
    assert board.lost_holes(5000, 5000, FRAME) == []
    # Not beyond the send position: after a rewind the pump sends the rest anyway.
    board.clear()
    board.add([(2000, 5000)], 0, 10_000)
    assert board.lost_holes(1500, 10_000, FRAME) == [(0, 1500)]


def test_a_resend_lost_again_goes_out_again_once_later_data_is_sacked() -> None:
    """Bytes sent after a resend arriving while the hole stays a hole means the resend
    was lost (RACK's idea, RFC 8985 §6.2)."""
    board = SackScoreboard()
    board.add([(2000, 5000)], 0, 5000)
    assert board.lost_holes(5000, 5000, FRAME) == [(0, 2000)]
    board.add([(4000, 5000)], 0, 5800)  # nothing sent after the resend is SACKed yet
    assert board.lost_holes(5800, 5800, FRAME) == []
    board.add([(5000, 5100)], 0, 5800)
    assert board.lost_holes(5800, 5800, FRAME) == [(0, 2000)]
    # The cumulative ACK moves the fence along with everything else.
    board.advance(2000)
    assert board.blocks == [(0, 3100)] and board.fence == 3800


def runs(held: set[int]) -> list[tuple[int, int]]:
    """The maximal runs of `held`, lowest first, as [start, end) pairs."""
    out: list[tuple[int, int]] = []
    for off in sorted(held):
        if out and out[-1][1] == off:
            out[-1] = (out[-1][0], off + 1)
        else:
            out.append((off, off + 1))
    return out


@given(st.integers(0, M32), st.lists(st.tuples(
    st.lists(st.tuples(st.integers(-5, 300), st.integers(0, 12)), max_size=4),
    st.integers(0, 20)), min_size=1, max_size=40), st.integers(1, 6))
def test_the_capped_board_is_the_model_without_its_lowest_runs(
        una: int, acks: list, cap: int) -> None:
    """With a cap of `cap` blocks, the board after any ACKs is the model's runs after
    dropping its lowest runs whenever there were more than `cap`; advancing moves both."""
    sent = 320
    board = SackScoreboard()
    held: set[int] = set()
    dropped = 0
    with mock.patch.object(sack_scoreboard, "MAX_BLOCKS", cap):
        for blocks, acked in acks:
            acked = min(acked, sent)
            board.advance(acked)
            una = (una + acked) & M32
            sent -= acked
            held = {off - acked for off in held if off >= acked}
            board.add([((una + lo) & M32, (una + lo + n) & M32) for lo, n in blocks], una,
                      sent)
            for lo, n in blocks:
                if 0 < lo < min(lo + n, sent):
                    held.update(range(lo, min(lo + n, sent)))
            model = runs(held)
            if len(model) > cap:
                for lo, hi in model[:len(model) - cap]:
                    held.difference_update(range(lo, hi))
                dropped += len(model) - cap
            assert board.blocks == runs(held)
            assert len(board) <= cap and board.dropped == dropped


@given(st.lists(st.tuples(st.integers(1, 5000), st.integers(1, 400)), min_size=1,
                max_size=80), st.integers(1, 2000))
def test_holes_come_in_bounded_rounds_that_add_up_to_all_of_them(
        blocks: list, frame: int) -> None:
    """One call sends at most RESEND_HOLES holes and RESEND_FRAMES frames of data; the
    calls after it go on where it stopped, and together they are what one unbounded
    call would have sent."""
    sent = 6000
    board = SackScoreboard()
    board.add([(lo, lo + n) for lo, n in blocks], 0, sent)
    held = {off for lo, hi in board.blocks for off in range(lo, hi)}
    top = max(held)
    want = {off for off in range(top) if off not in held}
    got: set[int] = set()
    while holes := board.lost_holes(sent, sent, frame):
        assert len(holes) <= RESEND_HOLES
        assert sum(hi - lo for lo, hi in holes) <= RESEND_FRAMES * frame
        for lo, hi in holes:
            assert not got & set(range(lo, hi)), "a byte resent twice in one round"
            got.update(range(lo, hi))
    assert got == want


def test_acks_that_each_name_new_one_byte_blocks_cost_their_own_blocks() -> None:
    """Each ACK moves the cumulative ACK one byte and names three new
    one-byte blocks with one-byte holes between. The board stays at MAX_BLOCKS and the
    ACKs cost the same at the end as at the start (before: the board grew by three an
    ACK and every ACK sorted and walked it, ~6,700 ACKs took 33 s in the relay)."""
    board = SackScoreboard()
    una, sent, far = 1000, 1 << 24, 200_000

    def acks(first: int, count: int) -> float:
        start = time.perf_counter()
        for i in range(first, first + count):
            ack = una + i + 1
            board.advance(1)
            board.add([(far + 6 * i + 2 * k, far + 6 * i + 2 * k + 1) for k in range(3)],
                      ack, sent - i - 1)
            board.lost_holes(sent - i - 1, sent - i - 1, 1460)
            assert len(board) <= MAX_BLOCKS
        return time.perf_counter() - start

    early = acks(0, 2000)
    acks(2000, 16_000)
    late = acks(18_000, 2000)
    assert board.dropped > 0
    assert late < 3 * early + 0.05, (early, late)
