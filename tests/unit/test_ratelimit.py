"""relaynat.ratelimit.TokenBucket: the bounds a token bucket promises, by hypothesis.

Times and rates are drawn as exact fractions (and as floats, which the relay passes),
so the bounds are checked exactly: no tolerance hides an off-by-one admission.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relaynat.ratelimit import TokenBucket

rates = st.fractions(min_value=Fraction(1, 100), max_value=1000)
bursts = st.integers(min_value=1, max_value=50)
#: Non-decreasing call times: positive gaps (some zero: many requests at one instant).
gaps = st.lists(st.one_of(st.just(Fraction(0)), st.fractions(min_value=0, max_value=2)),
                min_size=1, max_size=200)


def _times(start: Fraction, steps: list[Fraction]) -> list[Fraction]:
    out, now = [], start
    for step in steps:
        now += step
        out.append(now)
    return out


@given(rates, bursts, st.fractions(min_value=0, max_value=10**6), gaps)
def test_never_more_than_burst_plus_rate_times_elapsed(rate: Fraction, burst: int,
                                                       start: Fraction,
                                                       steps: list[Fraction]) -> None:
    bucket = TokenBucket(rate, burst)
    times = _times(start, steps)
    admitted = [t for t in times if bucket.allow(t)]
    # Every interval [admitted[i], admitted[j]] holds j - i + 1 admissions.
    for i in range(len(admitted)):
        for j in range(i, len(admitted)):
            assert j - i + 1 <= burst + rate * (admitted[j] - admitted[i])


@given(rates, bursts, st.fractions(min_value=0, max_value=10**6), gaps)
def test_admits_whenever_a_token_has_accrued(rate: Fraction, burst: int, start: Fraction,
                                             steps: list[Fraction]) -> None:
    """The converse: a refusal happens only when the bucket really is empty, i.e. the
    model `min(burst, tokens + rate * gap)` predicts fewer than one token."""
    bucket = TokenBucket(rate, burst)
    tokens, last = Fraction(burst), None
    for now in _times(start, steps):
        if last is not None:
            tokens = min(Fraction(burst), tokens + rate * (now - last))
        last = now
        expected = tokens >= 1
        assert bucket.allow(now) is expected
        if expected:
            tokens -= 1


@given(rates, bursts, st.integers(min_value=1, max_value=100),
       st.fractions(min_value=0, max_value=10**6))
def test_refills_exactly_one_token_per_interval(rate: Fraction, burst: int, k: int,
                                                start: Fraction) -> None:
    bucket = TokenBucket(rate, burst)
    for _ in range(burst):
        assert bucket.allow(start)
    assert not bucket.allow(start)
    # Just before k tokens' worth of time: k - 1 whole tokens, not k.
    almost = start + Fraction(k) / rate - Fraction(1, 10**9)
    assert bucket.tokens(almost) == min(burst, rate * (almost - start))
    exactly = start + Fraction(k) / rate
    assert bucket.tokens(exactly) == min(burst, k)
    granted = sum(bucket.allow(exactly) for _ in range(k + 1))
    assert granted == min(burst, k)


@given(st.floats(min_value=0.01, max_value=1e4), bursts,
       st.lists(st.floats(min_value=0, max_value=1e5), min_size=1, max_size=100))
def test_float_clock_keeps_the_bound(rate: float, burst: int, times: list[float]) -> None:
    """The relay passes `loop.time()` floats: still exact, in any order (a time earlier
    than the last call counts as the last call's, so it cannot mint tokens)."""
    bucket = TokenBucket(rate, burst)
    seen = Fraction(times[0])
    admitted: list[Fraction] = []
    for t in times:
        seen = max(seen, Fraction(t))
        if bucket.allow(t):
            admitted.append(seen)
    for i in range(len(admitted)):
        for j in range(i, len(admitted)):
            assert j - i + 1 <= burst + Fraction(rate) * (admitted[j] - admitted[i])


def test_full_at_start_then_empty() -> None:
    bucket = TokenBucket(20, 5)
    assert [bucket.allow(100.0) for _ in range(6)] == [True] * 5 + [False]
    # 20/s: one token per 50 ms. 100.05 as a float is a hair below 100 + 1/20, and the
    # bucket is exact, so it has 0.99999... tokens there; 1/16 s later is 1.25 tokens.
    assert not bucket.allow(100.05)
    assert bucket.allow(100.0625)
    assert not bucket.allow(100.0625)


def test_unlimited_is_no_bucket_and_default_burst_is_a_second() -> None:
    assert TokenBucket.from_limits(None, None) is None
    assert TokenBucket.from_limits(None, 7) is None
    bucket = TokenBucket.from_limits(2.5, None)
    assert bucket is not None and bucket.burst == 3
    small = TokenBucket.from_limits(0.1, None)
    assert small is not None and small.burst == 1


@pytest.mark.parametrize("rate,burst", [(0, 1), (-1, 1), (float("nan"), 1),
                                        (float("inf"), 1), (1, 0), (1, 1.5), (1, True)])
def test_bad_parameters_are_refused(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)
