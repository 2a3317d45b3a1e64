"""`EventHub`: delivers one relay's events (events.py) to its subscribers.

A relay's parts emit through the hub (`events.EventSink`): they test `listening` and
build the event only when someone listens, so a relay nobody subscribes to pays one
attribute test per flow opened or closed and nothing per segment.

Two ways to receive:

- `subscribe(callback)`: `callback(event)` runs at once, inside the relay's data path
  (the frame, timer or socket event that caused it), so it must be quick and must not
  block; hand anything slow to a task. A callback that raises is logged with its
  traceback and unsubscribed, and the relay goes on. The returned callable
  unsubscribes.
- `events(maxsize)`: an async iterator over a bounded queue of its own. A consumer that
  falls behind loses the events that find its queue full (the newest: what it receives
  stays in order, with a gap), each counted as `events_dropped` in the relay's stats;
  the relay never waits for a consumer. The iteration ends when the relay (or
  `Guests`) closes, after the queued events; `aclose()` ends it earlier, and so does
  dropping the last reference to it.

`Guests` has a hub of its own, fed by each guest's relay through `Relay.subscribe`
while anyone listens to it (`on_listening` tells it when), so guests added after a
subscription are included and nobody pays for a merge that nobody reads.

Policy denials also come here (`denied`): an event for subscribers, and a WARNING log
line, rate-limited per relay (`DENIAL_LOG_RATE` a second after a burst of
`DENIAL_LOG_BURST`; the lines left out are counted as `policy_denied_unlogged`), so a
guest scanning a denied range cannot flood the log.
"""

from __future__ import annotations

import asyncio
import collections
import time
import weakref
from collections import Counter
from collections.abc import Callable

from relaynat.events import Endpoint, Event, FlowDenied, GuestReady, TransportLost, endpoint
from relaynat.guest_log import guest_logger
from relaynat.ratelimit import TokenBucket
from relaynat.wire import IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP

log = guest_logger("relaynat.events")

DENIAL_LOG_RATE = 10
DENIAL_LOG_BURST = 20
#: `events()`'s default bound.
DEFAULT_MAXSIZE = 1024

_PROTO_NAMES = {IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp", IPPROTO_ICMP: "icmp",
                IPPROTO_ICMPV6: "icmp"}

Callback = Callable[[Event], None]


class EventStream:
    """An async iterator over a hub's events, from the moment `events()` made it.

    `dropped` counts the events this stream lost because its queue was full."""

    def __init__(self, hub: EventHub, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, not {maxsize}")
        self.maxsize = maxsize
        self.dropped = 0
        self._queue: collections.deque[Event] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._hub: EventHub | None = hub
        self._ended = False

    def offer(self, event: Event) -> bool:
        """The hub's side: queue `event`; False (and nothing queued) when the queue is
        full."""
        if len(self._queue) >= self.maxsize:
            self.dropped += 1
            return False
        self._queue.append(event)
        self._wake()
        return True

    def end(self) -> None:
        """The hub's side: no more events; the iteration stops once the queue is
        empty."""
        self._ended = True
        self._hub = None
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        while not self._queue:
            if self._ended:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._queue.popleft()

    async def aclose(self) -> None:
        """Stop receiving; what is queued is discarded."""
        if self._hub is not None:
            self._hub.forget_stream(self)
        self._queue.clear()
        self.end()

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class EventHub:
    """One relay's (or `Guests`') event delivery. `guest` names the relay in its
    events; `stats` receives `events_dropped` and `policy_denied_unlogged`;
    `on_listening(listening)` hears when `listening` changes."""

    def __init__(self, guest: str | None, stats: Counter[str],
                 on_listening: Callable[[bool], None] | None = None) -> None:
        self.guest = guest
        self.listening = False
        self._stats = stats
        self._on_listening = on_listening
        self._callbacks: list[Callback] = []
        self._streams: list[weakref.ref[EventStream]] = []
        self._denial_log = TokenBucket(DENIAL_LOG_RATE, DENIAL_LOG_BURST)
        self._closed = False

    # -- subscribing ---------------------------------------------------------------------

    def subscribe(self, callback: Callback) -> Callable[[], None]:
        """Call `callback(event)` for every event from now on; returns the callable that
        unsubscribes it (calling it twice is harmless)."""
        self._callbacks.append(callback)
        self.update()

        def unsubscribe() -> None:
            self._drop_callback(callback)

        return unsubscribe

    def events(self, maxsize: int = DEFAULT_MAXSIZE) -> EventStream:
        """An async iterator over the events from now on, queueing at most `maxsize`;
        on a closed hub, one that ends at once."""
        stream = EventStream(self, maxsize)
        if self._closed:
            stream.end()
            return stream
        self._streams.append(weakref.ref(stream, self._stream_gone))
        self.update()
        return stream

    def forget_stream(self, stream: EventStream) -> None:
        """`stream` receives nothing more (its `aclose`)."""
        self._streams = [ref for ref in self._streams if ref() is not stream]
        self.update()

    def _stream_gone(self, ref: weakref.ref[EventStream]) -> None:
        # Its consumer let go of it without aclose (left an `async for`): it no longer
        # counts as listening, nor its full queue as drops.
        if ref in self._streams:
            self._streams.remove(ref)
            self.update()

    def _drop_callback(self, callback: Callback) -> None:
        # Compared by identity: a bound method makes a new object at each access, so
        # equality (the method's __eq__) is what finds it; both are the caller's object.
        for i, cb in enumerate(self._callbacks):
            if cb is callback or cb == callback:
                del self._callbacks[i]
                break
        self.update()

    def update(self) -> None:
        """Recompute `listening` after a change of subscribers."""
        listening = bool(self._callbacks or self._streams)
        if listening != self.listening:
            self.listening = listening
            if self._on_listening is not None:
                self._on_listening(listening)

    # -- emitting ------------------------------------------------------------------------

    def emit(self, event: Event) -> None:
        """Deliver `event` to every subscriber; a stream that loses it counts in
        `events_dropped`."""
        dropped = self.deliver(event)
        if dropped:
            self._stats["events_dropped"] += dropped

    def deliver(self, event: Event) -> int:
        """Deliver `event` to every subscriber; returns how many streams lost it (their
        queue full), for the caller to count where the event came from."""
        dropped = 0
        for callback in list(self._callbacks):
            try:
                callback(event)
            except Exception:
                log.exception("an event subscriber raised on a %s event; unsubscribed",
                              event.kind)
                self._drop_callback(callback)
        # A copy: a callback may drop the last reference to a stream (_stream_gone).
        for ref in list(self._streams):
            stream = ref()
            if stream is not None and not stream.offer(event):
                dropped += 1
        return dropped

    def guest_ready(self, source: str, mac: bytes, ipv4: bytes | None = None,
                    ipv6: bytes | None = None) -> None:
        """The guest's MAC was learned (`source` "mac") or a lease given ("dhcp",
        "dhcpv6"; `link.services.LinkServices.on_ready`): a `GuestReady` event."""
        if self.listening:
            self.emit(GuestReady(time.time(), self.guest, mac.hex(":"),
                                 None if ipv4 is None else str(endpoint(ipv4, None)),
                                 None if ipv6 is None else str(endpoint(ipv6, None)), source))

    def transport_lost(self, reason: str) -> None:
        """The guest's transport went away: a `TransportLost` event."""
        if self.listening:
            self.emit(TransportLost(time.time(), self.guest, reason))

    def denied(self, proto: int, dst: bytes, dport: int, rule: int, comment: str, *,
               reason: str = "policy", names: tuple[str, ...] = (),
               wire_name: str | None = None) -> None:
        """The egress policy refused a new guest flow (`egress_gate.EgressGate`), or a flow a
        domain rule allowed failed the name check of its first flight (`reason`,
        host/first_flight_hold.py): a `FlowDenied` event, and a rate-limited log line."""
        name = _PROTO_NAMES.get(proto, str(proto))
        far: Endpoint | None = None
        if self._denial_log.allow(time.monotonic()):
            far = endpoint(dst, None if name == "icmp" else dport)
            which = "its default" if rule < 0 else f"rule {rule}"
            why = "" if reason == "policy" else f", {reason}" + (
                "" if wire_name is None else f" {wire_name!r}")
            log.warning("policy denied a %s flow to %s (%s%s%s)", name, far, which,
                        f": {comment}" if comment else "", why)
        else:
            self._stats["policy_denied_unlogged"] += 1
        if self.listening:
            if far is None:
                far = endpoint(dst, None if name == "icmp" else dport)
            self.emit(FlowDenied(time.time(), self.guest, name, far, rule, comment, reason,
                                 names, wire_name))

    def close(self) -> None:
        """The relay closed: every `events()` iteration ends after what it queued;
        callbacks stay subscribed (they receive nothing more from a closed relay)."""
        self._closed = True
        for ref in self._streams:
            stream = ref()
            if stream is not None:
                stream.end()
        self._streams.clear()
        self.update()
