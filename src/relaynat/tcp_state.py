"""TCP flow states of the relay and the table of allowed transitions.

Written as a table in h11's manner (`_state.py`): a (state, event) pair that is not
in the table is a bug in the caller, and raises `TcpStateError` naming both, instead
of silently driving a flow into a state nobody designed.

The states are the relay's view of its connection with the guest (RFC 9293 §3.3.2),
with CONNECTING in front: the guest's SYN has arrived and the host-side connect() is
in progress; the SYN-ACK is sent only once it succeeded, so a refused connect is a
RST to the guest (as passt and slirp answer it). An inbound flow
(a host client on a forwarded port) starts in SYN_SENT instead: our SYN is out to the
guest, and its SYN-ACK establishes the flow. Half-close is
tracked by the usual FIN states: CLOSE_WAIT is "the guest finished sending", FIN_WAIT
"the host peer finished and we sent the guest our FIN".
"""

from __future__ import annotations

import enum

from relaynat.errors import Error


class TcpState(enum.Enum):
    CONNECTING = "connecting"
    SYN_SENT = "syn_sent"
    SYN_RCVD = "syn_rcvd"
    ESTABLISHED = "established"
    CLOSE_WAIT = "close_wait"
    FIN_WAIT_1 = "fin_wait_1"
    FIN_WAIT_2 = "fin_wait_2"
    CLOSING = "closing"
    LAST_ACK = "last_ack"
    CLOSED = "closed"


class TcpEvent(enum.Enum):
    CONNECT_OK = "connect_ok"
    ACK_OF_SYN = "ack_of_syn"
    GUEST_SYN_ACK = "guest_syn_ack"
    GUEST_FIN = "guest_fin"
    OUR_FIN_SENT = "our_fin_sent"
    OUR_FIN_ACKED = "our_fin_acked"
    #: RST either way, connect failure, retry limit, idle timeout: always allowed.
    ABORT = "abort"


class TcpStateError(Error, RuntimeError):
    """An event arrived in a state where it cannot happen."""


S, E = TcpState, TcpEvent

TRANSITIONS: dict[tuple[TcpState, TcpEvent], TcpState] = {
    (S.CONNECTING, E.CONNECT_OK): S.SYN_RCVD,
    (S.SYN_RCVD, E.ACK_OF_SYN): S.ESTABLISHED,
    (S.SYN_SENT, E.GUEST_SYN_ACK): S.ESTABLISHED,
    (S.ESTABLISHED, E.GUEST_FIN): S.CLOSE_WAIT,
    (S.ESTABLISHED, E.OUR_FIN_SENT): S.FIN_WAIT_1,
    (S.CLOSE_WAIT, E.OUR_FIN_SENT): S.LAST_ACK,
    (S.FIN_WAIT_1, E.OUR_FIN_ACKED): S.FIN_WAIT_2,
    (S.FIN_WAIT_1, E.GUEST_FIN): S.CLOSING,
    (S.FIN_WAIT_2, E.GUEST_FIN): S.CLOSED,
    (S.CLOSING, E.OUR_FIN_ACKED): S.CLOSED,
    (S.LAST_ACK, E.OUR_FIN_ACKED): S.CLOSED,
}

#: States in which the guest may still send us data.
GUEST_SENDING = frozenset({S.SYN_RCVD, S.ESTABLISHED, S.FIN_WAIT_1, S.FIN_WAIT_2})
#: States in which we may still send the guest data read from the host.
HOST_SENDING = frozenset({S.ESTABLISHED, S.CLOSE_WAIT})


def next_state(state: TcpState, event: TcpEvent) -> TcpState:
    if event is E.ABORT:
        return S.CLOSED
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise TcpStateError(f"event {event.value} cannot happen in state {state.value}") from None
