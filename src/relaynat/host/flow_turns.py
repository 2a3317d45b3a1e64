"""Which of one guest's TCP flows the next flush serves, in what order (host/tcp_relay.py).

A flow is marked when something happened to it (a guest segment, host readiness, a
timer, an action that drops acknowledged bytes) and served once at the end of the batch
(`TcpRelay.flush`): its owed ACK, held data written, host data peeked. What a flow may
take from the host in one flush is bounded (host/pump.py: its own share and the relay's),
so a flow can end a flush with more to do. It is marked again, and one loop callback
(`call_soon`) runs the next flush after the loop has polled the transports and the
control socket: asyncio runs what became ready while a callback ran only at its next
iteration, after select().

The order of the next round: first the flows that got no turn because the relay's share
was spent before it came to them, then the ones marked in the meantime, last the ones
that used their own share. Without it a flow early in the list would take the relay's
share in every round and the ones after it none (a round of Linux's NAPI polling moves a
device that used its budget to the end of the poll list the same way).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from relaynat.host.tcp_flow import TcpFlow


class FlowTurns:
    """The flows marked for the next flush, and the callback that runs it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, flush: Callable[[], None]) -> None:
        self._loop = loop
        self._flush = flush
        self._marked: list[TcpFlow] = []
        self._soon = False

    def mark(self, flow: TcpFlow) -> None:
        if not flow.dirty:
            flow.dirty = True
            self._marked.append(flow)

    def take(self) -> list[TcpFlow]:
        """The marked flows, in order, for this flush; each stays marked until the
        flush comes to it (`TcpFlow.dirty`), so marking it before then adds nothing."""
        marked, self._marked = self._marked, []
        return marked

    def again(self, waiting: list[TcpFlow], used: list[TcpFlow]) -> None:
        """End of a flush: `waiting` got no turn, `used` used their share; both go in the
        next round, around what was marked since `take` (module docstring). The next
        flush is called soon if any flow is marked."""
        if waiting or used:
            self._marked = list(dict.fromkeys((*waiting, *self._marked, *used)))
            for flow in self._marked:
                flow.dirty = True
        if self._marked and not self._soon:
            self._soon = True
            self._loop.call_soon(self._run)

    def _run(self) -> None:
        self._soon = False
        self._flush()
