"""A token bucket for the guest's new-flow rate: sans-I/O, no clock of its own.

`TokenBucket(rate, burst)` holds at most `burst` tokens and gains `rate` tokens per
second; `allow(now)` spends one token and says True, or says False and spends nothing.
The caller passes `now` (the relay passes `loop.time()`, tests pass whatever they
like), so the bucket can be driven by hypothesis with no event loop.

Arithmetic is exact (`fractions.Fraction`): a float `now` or `rate` is an exact binary
fraction, so over any interval [t0, t1] the bucket admits at most
`burst + rate * (t1 - t0)` requests, with no rounding drift however long it runs. It
costs a few microseconds per call, and calls happen once per new flow, not per packet.

"Unlimited" is not a bucket: the relay holds `None` instead (`from_limits` returns it
when the rate is None), so a relay without a rate limit pays nothing. A rate of 0 is
refused here: a launcher meaning "no new flows" and one meaning "no limit" would both
write 0, and guessing wrong fails open or breaks the guest.
"""

from __future__ import annotations

import math
from fractions import Fraction


class TokenBucket:
    """At most `burst` admissions at once, refilled at `rate` per second.

    The bucket starts full: a guest that has been quiet may open `burst` flows at once
    (a browser's parallel connections, a resolver's A and AAAA queries).
    """

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float | Fraction, burst: int) -> None:
        if not rate > 0 or not math.isfinite(rate):
            raise ValueError(f"rate must be a positive finite number, not {rate!r}")
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"burst must be a whole number of at least 1, not {burst!r}")
        self.rate = Fraction(rate)
        self.burst = burst
        self._tokens = Fraction(burst)
        self._last: Fraction | None = None

    @classmethod
    def from_limits(cls, rate: float | None, burst: int | None) -> TokenBucket | None:
        """The bucket for a configured rate (None: unlimited, no bucket). Without a
        burst, one second's worth of flows (at least 1) may come at once."""
        if rate is None:
            return None
        return cls(rate, burst if burst is not None else max(1, math.ceil(rate)))

    def tokens(self, now: float | Fraction) -> Fraction:
        """Tokens available at `now` (refills, spends nothing)."""
        self._refill(Fraction(now))
        return self._tokens

    def allow(self, now: float | Fraction) -> bool:
        """Spend one token at `now` if there is one. A `now` earlier than a previous
        call's counts as that call's time (time never runs backwards for the bucket)."""
        self._refill(Fraction(now))
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    def _refill(self, now: Fraction) -> None:
        last = self._last
        if last is None or now > last:
            if last is not None:
                self._tokens = min(Fraction(self.burst), self._tokens + (now - last) * self.rate)
            self._last = now
