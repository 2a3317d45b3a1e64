"""`AuditLog`: a relay's (or `Guests`') events written down as JSON lines, one record a
line, off the event loop, so that writing never blocks the data path.

The records are events.py's `event_dict`s: every flow decision (`flow_opened` with the
rule that allowed it, the names its destination was learned for and the name its
first flight carried; `flow_denied` with the rule or the reason), every flow end
(`flow_closed`: bytes each way, duration, how it ended), every DNS query the relay
answered or forwarded (`dns_query`), and the guest's readiness and transport loss.

The subscriber runs in the relay's data path and only appends the event to a bounded
queue; the writing (turning events into lines, write, flush) runs in the event loop's
default executor, one batch at a time. Those threads are what `relaynat run`/`serve`
stop before confining the process and let start again after (cli/confining.py): an audit
log keeps no thread of its own. When the queue is full (the disk or the executor
fell behind) the event is dropped and counted: `dropped` here, and `audit_dropped` in
the stats of a `Relay` it is attached to. A batch is flushed when written, so a
reader (`tail -f`) sees each record within moments; `close()` writes what is queued.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Protocol, runtime_checkable

from relaynat.events import Event, event_dict

__all__ = ["DEFAULT_AUDIT_QUEUE", "AuditLog"]

#: Events that may wait for the writer before new ones are dropped.
DEFAULT_AUDIT_QUEUE = 8192


class EventSource(Protocol):
    """What an `AuditLog` attaches to: a `Relay` or `Guests`."""

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Call `callback` for each event from now on; returns the unsubscriber."""
        ...


@runtime_checkable
class Counting(Protocol):
    """A source that keeps counters (a `Relay`: `Relay.count`)."""

    def count(self, name: str, n: int = 1) -> None:
        """Add `n` to the counter `name`."""
        ...


class AuditLog:
    """JSON lines of events, appended to `path` (or written to the text stream
    `stream`, left open); at most `maxsize` events wait to be written.

    `attach(relay)` subscribes it to a `Relay` or `Guests` (events arrive in that
    relay's event loop); `close()` detaches it, writes what waits and closes the file.
    It is also a context manager."""

    def __init__(self, path: str | Path | None = None, *, stream: IO[str] | None = None,
                 maxsize: int = DEFAULT_AUDIT_QUEUE) -> None:
        if (path is None) == (stream is None):
            raise ValueError("AuditLog takes a path or a stream")
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, not {maxsize}")
        self.maxsize = maxsize
        self._own = stream is None
        if stream is None:
            assert path is not None
            stream = open(path, "a", encoding="utf-8")  # noqa: SIM115
        self._file: IO[str] = stream
        #: Events dropped because the queue was full (or the log closed).
        self.dropped = 0
        #: Records written.
        self.written = 0
        self._queue: collections.deque[Event] = collections.deque()
        #: One writer at a time: an executor's batch, or `close`.
        self._lock = threading.Lock()
        self._busy = False
        self._closed = False
        self._unsubscribe: list[Callable[[], None]] = []
        #: The attached relays, which count the drops in their stats.
        self._counting: list[Counting] = []

    def attach(self, source: EventSource) -> Callable[[], None]:
        """Write `source`'s events from now on (a `Relay` or `Guests`); returns the
        callable that detaches it. A relay also counts the drops in its stats
        (`audit_dropped`)."""
        counting = source if isinstance(source, Counting) else None
        if counting is not None:
            self._counting.append(counting)
        unsubscribe = source.subscribe(self.offer)
        self._unsubscribe.append(unsubscribe)

        def detach() -> None:
            unsubscribe()
            if counting in self._counting:
                self._counting.remove(counting)

        return detach

    def offer(self, event: Event) -> None:
        """Queue `event` (the subscriber, in the event loop: never blocks); dropped and
        counted when the queue is full or the log closed."""
        if self._closed or len(self._queue) >= self.maxsize:
            self.dropped += 1
            for relay in self._counting:
                relay.count("audit_dropped")
            return
        self._queue.append(event)
        if not self._busy:
            self._busy = True
            loop = asyncio.get_running_loop()
            loop.run_in_executor(None, self._write).add_done_callback(self._written)

    def _written(self, _done: asyncio.Future[None]) -> None:
        """A batch is written: the next one, if events came meanwhile."""
        self._busy = False
        if self._queue and not self._closed:
            self._busy = True
            loop = asyncio.get_running_loop()
            loop.run_in_executor(None, self._write).add_done_callback(self._written)

    def _write(self) -> None:
        """Write what is queued (an executor thread, or `close`)."""
        queue = self._queue
        out = self._file
        with self._lock:
            if out.closed:
                return
            while queue:
                event = queue.popleft()
                try:
                    out.write(json.dumps(event_dict(event), separators=(",", ":")) + "\n")
                except (OSError, ValueError, TypeError):
                    self.dropped += 1
                    continue
                self.written += 1
            with contextlib.suppress(OSError, ValueError):
                out.flush()

    def close(self) -> None:
        """Detach from every source, write what is queued and close the file (not a
        stream given)."""
        if self._closed:
            return
        self._closed = True
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
        self._counting.clear()
        self._write()
        if self._own:
            with self._lock:
                self._file.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
