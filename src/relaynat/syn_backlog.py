"""How fast the relay opens new TCP flows for the guest, and where the SYNs beyond wait.

Opening a flow is the relay's dearest work per frame: a socket, a connect, a frame
template, timers, then the host's answer and, for a flood, a close; 100-170 µs of the
one thread all told on the test machine. The guest's frames share one queue on its
link, so under a SYN flood the relay used to open a flow for every SYN as it came and
the frames behind them (the ACKs of the guest's own download) waited in the TAP queue
for thousands of SYNs' work: a download beside 100,000 SYNs kept 13-41% of its speed.

Now flows open at up to `rate` a second (a token bucket: `burst` at once after a quiet
spell); the SYNs beyond wait here in arrival order and open as tokens come (one per
guest frame while the guest sends, so in its own turn of the loop; from a timer set for
the next token once it stopped, as a guest connecting one at a time waits for its SYN's
answer); beyond `capacity` they are dropped and counted, as a kernel drops SYNs for a full listen
queue (the guest's TCP sends its SYN again after its 1 s RTO, RFC 6298 §2.1 and
RFC 9293 §3.8.1). A dropped SYN costs its parse only, so the relay drains the link
faster than a flooding guest can fill it. Unlike `RelayConfig.new_flow_rate`, a
policy that refuses (RST) what exceeds it, this loses no connection: a SYN waits or
is retransmitted. The default rate is above what the relay's connect-request-response
benchmark reaches unthrottled (about 3,000 a second on the test machine, 2026-12-04),
so a guest connecting one at a time never waits for it; at 2,000 it did and the
benchmark measured the bucket. The download beside benches/floods.py's 100,000 SYNs
kept the same share of its speed at 4,000 as at 2,000 (0.64-0.65 against 0.62-0.66).
A waiting SYN keeps what answering it takes, its addresses, ports, sequence number,
window and parsed options, and not its payload: a relay does not take data on a SYN
(tcp_handshake.py acknowledges the SYN alone, so the guest sends the data again after
the handshake, as RFC 9293 §3.10.7.2 allows and a TCP Fast Open client does when its
SYN's data is not acknowledged, RFC 7413 §4.2.2), and 1,024 SYNs of up to 64 KiB each
were 64 MiB held for nothing. The payload is a view into the transport's read buffer,
which is reused; the options were parsed out of it already. No I/O here.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, deque
from typing import TYPE_CHECKING

from relaynat.ratelimit import TokenBucket

if TYPE_CHECKING:
    from relaynat.wire import TcpSegment

#: Flows opened per second under sustained SYNs (RelayConfig.syn_rate's default).
SYN_RATE = 4000.0
#: Flows that open at once after a quiet spell: a browser's or a build's parallel
#: connections never wait.
SYN_BURST = 256
#: SYNs kept waiting; at the default rate the last waits a quarter second, under the
#: guest's 1 s SYN retransmission, so a kept SYN is worth keeping.
BACKLOG_CAPACITY = 1024

#: Once the guest stops sending, what still waits opens from a timer due when the next
#: token is, but no sooner than BACKLOG_TIMER_MIN_S: up to BACKLOG_TIMER_OPENS SYNs
#: (tokens allowing) a round. While the guest goes on sending, its frames open them,
#: and the timer only looks again every BACKLOG_TIMER_S.
BACKLOG_TIMER_MIN_S = 0.0005
BACKLOG_TIMER_S = 0.02
BACKLOG_TIMER_OPENS = 16

Deferred = tuple["TcpSegment", "str | None", "int | None"]
#: The payload of every waiting SYN (module docstring).
_NO_PAYLOAD = memoryview(b"")


class SynBacklog:
    """The new-flow token bucket and the SYNs waiting for a token."""

    def __init__(self, stats: Counter[str], rate: float = SYN_RATE, burst: int = SYN_BURST,
                 capacity: int = BACKLOG_CAPACITY) -> None:
        self._stats = stats
        self._bucket = TokenBucket(rate, burst)
        self._capacity = capacity
        #: The SYNs that wait, oldest first (read-only outside: the relay tests it once
        #: per batch, where a call of __len__ was in 1.6 % of an upload's py-spy samples).
        self.waiting: deque[Deferred] = deque()
        self._keys: set[tuple[int, bytes, int, bytes]] = set()
        self._pulled = False

    def __len__(self) -> int:
        return len(self.waiting)

    def may_open(self, now: float) -> bool:
        """A SYN came at `now`: True if its flow may open now (a token spent). Not
        while others wait: they came first."""
        return not self.waiting and self._bucket.allow(now)

    def defer(self, seg: TcpSegment, host_ip: str | None, host_port: int | None) -> None:
        """Keep `seg` (a SYN that may not open now) for later, or drop it when the
        backlog is full."""
        key = (seg.sport, seg.dst, seg.dport, seg.src)
        if key in self._keys:
            # The guest sent this SYN again (its RTO is 1 s) while the first waited: one
            # is enough. Kept, the second would open a second flow once the first had
            # come and gone, and reach the host as a stray connection.
            self._stats["tcp_syn_backlog_repeated"] += 1
            return
        if len(self.waiting) >= self._capacity:
            self._stats["tcp_syn_backlog_dropped"] += 1
            return
        self._stats["tcp_syn_deferred"] += 1
        self._keys.add(key)
        self.waiting.append((dataclasses.replace(seg, payload=_NO_PAYLOAD), host_ip,
                             host_port))

    def ready(self, now: float, limit: int) -> list[Deferred]:
        """Up to `limit` waiting SYNs that may open at `now`, oldest first (tokens
        spent)."""
        out: list[Deferred] = []
        while len(out) < limit and self.waiting and self._bucket.allow(now):
            seg, host_ip, host_port = self.waiting.popleft()
            self._keys.discard((seg.sport, seg.dst, seg.dport, seg.src))
            out.append((seg, host_ip, host_port))
        self._pulled = True
        return out

    def wait_s(self, now: float) -> float:
        """Seconds from `now` until a token is there for the oldest waiting SYN (0: now)."""
        missing = 1 - self._bucket.tokens(now)
        return float(missing / self._bucket.rate) if missing > 0 else 0.0

    def take_pulled(self) -> bool:
        """True if `ready` was called since the last call of this (and clears it): the
        guest is still sending, so its own frames open what waits."""
        pulled, self._pulled = self._pulled, False
        return pulled

    def clear(self) -> None:
        self.waiting.clear()
        self._keys.clear()
