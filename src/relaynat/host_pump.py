"""Reading a TCP flow's host socket: new data peeked for the guest, holes the guest's SACK
blocks name peeked again, and acknowledged bytes dropped from the receive queue.

The host socket's receive queue is the flow's only send buffer (DESIGN.md, passt's
rule): bytes go to the guest by `MSG_PEEK` and leave the queue only when the guest
acknowledges them (`MSG_TRUNC`). With SO_PEEK_OFF (TCP since Linux 6.10) each peek
continues where the last one ended; without it a peek starts at the queue's head and
skips what is in flight.

A peek fills one buffer shared by every flow of the relay, and the frames built from
it point into that buffer, so the flow's actions are executed after each peek, before
the next one overwrites it.
"""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Callable

from relaynat.guest_log import guest_logger
from relaynat.tcp_flow import TcpFlow, discard, peek_at

log = guest_logger("relaynat.tcp")

#: Peeks per flow per wakeup before yielding to other flows and the guest transport.
PUMP_ROUNDS = 16
#: The most one peek takes; a larger read budget is peeked over more rounds.
_BUF_BYTES = 1 << 20


class HostPump:
    """The host read side of one guest's TCP flows. `execute(flow)` carries out the
    actions the flow's entry queued (tcp_relay.TcpRelay._execute)."""

    def __init__(self, stats: Counter[str], execute: Callable[[TcpFlow], None]) -> None:
        self.stats = stats
        self._execute = execute
        self._peek_buf = bytearray(_BUF_BYTES)
        self._peek_view = memoryview(self._peek_buf)
        self._trunc_buf = bytearray(_BUF_BYTES)

    def pump(self, flow: TcpFlow, now: float) -> bool:
        """Move what the host sent to the guest, within the entry's read budget and
        `PUMP_ROUNDS` peeks. True if the socket may hold more: pump again after the
        other flows had their turn."""
        entry = flow.entry
        sock = flow.sock
        if flow.consume_pending:
            self.consume(flow)
        for _ in range(PUMP_ROUNDS):
            if not flow.host_readable or entry.closed:
                return False
            budget = entry.host_read_budget()
            if budget <= 0:
                entry.on_host_blocked(now)
                return False
            budget = min(budget, len(self._peek_buf))
            try:
                if flow.peek_offset_supported:
                    got = sock.recv_into(self._peek_view, budget, socket.MSG_PEEK)
                    data = self._peek_view[:got]
                else:
                    # No peek offset: peek from the queue's head and skip what the guest
                    # already has. Only an empty peek is EOF; a peek that holds nothing
                    # beyond the bytes in flight just means no new data yet.
                    skip = entry.bytes_in_flight
                    raw = sock.recv(skip + budget, socket.MSG_PEEK)
                    if raw and len(raw) <= skip:
                        flow.host_readable = False
                        return False
                    got = len(raw) - skip if raw else 0
                    data = memoryview(raw)[skip:]
            except BlockingIOError:
                flow.host_readable = False
                return False
            except OSError as exc:
                log.debug("host read on %s failed: %s", flow.host_addr, exc)
                self.stats["tcp_host_errors"] += 1
                entry.on_host_reset(now)
                self._execute(flow)
                return False
            if got == 0:
                flow.host_readable = False
                entry.on_host_eof(now)
                self._execute(flow)
                return False
            entry.on_host_data(data, now)
            self._execute(flow)
        return True

    def resend(self, flow: TcpFlow, offset: int, length: int, probe: bool = False) -> None:
        """Send one hole the guest's SACK blocks left again, or the tail loss probe
        (`probe`), peeked from the queue's head once the acknowledged bytes are
        dropped."""
        self.consume(flow)
        entry = flow.entry
        try:
            data = peek_at(flow, offset, length, self._peek_view, entry.bytes_in_flight)
        except OSError as exc:
            # The queue holds every unacked byte, so this is the socket failing; the
            # RTO's go-back-N (or the reset the next read meets) takes it from here.
            log.debug("host peek for a resend on %s failed: %s", flow.host_addr, exc)
            return
        self.stats["tcp_loss_probes" if probe else "tcp_sack_resends"] += 1
        entry.on_host_resend(offset, data)
        self._execute(flow)

    def consume(self, flow: TcpFlow) -> None:
        """Drop the bytes the guest acknowledged since the last call."""
        nbytes, flow.consume_pending = flow.consume_pending, 0
        discard(flow.sock, nbytes, self._trunc_buf)
