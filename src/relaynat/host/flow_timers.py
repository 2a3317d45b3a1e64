"""Per-flow deadlines of the TCP relay: one heap with lazy deletion, one loop timer.

An entry's deadline usually only moves later (the idle timer on every segment), so
most changes push nothing: a flow is pushed only when its deadline moves earlier,
and entries whose deadline is no longer the flow's (or whose flow closed) are skipped
when popped. One `loop.call_at` handle tracks the heap's head.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relaynat.host.tcp_flow import TcpFlow

#: Stale heap entries tolerated beyond twice the live flows before a rebuild.
HEAP_SLACK = 256


class FlowTimers:
    """The deadlines of the flows of one TcpRelay; `run(due, now)` handles the flows
    whose deadline passed (their `scheduled_at` already cleared)."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 run: Callable[[list[TcpFlow], float], None],
                 live_flows: Callable[[], int]) -> None:
        self._loop = loop
        self._run = run
        self._live_flows = live_flows
        self._heap: list[tuple[float, int, TcpFlow]] = []
        self._seq = itertools.count()
        self._handle: asyncio.TimerHandle | None = None
        self._armed_at = float("inf")

    def __len__(self) -> int:
        return len(self._heap)

    def schedule(self, flow: TcpFlow) -> None:
        """Track `flow`'s next deadline (if it moved earlier than the tracked one)."""
        if flow.entry.closed:
            return
        deadline = flow.entry.next_deadline()
        if deadline is None or deadline >= flow.scheduled_at:
            return
        flow.scheduled_at = deadline
        heapq.heappush(self._heap, (deadline, next(self._seq), flow))
        if len(self._heap) > 2 * self._live_flows() + HEAP_SLACK:
            self._compact()
        self._arm(deadline)

    def clear(self) -> None:
        self._heap.clear()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self, deadline: float) -> None:
        if deadline < self._armed_at:
            if self._handle is not None:
                self._handle.cancel()
            self._armed_at = deadline
            self._handle = self._loop.call_at(deadline, self._fire)

    def _compact(self) -> None:
        """Drop the stale entries: those of closed flows and deadlines a flow has since
        moved earlier. A closed flow's entry would otherwise hold it until its
        deadline, as far off as the idle timeout (2 h), so every flow of a
        connect-heavy guest stayed in memory that long (the soak's RSS grew with the
        flows it had closed). Rebuilt once the heap is twice the live flows: amortized
        O(1) per push."""
        self._heap = [item for item in self._heap
                      if item[2].scheduled_at == item[0] and not item[2].entry.closed]
        heapq.heapify(self._heap)

    def _fire(self) -> None:
        self._handle = None
        self._armed_at = float("inf")
        now = self._loop.time()
        due = []
        while self._heap and self._heap[0][0] <= now:
            deadline, _, flow = heapq.heappop(self._heap)
            if flow.scheduled_at != deadline or flow.entry.closed:
                continue
            flow.scheduled_at = float("inf")
            due.append(flow)
        self._run(due, now)
        # Re-arm for the heap's head. The flows this run rescheduled armed the timer
        # for their own deadlines only: an earlier deadline of a flow not touched here,
        # another flow's RTO or window check, would otherwise wait for theirs (up to
        # the idle timeout).
        if self._heap:
            self._arm(self._heap[0][0])
