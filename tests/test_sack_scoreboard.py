"""The sender's SACK scoreboard (sack_scoreboard.py), against a model that keeps the
guest's held bytes as a plain set of offsets."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import given
from hypothesis import strategies as st

from relaynat.sack_scoreboard import SackScoreboard

M32 = 0xFFFFFFFF

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
        holes = board.lost_holes(limit, sent)
        for lo, hi in holes:
            assert 0 <= lo < hi <= limit
            assert not held & set(range(lo, hi)), "a hole the guest holds"
            assert any(off >= hi for off in held), "a hole with nothing held above it"
            resent.update(range(lo, hi))
        # Nothing new was SACKed beyond what was sent: nothing to send again.
        assert board.lost_holes(limit, sent) == []
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
    assert board.lost_holes(5000, 5000) == [(0, 1000), (1500, 3000)]
    assert board.lost_holes(5000, 5000) == []
    # Not beyond the send position: after a rewind the pump sends the rest anyway.
    board.clear()
    board.add([(2000, 5000)], 0, 10_000)
    assert board.lost_holes(1500, 10_000) == [(0, 1500)]


def test_a_resend_lost_again_goes_out_again_once_later_data_is_sacked() -> None:
    """Bytes sent after a resend arriving while the hole stays a hole means the resend
    was lost (RACK's idea, RFC 8985 §6.2)."""
    board = SackScoreboard()
    board.add([(2000, 5000)], 0, 5000)
    assert board.lost_holes(5000, 5000) == [(0, 2000)]
    board.add([(4000, 5000)], 0, 5800)  # nothing sent after the resend is SACKed yet
    assert board.lost_holes(5800, 5800) == []
    board.add([(5000, 5100)], 0, 5800)
    assert board.lost_holes(5800, 5800) == [(0, 2000)]
    # The cumulative ACK moves the fence along with everything else.
    board.advance(2000)
    assert board.blocks == [(0, 3100)] and board.fence == 3800
