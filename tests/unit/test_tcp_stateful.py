"""One TCP flow through `TcpNatEntry`, as a hypothesis state machine.

tests/support/tcp_sim.py's random scheduler picks the next event itself; here hypothesis picks
every event and its arguments (which frame of a link is delivered, duplicated or lost,
how many bytes an application writes or reads, when the clock jumps), so it can shrink
a failing interleaving to a minimal one. The pieces are tcp_sim's: the guest's TCP
(`GuestTcp`), the host socket model (`HostSocket`) and the relay's part (`TcpSim`)
around the relay's own per-flow shell (host/flow_executor.py), which check their
per-step invariants (frames parse with valid checksums, no byte beyond the right edge
the guest advertised, no ACK for bytes the host socket did not take, the peek offset
equals the bytes in flight) and raise SimFailure with a trace.

Added here, after every step (RFC 9293 §3.3.1 send sequence variables, mod 2**32):
snd_una <= snd_nxt <= snd_max; the host socket never holds more than its send buffer;
the bytes each side received are an in-order prefix of what the other side sent.
Rules cover the guest opening, sending, retransmitting (replaying any earlier frame),
half-closing and resetting, and the host peer sending, draining and closing, in any
order. At the end, unless a side reset the flow or gave up, the conversation is run
to completion without faults: whatever happened before, both streams arrive whole.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from support.tcp_sim import M32, Scenario, TcpSim

from relaynat.tcp_state import TcpState
from relaynat.window import SYN_RETRIES_MAX
from relaynat.wire import ACK, RST, seq_le

#: Streams of random bytes (seeded by length): hypothesis' own binary() favours tiny
#: values, and a non-periodic pattern makes any misplaced byte visible.
streams = st.integers(0, 8000).map(lambda n: random.Random(n).randbytes(n))
seqs = st.one_of(st.sampled_from([0, M32, M32 - 1000, 0x7FFFFFFF]), st.integers(0, M32))
amounts = st.integers(1, 5000)
picks = st.integers(0, 1 << 16)


#: tcp_sim's checks that an abort breaks: the RST toward the guest, the RST-close
#: (SO_LINGER 0) of the host socket, and the guest's own give-up (tcp_retries2) when the
#: rules keep the relay's RST from it while it retransmits into the closed flow.
ABORT_CHECKS = ("the entry reset the flow", "abortive close",
                "the guest's retransmissions made no progress")


class AbortableSim(TcpSim):
    """tcp_sim treats any RST from the entry as a failure, since its scheduler keeps
    faults below the give-up thresholds. Here the rules may reset the flow from the
    guest, or starve it until the entry gives up (RFC 9293 §3.8.3: R2 reached, the
    connection is aborted with a RST). A RST, and the guest then timing out against
    the closed flow, are allowed in exactly those two cases."""

    def check(self, cond: object, msg: str) -> None:
        e = self.entry
        if msg in ABORT_CHECKS and (self.guest.reset or (
                e is not None and e.retries > SYN_RETRIES_MAX)):
            return
        super().check(cond, msg)


class OneTcpFlow(RuleBasedStateMachine):
    sim: TcpSim

    def __init__(self) -> None:
        super().__init__()
        self.history: list[bytes] = []
        self.guest_reset = False

    @initialize(guest_data=streams, host_data=streams,
                isn=seqs, iss=seqs, mss=st.integers(64, 1460),
                wscale=st.one_of(st.none(), st.integers(0, 14)),
                rcvbuf=st.integers(512, 65535), sndbuf=st.integers(256, 65536),
                sack=st.booleans(), ooo_budget=st.sampled_from([0, 1000, 1 << 20]))
    def open(self, guest_data: bytes, host_data: bytes, isn: int, iss: int, mss: int,
             wscale: int | None, rcvbuf: int, sndbuf: int, sack: bool,
             ooo_budget: int) -> None:
        # chaos_events=0: tcp_sim's own fault injection stays off; the rules are the faults.
        sc = Scenario(guest_data=guest_data, host_data=host_data, guest_isn=isn,
                      relay_iss=iss, guest_mss=mss, guest_wscale=wscale, guest_rcvbuf=rcvbuf,
                      host_sndbuf=sndbuf, guest_sack=sack, ooo_budget=ooo_budget,
                      chaos_events=0, max_events=100_000)
        self.sim = AbortableSim(sc)
        self.sim.guest.connect(self.sim.now)

    # -- the link ------------------------------------------------------------------------

    @precondition(lambda self: self.sim.to_relay)
    @rule(pick=picks, keep=st.booleans(), lose=st.booleans())
    def deliver_to_relay(self, pick: int, keep: bool, lose: bool) -> None:
        """Any queued guest frame (reordering), maybe kept for later (duplication) or lost."""
        link = self.sim.to_relay
        i = pick % len(link)
        frame = link[i] if keep else link.pop(i)
        if not lose:
            self.history.append(frame)
            self.sim._deliver_to_relay(frame)

    @precondition(lambda self: self.sim.to_guest)
    @rule(pick=picks, keep=st.booleans(), lose=st.booleans())
    def deliver_to_guest(self, pick: int, keep: bool, lose: bool) -> None:
        link = self.sim.to_guest
        i = pick % len(link)
        _frame, seg = link[i] if keep else link.pop(i)
        if not lose:
            self.sim.guest.on_segment(seg, self.sim.now)

    @precondition(lambda self: self.history)
    @rule(pick=picks)
    def replay_old_guest_frame(self, pick: int) -> None:
        """A retransmission or a duplicate from the past, however old (RFC 9293 §3.10.7.4
        says what to do with it: ACK, drop, or RST if it is a stale SYN)."""
        self.sim._deliver_to_relay(self.history[pick % len(self.history)])

    @precondition(lambda self: self.sim.dirty)
    @rule()
    def end_of_batch(self) -> None:
        self.sim._flush()

    @rule()
    def clock_to_next_deadline(self) -> None:
        self.sim._tick()

    # -- the host side -------------------------------------------------------------------

    @precondition(lambda self: self.sim.connect_pending)
    @rule()
    def host_connect_completes(self) -> None:
        self.sim._connect()

    @precondition(lambda self: self.sim.host.produced < len(self.sim.host.data))
    @rule(n=amounts)
    def host_peer_sends(self, n: int) -> None:
        h = self.sim.host
        h.produced += min(n, len(h.data) - h.produced)
        h.host_readable = True
        self.sim.dirty = self.sim.entry is not None

    @precondition(lambda self: self.sim.host.produced == len(self.sim.host.data)
                  and not self.sim.host.eof)
    @rule()
    def host_peer_closes(self) -> None:
        self.sim._ev_peer_close()

    @precondition(lambda self: self.sim.host.outq > 0)
    @rule(n=amounts)
    def host_peer_reads(self, n: int) -> None:
        h = self.sim.host
        h.outq -= min(n, h.outq)
        if h.want_writable:
            self.sim._ev_writable()

    # -- the guest application -----------------------------------------------------------

    @precondition(lambda self: not self.guest_reset
                  and self.sim.guest.written < len(self.sim.guest.data))
    @rule(n=amounts)
    def guest_writes(self, n: int) -> None:
        g = self.sim.guest
        g.app_write(min(n, len(g.data) - g.written), self.sim.now)

    @precondition(lambda self: not self.guest_reset and not self.sim.guest.fin_wanted
                  and self.sim.guest.written == len(self.sim.guest.data))
    @rule()
    def guest_half_closes(self) -> None:
        self.sim._ev_app_close()

    @precondition(lambda self: not self.guest_reset and self.sim.guest.unread > 0)
    @rule(n=amounts)
    def guest_reads(self, n: int) -> None:
        g = self.sim.guest
        g.app_read(min(n, g.unread), self.sim.now)

    @precondition(lambda self: not self.guest_reset and self.sim.guest.irs is not None)
    @rule()
    def guest_resets(self) -> None:
        """The guest aborts (RFC 9293 §3.10.7.4 fourth check): a RST at its snd_nxt."""
        g = self.sim.guest
        g._send(g.max_sent, RST | ACK)
        g.reset = True
        self.guest_reset = True

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def sequence_variables_ordered(self) -> None:
        e = getattr(self, "sim", None) and self.sim.entry
        if e:
            assert seq_le(e.snd_una, e.snd_nxt), (e.snd_una, e.snd_nxt)
            assert seq_le(e.snd_nxt, e.snd_max), (e.snd_nxt, e.snd_max)

    @invariant()
    def host_send_buffer_never_exceeded(self) -> None:
        if hasattr(self, "sim"):
            assert 0 <= self.sim.host.outq <= self.sim.host.capacity

    @invariant()
    def delivered_bytes_are_prefixes(self) -> None:
        if not hasattr(self, "sim"):
            return
        sim = self.sim
        received = bytes(sim.host.received)
        assert received == sim.sc.guest_data[:len(received)]
        got = bytes(sim.guest.rcv)
        assert got == sim.sc.host_data[:len(got)]

    def teardown(self) -> None:
        if not hasattr(self, "sim"):
            return
        sim = self.sim
        e = sim.entry
        if self.guest_reset or sim.guest.reset or (e is not None and e.closed) or not sim._calm():
            return  # aborted or about to give up: nothing more to complete
        if e is not None and e.state is TcpState.CONNECTING and not sim.connect_pending:
            return
        # Fault-free from here (tcp_sim's reliable phase): both streams and both FINs
        # must get through whatever state the rules left the flow in.
        while not sim.finished():
            if sim.events >= sim.sc.max_events:
                sim.fail("no convergence after the rules' prefix")
            sim.step()


TestOneTcpFlow = OneTcpFlow.TestCase
TestOneTcpFlow.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

