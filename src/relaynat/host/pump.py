"""A TCP flow's host socket, both ways: the guest's data written to it (the payloads of one
wakeup gathered into one sendmsg, and what the out-of-order queue made in order), new
data peeked for the guest, holes the guest's SACK blocks name peeked again, and
acknowledged bytes dropped from the receive queue.

The host socket's receive queue is the flow's only send buffer (passt's rule,
nat_entry.py): bytes go to the guest by `MSG_PEEK` and leave the queue only when the guest
acknowledges them (`MSG_TRUNC`). With SO_PEEK_OFF (TCP since Linux 6.10) each peek
continues where the last one ended; without it a peek starts at the queue's head and
skips what is in flight.

A peek fills one buffer shared by every flow of the relay, and the frames built from
it point into that buffer, so the flow's actions are executed after each peek, before
the next one overwrites it.

What one wakeup may take is bounded, per flow and per relay: bytes peeked and frames
built (FLOW_SLICE_*, RELAY_SLICE_*). The event loop is shared by every guest and the
control socket, and a guest chooses its segment size: with an MSS of 48 bytes (the
floor, window.MIN_SND_MSS) sixteen peeks of 1 MiB were 350,000 frames built in one
call, seconds of a loop that every other guest waited on. A flow that used its share
is queued again behind the others (host/tcp_relay.py), so the loop goes back to the
transports and the control socket in between. Linux bounds a socket's work per
softirq round alike (the NAPI budget of 64 packets a poll, net.core.netdev_budget for
all of them).

The receive queue holds every byte in flight toward the guest, so its buffer bounds
the flight: the host peer stops once it is full. Linux sizes it by what the reader
took per round trip of the *host* connection (tcp_rcv_space_adjust), a fraction of a
millisecond on loopback, while bytes leave only a guest round trip later; with a
guest 100 ms away it stayed at 750 KB, and downloads at 6 MiB/s. So when the socket
ran dry while the guest's window had room and the flight fills half the buffer, the
buffer is doubled: it grows with what the guest takes in one of its round trips. This
ends the kernel's own tuning of that socket, so it is done only where the buffer may
grow to RCVBUF_MIN_CEILING at least: with CAP_NET_ADMIN (SO_RCVBUFFORCE) or a
net.core.rmem_max that allows it, as passt sizes its buffers only then (its low_rmem);
Debian's default rmem_max (208 KiB) would cap it below what the kernel tunes to.
What a relay's flows grew their buffers by is bounded together (RCVBUF_BUDGET): a
guest that keeps a wide window and never acknowledges would otherwise pin that much
of the host's TCP memory in every flow it opens.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Generic, TypeVar

from relaynat.guest_log import guest_logger
from relaynat.host.tcp_flow import HostFlow
from relaynat.tcp_actions import RESEND_BYTES_MAX
from relaynat.transports.base import WAKEUP_SLICE_S, slice_clock

log = guest_logger("relaynat.tcp")
F = TypeVar("F", bound=HostFlow)

#: What one flow may peek and cut into frames in one wakeup before yielding to the other
#: flows, the guest transports and the control socket. A 64 KiB GSO frame per 64 KiB, so
#: with offload the bytes bound first; at a 1448-byte MSS without offload the frames,
#: 92 KB. Either is under a millisecond of the loop; 128 frames of 48 bytes left a
#: kernel guest beside such a guest in one `Guests` process half its solo rate, 64
#: frames and the relay's time slice below 0.55-0.58 (tests/integration/test_hostile_guests.py).
FLOW_SLICE_BYTES = 2 << 20
FLOW_SLICE_FRAMES = 64
#: What all flows of one relay (one guest) may take together in one wakeup: four flows'
#: shares; the flows beyond wait for the next round and go first in it.
RELAY_SLICE_BYTES = 4 * FLOW_SLICE_BYTES
RELAY_SLICE_FRAMES = 4 * FLOW_SLICE_FRAMES
#: And the time they may take together, as a transport's reading (transports/base.py): frames
#: cost what their size and the transport make them, so in a loop shared by many guests
#: (`Guests`) a guest whose segments are 48 bytes would otherwise get more of the loop
#: per round than one whose frames are 64 KiB. A flow's turn that began goes to its end.
RELAY_SLICE_S = WAKEUP_SLICE_S
#: The most one peek takes: the shared buffer, at least the largest resend
#: (tcp_actions.RESEND_BYTES_MAX).
_BUF_BYTES = max(FLOW_SLICE_BYTES, RESEND_BYTES_MAX)
#: The largest receive buffer (as SO_RCVBUF reports it) grown to: Linux's own default
#: tcp_rmem maximum (6 MiB) and then some, for a guest window of several MiB.
RCVBUF_MAX = 32 << 20
#: A ceiling below this leaves the buffers to the kernel (module docstring).
RCVBUF_MIN_CEILING = 4 << 20
#: What one relay's flows may have grown their receive buffers by, together: two flows
#: at RCVBUF_MAX, or many at a few MiB.
RCVBUF_BUDGET = 64 << 20


def _rmem_max() -> int:
    """net.core.rmem_max: SO_RCVBUF's ceiling for an unprivileged process."""
    try:
        with open("/proc/sys/net/core/rmem_max") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


class HostPump(Generic[F]):
    """The host sockets of one guest's TCP flows. `execute(flow)` carries out the
    actions the flow's entry queued (host/flow_executor.py). `clock` is the one of the
    relay's time slice (the simulator's is its own)."""

    def __init__(self, stats: Counter[str], execute: Callable[[F], None],
                 clock: Callable[[], float] = slice_clock) -> None:
        self.stats = stats
        self._execute = execute
        self._clock = clock
        self._peek_buf = bytearray(_BUF_BYTES)
        self._peek_view = memoryview(self._peek_buf)
        self._trunc_buf = bytearray(_BUF_BYTES)
        # The kernel doubles what SO_RCVBUF is given (socket(7)), so twice rmem_max;
        # SO_RCVBUFFORCE (CAP_NET_ADMIN) goes beyond it, until it is refused once.
        self._rcvbuf_force = True
        self._rcvbuf_max = RCVBUF_MAX
        # Read now, with the relay: a confined one cannot reach /proc later.
        ceiling = min(2 * _rmem_max(), RCVBUF_MAX)
        self._rcvbuf_unforced_max = ceiling if ceiling >= RCVBUF_MIN_CEILING else 0
        self._rcvbuf_granted = 0  # of RCVBUF_BUDGET
        self._slice_bytes = RELAY_SLICE_BYTES
        self._slice_frames = RELAY_SLICE_FRAMES
        self._slice_end = 0.0

    def new_wakeup(self) -> None:
        """A new round of the relay's flows: the relay's share is whole again."""
        self._slice_bytes = RELAY_SLICE_BYTES
        self._slice_frames = RELAY_SLICE_FRAMES
        self._slice_end = self._clock() + RELAY_SLICE_S

    @property
    def share_left(self) -> bool:
        """Whether the relay's flows may take more in this round (`new_wakeup`)."""
        return (self._slice_bytes > 0 and self._slice_frames > 0
                and self._clock() < self._slice_end)

    def pump(self, flow: F, now: float) -> bool:
        """Move what the host sent to the guest, within the entry's read budget and the
        flow's and the relay's share of this wakeup. True if the socket may hold more:
        pump again after the other flows had their turn."""
        entry = flow.entry
        if flow.consume_pending:
            self.consume(flow)
        nbytes = share_bytes = min(FLOW_SLICE_BYTES, self._slice_bytes)
        frames = share_frames = min(FLOW_SLICE_FRAMES, self._slice_frames)
        try:
            while True:
                if not flow.host_readable or entry.closed:
                    return False
                if nbytes <= 0 or frames <= 0:
                    return True
                budget = entry.host_read_budget()
                if budget <= 0:
                    entry.on_host_blocked(now)
                    return False
                per_frame = entry.frame_payload_max
                budget = min(budget, nbytes, frames * per_frame)
                try:
                    data = flow.peek(self._peek_view, budget, entry.bytes_in_flight)
                except BlockingIOError:
                    self._ran_dry(flow)
                    return False
                except OSError as exc:
                    log.debug("host read on %s failed: %s", flow.host_addr, exc)
                    self.stats["tcp_host_errors"] += 1
                    entry.on_host_reset(now)
                    self._execute(flow)
                    return False
                got = len(data)
                if got == 0:
                    flow.host_readable = False
                    entry.on_host_eof(now)
                    self._execute(flow)
                    return False
                entry.on_host_data(data, now)
                self._execute(flow)
                nbytes -= got
                frames -= -(-got // per_frame)
        finally:
            self._slice_bytes -= share_bytes - nbytes
            self._slice_frames -= share_frames - frames

    def _ran_dry(self, flow: F) -> None:
        """No new data, though the guest's window had room (the read budget was not
        0): wait for the next readiness, and grow the receive buffer if the flight may
        be what fills it."""
        flow.host_readable = False
        if flow.entry.bytes_in_flight >= flow.rcvbuf_watch:
            self._grow_rcvbuf(flow)

    def _grow_rcvbuf(self, flow: F) -> None:
        """The socket ran dry with room left in the guest's window and a flight that
        may fill its receive buffer: double the buffer if the flight fills half of it."""
        try:
            size = flow.rcvbuf()
            if flow.entry.bytes_in_flight < size // 2:
                flow.rcvbuf_watch = size // 2  # the peer is slow, not held back
                return
            want = min(2 * size, self._rcvbuf_max)
            if want <= size:
                flow.rcvbuf_watch = 1 << 62  # at the ceiling: no more checks
                return
            if self._rcvbuf_granted + want - size > RCVBUF_BUDGET:
                # Until other flows give theirs back; asked again only when the flight
                # fills the whole buffer, not on every dry read.
                flow.rcvbuf_watch = size
                self.stats["tcp_rcvbuf_budget_full"] += 1
                return
            self._set_rcvbuf(flow, want)
        except OSError as exc:
            log.debug("growing the receive buffer on %s failed: %s", flow.host_addr, exc)
            flow.rcvbuf_watch = 1 << 62
            return
        self._rcvbuf_granted += want - size
        flow.rcvbuf_granted += want - size
        flow.rcvbuf_watch = want // 2
        self.stats["tcp_rcvbuf_grown"] += 1

    def release(self, flow: F) -> None:
        """`flow` leaves this relay (closed or moved): its growth leaves the budget."""
        self._rcvbuf_granted -= flow.rcvbuf_granted
        flow.rcvbuf_granted = 0

    def _set_rcvbuf(self, flow: F, size: int) -> None:
        if self._rcvbuf_force:
            try:
                flow.set_rcvbuf(size, force=True)
                return
            except PermissionError:
                self._rcvbuf_force = False
                self._rcvbuf_max = self._rcvbuf_unforced_max
                if size > self._rcvbuf_max:
                    raise
        flow.set_rcvbuf(size, force=False)

    # -- guest data toward the host ------------------------------------------------------

    def write(self, flow: F, data: memoryview | list[bytes] | list[memoryview],
              now: float) -> int:
        """Write `data` (one payload, or several for one sendmsg); the bytes the socket
        took. A failed socket resets the flow."""
        try:
            return flow.write(data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            log.debug("host write on %s failed: %s", flow.host_addr, exc)
            self.stats["tcp_host_errors"] += 1
            flow.entry.on_host_reset(now)
            return 0

    def write_gathered(self, flow: F, now: float) -> None:
        """Write the payloads the flow gathered in this wakeup (host/flow_executor.py), at
        once."""
        gathered, flow.gathered = flow.gathered, None
        assert gathered is not None
        if len(gathered) > 1:
            self.stats["tcp_gathered_writes"] += 1
        entry = flow.entry
        entry.on_host_accepted(self.write(flow, gathered[0] if len(gathered) == 1 else gathered,
                                          now), now)
        self.write_backlog(flow, now)
        self._execute(flow)

    def write_backlog(self, flow: F, now: float) -> None:
        """Write what the flow held out of order and a filled hole made in order."""
        entry = flow.entry
        while (chunks := entry.host_backlog()) is not None:
            entry.on_host_accepted(self.write(flow, chunks, now) if chunks else 0, now)

    # -- retransmission and acknowledged data -------------------------------------------

    def resend(self, flow: F, offset: int, length: int, probe: bool = False) -> None:
        """Send one hole the guest's SACK blocks left again, or the tail loss probe
        (`probe`), peeked from the queue's head once the acknowledged bytes are
        dropped."""
        self.consume(flow)
        entry = flow.entry
        try:
            data = flow.peek_at(offset, length, self._peek_view, entry.bytes_in_flight)
        except OSError as exc:
            # The queue holds every unacked byte, so this is the socket failing; the
            # RTO's go-back-N (or the reset the next read meets) takes it from here.
            log.debug("host peek for a resend on %s failed: %s", flow.host_addr, exc)
            return
        self.stats["tcp_loss_probes" if probe else "tcp_sack_resends"] += 1
        entry.on_host_resend(offset, data)
        self._execute(flow)

    def rewind(self, flow: F) -> None:
        """Go-back-N (`RewindHost`): the next peek starts at the first unacknowledged
        byte again."""
        self.consume(flow)
        flow.rewind()
        flow.host_readable = True
        self.stats["tcp_retransmits"] += 1

    def consume(self, flow: F) -> None:
        """Drop the bytes the guest acknowledged since the last call."""
        nbytes, flow.consume_pending = flow.consume_pending, 0
        flow.discard(nbytes, self._trunc_buf)
