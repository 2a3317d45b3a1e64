"""The lossy shim's impairments (tests/support/netshim.py) on their own: the spec syntax,
seeded and reproducible decisions that conserve frames, held frames released in time,
corruption past the Ethernet header, delay with jitter within its bounds. The shim on a
real wire: tests/integration/test_lossy_link.py.
"""

from __future__ import annotations

import random

import pytest
from support.netshim import Impairment, ImpairSpec


def test_impairment_spec_parsing() -> None:
    spec = ImpairSpec.parse("loss=0.05, dup=0.01,reorder=0.2,hold=4,hold_ms=2.5")
    assert (spec.loss, spec.dup, spec.reorder, spec.hold, spec.hold_ms) == (
        0.05, 0.01, 0.2, 4, 2.5)
    assert ImpairSpec.parse("") == ImpairSpec()
    for bad in ("loss=2", "drop=0.1", "loss", "hold=0", "hold_ms=0"):
        with pytest.raises(ValueError):
            ImpairSpec.parse(bad)


def test_impairment_is_seeded_and_conserves_frames() -> None:
    spec = ImpairSpec(loss=0.1, dup=0.1, reorder=0.2, hold=3, hold_ms=5)
    frames = [i.to_bytes(4, "big") for i in range(5000)]

    def run(seed: int) -> tuple[list[bytes], Impairment]:
        imp = Impairment(spec, random.Random(seed))
        out = [f for i, fr in enumerate(frames) for f in imp.push(fr, i * 1e-4)]
        out += imp.expire(1e9)
        return out, imp

    out, imp = run(7)
    assert out == run(7)[0]
    assert out != run(8)[0]
    st = imp.stats
    assert st.dropped and st.duplicated and st.reordered
    # Every frame arrives once, twice (duplicated) or not at all (dropped); none invented.
    assert len(out) == len(frames) - st.dropped + st.duplicated
    assert set(out) <= set(frames)
    assert out != sorted(out)  # reordered
    assert not imp.held


def test_impairment_held_frame_released_after_k_frames_or_timeout() -> None:
    imp = Impairment(ImpairSpec(reorder=1.0, hold=2, hold_ms=5), random.Random(1))
    assert imp.push(b"a", 0.0) == []  # held
    assert imp.next_deadline() == pytest.approx(0.005)
    imp.spec.reorder = 0.0
    assert imp.push(b"b", 0.001) == [b"b"]
    assert imp.push(b"c", 0.002) == [b"c", b"a"]  # after two later frames
    imp.spec.reorder = 1.0
    assert imp.push(b"d", 0.003) == []
    assert imp.expire(0.0079) == []
    assert imp.expire(0.0081) == [b"d"]  # quiet wire: released by the timer


def test_impairment_corruption_flips_one_bit_past_the_ethernet_header() -> None:
    imp = Impairment(ImpairSpec.parse("corrupt=1"), random.Random(3))
    frames = [bytes(range(256)) * 4 for _ in range(200)]
    for frame in frames:
        (out,) = imp.push(frame, 0.0)
        diff = [i for i in range(len(frame)) if out[i] != frame[i]]
        assert len(diff) == 1 and diff[0] >= 14
        assert bin(out[diff[0]] ^ frame[diff[0]]).count("1") == 1
    assert imp.stats.corrupted == len(frames)


def test_impairment_delay_with_jitter_holds_every_frame_within_its_bounds() -> None:
    imp = Impairment(ImpairSpec.parse("delay_ms=50,jitter_ms=10"), random.Random(5))
    frames = [i.to_bytes(4, "big") * 8 for i in range(500)]
    assert [f for i, fr in enumerate(frames) for f in imp.push(fr, i * 1e-5)] == []
    assert imp.next_deadline() >= 0.040
    assert imp.expire(0.0399) == []
    out = imp.expire(0.0651)
    assert sorted(out) == sorted(frames)  # every frame, once
    assert out != frames  # jitter larger than the spacing: some overtook others
    assert not imp.delayed
