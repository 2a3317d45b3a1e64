"""ICMP echo (ping) for the guest over IPv4 and IPv6, through unprivileged ping sockets,
or, where those are refused and the process has CAP_NET_RAW, through raw sockets.

This module owns the guest's echo requests: it validates them (RFC 792: type 8, code 0,
Internet checksum over the whole ICMP message, no pseudo-header; RFC 4443 §4.1: type
128, code 0, checksum with the IPv6 pseudo-header, §2.3), sends them to the host
through ping sockets of the same family, and turns the host's echo replies back into
frames toward the guest. Every other ICMP type from the guest is dropped and counted
(ICMPv6 neighbour discovery never gets here: the relay answers it, link/ndp.py).

Kernel behaviour relied on (net/ipv4/ping.c, icmp(7) "ping sockets"):

* `socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)` (and `AF_INET6, IPPROTO_ICMPV6`, checked
  against the same sysctl, net/ipv6/ping.c) needs no privilege, but only if the
  caller's gid (or a supplementary group) is inside `net.ipv4.ping_group_range`
  (per network namespace); otherwise it fails with EACCES. The default of a new network
  namespace is "1 0", which allows nobody -- and that includes root: CAP_NET_RAW does
  not bypass the check (measured on Linux 6.18, as root, in the initial and in an
  `unshare -n` namespace). Root inside the namespace may widen the range.
* The kernel owns the ICMP identifier: the socket is bound to a "port" and that number
  replaces whatever identifier we send; replies are delivered to the socket whose port
  equals the reply's identifier. The sequence number and payload pass through as is.
  So one socket stands for one (guest identifier, destination) pair and the guest's
  identifier is put back in every reply; the kernel also fills in the request's checksum.
* recv() on a ping socket returns the ICMP header and payload, without the IP header;
  the kernel has verified the reply's checksum already and delivers only echo replies.

When a ping socket is refused (EACCES/EPERM) the session goes through the loop's shared
raw socket instead (host/icmp_raw.py: one per family, opened on first need), under an
identifier the relay allocates, the guest's own put back in each reply; a reply is
delivered only if its identifier, source and sequence number are a live session's.
Such sessions do not move in a handover (the raw socket stays with its process): the
guest's next echo opens a new one. Neither allowed: one warning naming the sysctl, and
every request dropped and counted (`drop_icmp_not_permitted`).

The sans-I/O parts (`parse_echo_request`, `parse_echo_reply`, `echo_reply_frame`,
`EchoTable`, `RawEchoIds`, `RecentSeqs`) are icmp_echo.py's; `IcmpEchoRelay` executes
them with sockets on an asyncio loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import TYPE_CHECKING

from relaynat.domains import NameTable
from relaynat.egress_gate import EgressGate, Verdict
from relaynat.events import SILENT, Endpoint, EventSink, FlowClosed, FlowOpened, endpoint
from relaynat.guest_log import guest_logger
from relaynat.host.flowinfo import FlowInfo, describe_echo
from relaynat.host.icmp_raw import RawEchoSockets
from relaynat.host.sockets import count_socket_failure
from relaynat.icmp_echo import (
    ICMP_HLEN,
    EchoMessage,
    EchoTable,
    RecentSeqs,
    echo_reply_frame,
    echo_request_message,
    parse_echo_reply,
    parse_echo_request,
)
from relaynat.packet_builder import IPV4_HLEN
from relaynat.wire import IPPROTO_ICMP, IPPROTO_ICMPV6, IPV6_HLEN, MalformedFrame

if TYPE_CHECKING:
    from relaynat.config import RelayConfig
    from relaynat.ratelimit import TokenBucket
    from relaynat.wire import IpPacket

log = guest_logger("relaynat.icmp")

#: Default of `IcmpEchoRelay`: an echo "session" without traffic either way for this
#: long is closed (Linux conntrack keeps ICMP for 30 s, passt 60 s). How many ping
#: sockets may be open at once is `RelayConfig.max_icmp_flows`; a request that would
#: need another is dropped and counted.
DEFAULT_IDLE_TIMEOUT_S = 60.0
#: Replies read per socket per readiness callback, so one chatty peer cannot starve
#: the loop.
_RECV_ROUNDS = 64
_TIMER_SLACK_S = 0.05
_SYSCTL_HINT = 'sysctl -w net.ipv4.ping_group_range="0 2147483647"'


#: Session key: (the guest's ICMP identifier, the destination as the guest sees it, the
#: guest's source address: an IPv6 guest may ping from several).
EchoKey = tuple[int, bytes, bytes]


@dataclass(slots=True, eq=False)
class EchoSession:
    key: EchoKey
    sock: socket.socket
    #: Where the destination is on the host (e.g. 127.0.0.1 for the mapped gateway).
    host_ip: str
    guest_ip: bytes
    guest_mac: bytes
    #: ICMP message bytes each way (header and payload), for listings.
    bytes_from_guest: int = 0
    bytes_to_guest: int = 0
    #: When the session opened (loop time), for its duration when it closes.
    opened_at: float = 0.0


@dataclass(slots=True, eq=False)
class RawEchoSession(EchoSession):
    """A session on the loop's shared raw socket (`sock`, not the session's to close):
    `raw_ident` is the identifier it sends under, `host_packed` its destination on the
    host, `seqs` the sequence numbers it sent lately."""

    raw_ident: int = 0
    host_packed: bytes = b""
    seqs: RecentSeqs = field(default_factory=RecentSeqs)


class IcmpEchoRelay:
    """The guest's pings: one ping socket per (identifier, destination).

    `send_frame` takes a complete frame without a virtio-net header (the relay adds one
    if the transport needs it). Counters go to `stats`; `on_packet` never raises for
    anything a guest or a peer can send: drops are counted as `drop_icmp_<reason>`.
    """

    def __init__(self, config: RelayConfig, loop: asyncio.AbstractEventLoop,
                 send_frame: Callable[[bytes], None], stats: Counter[str], *,
                 idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
                 max_sockets: int | None = None) -> None:
        self._config = config
        self._loop = loop
        self._send_frame = send_frame
        self.stats = stats
        self.sessions: EchoTable[EchoKey, EchoSession] = EchoTable(
            config.max_icmp_flows if max_sockets is None else max_sockets, idle_timeout_s)
        #: Sessions on the shared raw socket (ping sockets refused), same key; they
        #: share the `max_icmp_flows` bound with `sessions`.
        self.raw_sessions: EchoTable[EchoKey, RawEchoSession] = EchoTable(
            self.sessions.capacity, idle_timeout_s)
        self._raw: RawEchoSockets | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._ip_ident = 0
        self._warned_permission = False
        self._recv_buf = bytearray(0x10000)
        #: Largest ICMP message a reply frame may carry toward the guest, per family.
        self._max_icmp = config.mtu - IPV4_HLEN
        self._max_icmp6 = config.mtu - IPV6_HLEN
        self._subnet_broadcast = config.network_v4.broadcast_address.packed
        self._closed = False
        #: The egress policy's gate for a new echo session; set by the relay when a
        #: policy is in force. Denied requests are dropped, counted.
        self.gate: EgressGate | None = None
        #: The guest's DNS answers: a session's destination is held there while it
        #: lives, so that it stays valid for its names (set by the relay).
        self.names: NameTable | None = None
        #: The guest's new-flow rate, shared with TCP and UDP (set by the relay; None:
        #: unlimited): a new echo session spends a token, later echoes in it do not.
        self.rate_limit: TokenBucket | None = None
        #: Where sessions opening and closing are told (set by the relay).
        self.events: EventSink = SILENT

    # -- guest side ---------------------------------------------------------------------

    def on_packet(self, ip: IpPacket, host_ip: str | None, guest_mac: bytes) -> None:
        """An ICMP or ICMPv6 packet from the guest. `host_ip` is where its destination
        is on the host, in the same family (None: nowhere, the request is dropped)."""
        stats = self.stats
        try:
            req = parse_echo_request(ip)
        except MalformedFrame as exc:
            stats["drop_" + exc.reason] += 1
            return
        stats["icmp_echo_requests"] += 1
        if host_ip is None:
            stats["drop_icmp_no_host"] += 1
            return
        if (ip.dst[0] == 0xFF if len(ip.dst) == 16
                else ip.dst[0] >= 224 or ip.dst == self._subnet_broadcast):
            # Multicast, class E, limited and subnet broadcast: a ping socket would need
            # SO_BROADCAST, and one request could draw many replies from the host's LAN.
            stats["drop_icmp_not_unicast"] += 1
            return
        if self._closed:
            stats["drop_icmp_closed"] += 1
            return
        now = self._loop.time()
        key = (req.ident, ip.dst, ip.src)
        session = self.sessions.get(key)
        if session is None:
            session = self.raw_sessions.get(key)
        if session is None:
            verdict = None
            if self.gate is not None:
                verdict = self.gate.judge(ip.proto, ip.dst, 0, now)
                if not verdict.allow:
                    stats["drop_icmp_policy"] += 1
                    return
            session = self._open(key, host_ip, ip.src, guest_mac, now, verdict)
            if session is None:
                return
        else:
            session.guest_mac = guest_mac
            (self.raw_sessions if isinstance(session, RawEchoSession)
             else self.sessions).touch(key, now)
        if isinstance(session, RawEchoSession):
            self._send_raw(session, req)
            return
        # The kernel replaces the identifier with the socket's port and recomputes the
        # checksum; type, code, sequence and payload go out as the guest sent them.
        self._send_echo(session, ip.payload)

    def _send_echo(self, session: EchoSession, message: bytes | memoryview) -> None:
        """`message`, an echo request, to the session's host address on its socket;
        counted as sent, or dropped with the reason."""
        stats = self.stats
        try:
            session.sock.sendto(message, (session.host_ip, 0))
        except BlockingIOError:
            stats["drop_icmp_send_busy"] += 1
            return
        except OSError as exc:
            # EHOSTUNREACH/ENETUNREACH, EACCES for a broadcast address, EMSGSIZE...
            # ping(8) would print the error; the guest simply sees no reply.
            log.debug("ping to %s failed: %s", session.host_ip, exc)
            stats["drop_icmp_send_error"] += 1
            return
        stats["icmp_echo_sent"] += 1
        session.bytes_from_guest += len(message)

    def _open(self, key: EchoKey, host_ip: str, guest_ip: bytes, guest_mac: bytes,
              now: float, verdict: Verdict | None = None) -> EchoSession | None:
        stats = self.stats
        self._expire(now)
        if len(self.sessions) + len(self.raw_sessions) >= self.sessions.capacity:
            stats["drop_icmp_table_full"] += 1
            return None
        if self.rate_limit is not None and not self.rate_limit.allow(now):
            stats["drop_icmp_rate_limit"] += 1
            return None
        try:
            if len(guest_ip) == 16:
                sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM, socket.IPPROTO_ICMPV6)
            else:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):
                return self._open_raw(key, host_ip, guest_ip, guest_mac, now, verdict)
            else:
                count_socket_failure(stats, exc, "drop_icmp_fd_limit",
                                     "drop_icmp_socket_error", "ping")
            return None
        sock.setblocking(False)
        session = EchoSession(key, sock, host_ip, guest_ip, guest_mac, opened_at=now)
        self.sessions.add(key, session, now)
        self._loop.add_reader(sock.fileno(), self._on_readable, session)
        stats["icmp_sockets_opened"] += 1
        self._opened(session, verdict)
        return session

    def _opened(self, session: EchoSession, verdict: Verdict | None) -> None:
        """`session` entered a table: its address held for the domain rules, `events`
        told, with the policy's `verdict` on it when one was asked."""
        if self.names is not None:
            self.names.hold(session.key[1], self._loop.time())
        events = self.events
        if events.listening:
            ident, far, guest = session.key
            names: tuple[str, ...] = ()
            rule, comment = -1, ""
            if verdict is not None:
                names, rule, comment = verdict.names, verdict.rule, verdict.comment
            events.emit(FlowOpened(time.time(), events.guest, "icmp", "outbound",
                                   endpoint(guest, ident), endpoint(far, None),
                                   Endpoint(session.host_ip, None), names, None, rule,
                                   comment))
        self._arm_timer()

    def _not_permitted(self) -> None:
        self.stats["drop_icmp_not_permitted"] += 1
        if not self._warned_permission:
            self._warned_permission = True
            log.warning(
                "guest ping dropped: this process may not open ICMP ping sockets "
                "(net.ipv4.ping_group_range excludes its groups; a new network "
                "namespace allows nobody, not even root) nor raw ICMP sockets (no "
                "CAP_NET_RAW). To allow ping sockets, run: %s (in the relay's network "
                "namespace)", _SYSCTL_HINT)

    def prepare_raw(self) -> bool:
        """Open the raw sockets now if ping sockets are refused and this process may
        (e.g. before it drops CAP_NET_RAW: later ones would be refused); True if pings
        will have a way out. Without this they open on the first echo that needs them."""
        try:
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP).close()
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM):
                return False
        else:
            return True
        raw = self._raw if self._raw is not None else RawEchoSockets.of(self._loop)
        opened = False
        for v6 in (False, True):
            try:
                raw.get_socket(v6, self.stats)
                opened = True
            except OSError as exc:  # no CAP_NET_RAW, or no IPv6 on this host
                log.debug("no raw ICMP%s socket: %s", "v6" if v6 else "", exc)
        if opened and self._raw is None:
            self._raw = raw
            raw.attach(self)
        return opened

    def _open_raw(self, key: EchoKey, host_ip: str, guest_ip: bytes, guest_mac: bytes,
                  now: float, verdict: Verdict | None = None) -> RawEchoSession | None:
        """A session on the shared raw socket, ping sockets being refused."""
        stats = self.stats
        v6 = len(guest_ip) == 16
        raw = self._raw if self._raw is not None else RawEchoSockets.of(self._loop)
        try:
            sock = raw.get_socket(v6, stats)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):
                self._not_permitted()
            else:
                count_socket_failure(stats, exc, "drop_icmp_fd_limit",
                                     "drop_icmp_socket_error", "raw ICMP")
            return None
        if self._raw is None:
            self._raw = raw
            raw.attach(self)
        host_packed = ip_address(host_ip).packed
        session = RawEchoSession(key, sock, host_ip, guest_ip, guest_mac, opened_at=now,
                                 host_packed=host_packed)
        try:
            session.raw_ident = raw.ids.allocate(host_packed, (self, session))
        except OverflowError:
            stats["drop_icmp_ids_exhausted"] += 1
            return None
        self.raw_sessions.add(key, session, now)
        stats["icmp_raw_sessions_opened"] += 1
        self._opened(session, verdict)
        return session

    def _send_raw(self, session: RawEchoSession, req: EchoMessage) -> None:
        v6 = len(session.guest_ip) == 16
        # The guest's type, code, sequence and payload under our identifier.
        message = echo_request_message(session.raw_ident, req.seq, req.payload, v6=v6)
        session.seqs.sent(req.seq)
        self._send_echo(session, message)

    def raw_reply(self, session: RawEchoSession, reply: EchoMessage) -> None:
        """A reply on the raw socket whose source and identifier are `session`'s
        (RawEchoSockets matched them): delivered if it answers a sequence number the
        session sent, else ignored (another process pinging under the same identifier)."""
        if reply.seq not in session.seqs or self.raw_sessions.get(session.key) is not session:
            self.stats["icmp_raw_replies_ignored"] += 1
            return
        self.raw_sessions.touch(session.key, self._loop.time())
        self._deliver(session, reply)

    # -- host side ----------------------------------------------------------------------

    def _on_readable(self, session: EchoSession) -> None:
        stats = self.stats
        sock = session.sock
        buf = self._recv_buf
        view = memoryview(buf)
        for _ in range(_RECV_ROUNDS):
            try:
                n, addr = sock.recvfrom_into(buf)
            except BlockingIOError:
                break
            except OSError as exc:
                # An ICMP error about an earlier request (e.g. host unreachable) is
                # reported once as a socket error; the socket stays usable.
                log.debug("ping socket for %s: %s", session.host_ip, exc)
                stats["icmp_host_errors"] += 1
                if sock.fileno() < 0:  # closed meanwhile
                    return
                continue
            self._on_reply(session, view[:n], addr[0])
        self.sessions.touch(session.key, self._loop.time())

    def _on_reply(self, session: EchoSession, data: memoryview, peer: str) -> None:
        stats = self.stats
        if peer != session.host_ip:
            stats["drop_icmp_reply_foreign"] += 1
            return
        try:
            reply = parse_echo_reply(data)
        except MalformedFrame as exc:
            stats["drop_" + exc.reason] += 1
            return
        self._deliver(session, reply)

    def _deliver(self, session: EchoSession, reply: EchoMessage) -> None:
        """The reply frame toward the guest, with its own identifier and addresses."""
        stats = self.stats
        limit = self._max_icmp6 if len(session.guest_ip) == 16 else self._max_icmp
        if ICMP_HLEN + len(reply.payload) > limit:
            stats["drop_icmp_reply_too_big"] += 1
            return
        self._ip_ident = (self._ip_ident + 1) & 0xFFFF
        guest_ident, guest_dst, _ = session.key
        frame = echo_reply_frame(
            dst_mac=session.guest_mac, src_mac=self._config.gateway_mac, src=guest_dst,
            dst=session.guest_ip, ident=guest_ident, seq=reply.seq, payload=reply.payload,
            ip_ident=self._ip_ident)
        stats["icmp_echo_replies"] += 1
        session.bytes_to_guest += ICMP_HLEN + len(reply.payload)
        self._send_frame(frame)

    # -- timers and teardown ------------------------------------------------------------

    def _arm_timer(self) -> None:
        if self._timer is not None or self._closed:
            return
        deadlines = [d for d in (self.sessions.next_deadline(),
                                 self.raw_sessions.next_deadline()) if d is not None]
        if deadlines:
            deadline = min(deadlines)
            # asyncio may run a timer up to its clock resolution early: add slack so
            # the session is due when we look, rather than re-arming in a tight loop.
            self._timer = self._loop.call_at(deadline + _TIMER_SLACK_S, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._expire(self._loop.time())
        self._arm_timer()

    def _expire(self, now: float) -> None:
        for _key, session in self.sessions.expired(now):
            self._close_session(session, "timeout")
            self.stats["icmp_sockets_expired"] += 1
        for _key, raw_session in self.raw_sessions.expired(now):
            self._close_session(raw_session, "timeout")
            self.stats["icmp_raw_sessions_expired"] += 1

    def _close_session(self, session: EchoSession, how: str) -> None:
        """Close the session's socket (a raw session: free its identifier); it has left
        its table, `how` (events.py's words)."""
        if isinstance(session, RawEchoSession):
            if self._raw is not None:
                self._raw.ids.release(session.host_packed, session.raw_ident)
            self._ended(session, how)
            return
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(session.sock.fileno())
        session.sock.close()
        self._ended(session, how)

    def _ended(self, session: EchoSession, how: str) -> None:
        if self.names is not None:
            self.names.release(session.key[1], self._loop.time())
        events = self.events
        if events.listening:
            ident, far, guest = session.key
            events.emit(FlowClosed(time.time(), events.guest, "icmp", "outbound",
                                   endpoint(guest, ident), endpoint(far, None),
                                   session.bytes_from_guest, session.bytes_to_guest,
                                   max(0.0, self._loop.time() - session.opened_at), how))

    # -- moving sessions to another relay (host/flow_move.py) -------------------------------

    def take(self, session: EchoSession) -> float:
        """Take `session` out of this relay, its socket open and no longer read (replies
        arriving meanwhile wait in it), as if it ended here ("detached"); returns when
        it saw its last packet (loop time)."""
        last = self.sessions.last_seen(session.key)
        self.sessions.pop(session.key)
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(session.sock.fileno())
        self._ended(session, "detached")
        return self._loop.time() if last is None else last

    def adopt(self, session: EchoSession, last_seen: float) -> None:
        """Serve `session` (moved here from another relay, or given back to this one) on
        its ping socket (non-blocking), last seen at `last_seen` (this loop's time). The
        caller checked that the table has room and no session with its key."""
        self.sessions.add(session.key, session, last_seen)
        self._loop.add_reader(session.sock.fileno(), self._on_readable, session)
        if self.names is not None:
            self.names.hold(session.key[1], self._loop.time())
        events = self.events
        if events.listening:
            ident, far, guest = session.key
            events.emit(FlowOpened(time.time(), events.guest, "icmp", "outbound",
                                   endpoint(guest, ident), endpoint(far, None),
                                   Endpoint(session.host_ip, None)))
        if self._timer is not None:  # armed for a later deadline than this session's
            self._timer.cancel()
            self._timer = None
        self._arm_timer()

    def describe_raw_flows(self) -> list[FlowInfo]:
        """The sessions on the shared raw sockets only: what a handover leaves behind."""
        return [describe_echo(session) for _key, session in self.raw_sessions.items()]

    def describe_flows(self) -> list[FlowInfo]:
        return [describe_echo(session) for table in (self.sessions, self.raw_sessions)
                for _key, session in table.items()]

    def cut(self, denied: Callable[[int, bytes, int], bool]) -> int:
        """Close every session whose destination `denied(proto, dst, 0)` now refuses;
        returns how many."""
        count = 0
        for table in (self.sessions, self.raw_sessions):
            gone = [session for _key, session in table.items()
                    if denied(IPPROTO_ICMPV6 if len(session.key[1]) == 16 else IPPROTO_ICMP,
                              session.key[1], 0)]
            for session in gone:
                table.pop(session.key)
                self._close_session(session, "policy_cut")
            count += len(gone)
        return count

    def close(self) -> None:
        """Close every ping socket and the timer; later requests are dropped."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for session in self.sessions.clear():
            self._close_session(session, "detached")
        for raw_session in self.raw_sessions.clear():
            self._close_session(raw_session, "detached")
        if self._raw is not None:
            self._raw.detach(self)
            self._raw = None

    @property
    def socket_count(self) -> int:
        """Open ping sockets (a gauge for the relay's stats); sessions on the shared raw
        socket are `raw_session_count`."""
        return len(self.sessions)

    @property
    def raw_session_count(self) -> int:
        """Sessions on the shared raw sockets now."""
        return len(self.raw_sessions)

