"""What a TCP flow's life tells the relay's `events` (events.py): its `FlowOpened`, its
`FlowClosed`, and how it ended (`FlowClosed.how`), noted as the executor closes it.

The flow table (host/tcp_relay.py) says when: an outbound flow opens once its host
connect began (for a flow whose first flight is held, once its name passed), an inbound
one once its forward accepted the client; a flow closes as it leaves the table.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from relaynat.events import Endpoint, FlowClosed, FlowOpened, endpoint, sockaddr_endpoint
from relaynat.host.flow_executor import FlowExecutor
from relaynat.host.tcp_flow import TcpFlow

if TYPE_CHECKING:
    from relaynat.egress_gate import Verdict
    from relaynat.events import EventSink


class EndNotingExecutor(FlowExecutor[TcpFlow]):
    """The relay's `FlowExecutor`, which also notes how each flow ended (events.py's
    `FlowClosed.how`) as it closes. `cause` is what a close means while the relay runs
    the flows' deadlines ("timeout"); None otherwise."""

    cause: str | None = None

    def close(self, flow: TcpFlow, abortive: bool, counter: str = "tcp_flows_closed") -> None:
        if flow.end_how is None:
            flow.end_how = self._how(flow, abortive)
        super().close(flow, abortive, counter)

    def _how(self, flow: TcpFlow, abortive: bool) -> str:
        """How the entry ended `flow` on its own. Its aborts that spare the host peer a
        RST (`abortive` False) are a host reset, a refused connect and the connect
        deadline; the others reset it: the guest's RST, and the idle, SYN and data
        timeouts. The relay names the refused connect itself
        (`TcpRelay._connect_done`); a socket that failed under a deadline's resend is
        the host's reset."""
        if self.cause is not None:
            return "reset_by_host" if not abortive and not flow.connecting else self.cause
        if abortive:
            return "reset_by_guest"
        # A graceful close needs our FIN acknowledged; a host reset before that did not.
        return "closed" if flow.entry.fin_acked else "reset_by_host"


def flow_opened(events: EventSink, flow: TcpFlow, verdict: Verdict | None = None,
                wire_name: str | None = None) -> None:
    """Tell `events` that `flow` opened: an outbound one once its connect() began,
    an inbound one once the forward accepted its client; with the policy's
    `verdict` on it, and the name its first flight carried."""
    guest_port, far, far_port, guest = flow.key
    peer = (sockaddr_endpoint(flow.host_addr) if flow.inbound
            else Endpoint(*flow.host_addr))
    names: tuple[str, ...] = ()
    rule, comment = -1, ""
    if verdict is not None:
        names, rule, comment = verdict.names, verdict.rule, verdict.comment
    events.emit(FlowOpened(time.time(), events.guest, "tcp",
                           "inbound" if flow.inbound else "outbound",
                           endpoint(guest, guest_port), endpoint(far, far_port), peer,
                           names, wire_name, rule, comment))


def flow_closed(events: EventSink, flow: TcpFlow, now: float) -> None:
    """Tell `events` that `flow` left the table (at loop time `now`), with its bytes and
    how it ended."""
    guest_port, far, far_port, guest = flow.key
    entry = flow.entry
    events.emit(FlowClosed(
        time.time(), events.guest, "tcp", "inbound" if flow.inbound else "outbound",
        endpoint(guest, guest_port), endpoint(far, far_port), entry.bytes_from_guest,
        entry.bytes_to_guest, max(0.0, now - flow.opened_at), flow.end_how or "closed"))
