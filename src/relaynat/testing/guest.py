"""`InMemoryGuest`: a whole `Relay` on a socketpair, driven frame by frame from a test.

The relay is the real one, attached with the real qemu stream transport (4-byte
length + frame, transports/stream.py) to one end of an AF_UNIX socketpair; the test holds the
other end and plays the guest (a frame that framing cannot carry, such as a broken one
under 14 bytes, is handed to the relay directly, in its turn: see `InMemoryGuest.send`).
Nothing is mocked: the relay's host side opens real sockets (so TCP/UDP/ICMP toward the
gateway reach the host's loopback), and no root, TAP device or namespace is needed. The
relay's DNS upstream defaults to 127.0.0.1 so that a test's traffic never leaves
loopback.

    async with InMemoryGuest() as guest:
        await guest.send(frames.arp_request(guest.addressing, guest.addressing.gateway4))
        reply = await guest.expect(lambda r: r.arp is not None)
        assert reply.arp.sender_mac == guest.config.gateway_mac
"""

from __future__ import annotations

import asyncio
import fcntl
import socket
import struct
import termios
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address

from relaynat.config import RelayConfig
from relaynat.guest_log import guest_scope
from relaynat.policy import Policy
from relaynat.relay import Relay
from relaynat.testing import frames as f
from relaynat.testing.sink import sink
from relaynat.transports.stream import MAX_FRAME, MIN_FRAME, StreamTransport
from relaynat.wire import (
    ACK,
    ETHERTYPE_ARP,
    ETHERTYPE_IPV4,
    ETHERTYPE_IPV6,
    FIN,
    IPPROTO_TCP,
    IPPROTO_UDP,
    PSH,
    SYN,
    ArpPacket,
    EthernetFrame,
    IpPacket,
    TcpSegment,
    UdpDatagram,
    parse_arp,
    parse_ethernet,
    parse_ipv4,
    parse_ipv6,
    parse_tcp,
    parse_udp,
)

_LEN = struct.Struct("!I")


@dataclass(slots=True)
class Reply:
    """One frame from the relay, parsed as far as it goes (None: not that protocol)."""

    data: bytes
    eth: EthernetFrame
    arp: ArpPacket | None = None
    ip: IpPacket | None = None
    tcp: TcpSegment | None = None
    udp: UdpDatagram | None = None

    @classmethod
    def parse(cls, data: bytes) -> Reply:
        """Parse with relaynat.wire; raises wire.MalformedFrame if the relay sent garbage."""
        eth = parse_ethernet(memoryview(data))
        reply = cls(data, eth)
        if eth.ethertype == ETHERTYPE_ARP:
            reply.arp = parse_arp(eth.payload)
        elif eth.ethertype in (ETHERTYPE_IPV4, ETHERTYPE_IPV6):
            ip = parse_ipv4(eth.payload) if eth.ethertype == ETHERTYPE_IPV4 \
                else parse_ipv6(eth.payload)
            reply.ip = ip
            if ip.proto == IPPROTO_TCP:
                reply.tcp = parse_tcp(ip)
            elif ip.proto == IPPROTO_UDP:
                reply.udp = parse_udp(ip)
        return reply


class InMemoryGuest:
    """A relay plus the guest's end of its link (see the module docstring).

    `config` defaults to `RelayConfig(dns_upstream=127.0.0.1)`; `guest_mac` is the
    MAC the kit's frames come from. Use as ``async with`` inside a running loop.
    With `relay`, the guest drives that started relay (say one of a `Guests`), which
    keeps its own config and policy and stays open when the guest closes.

    While it runs, the guest serves the kit's sink (`sink_port`): the strategies' TCP
    and UDP frames to the gateway go there by default, and reach a listener that takes
    everything and answers nothing, rather than a service of the machine's own.
    """

    def __init__(self, config: RelayConfig | None = None, *, policy: Policy | None = None,
                 guest_mac: bytes = f.GUEST_MAC, relay: Relay | None = None) -> None:
        if relay is not None and (config is not None or policy is not None):
            raise ValueError("a given relay brings its own config and policy")
        self._owns_relay = relay is None
        self.relay = relay or Relay(config or RelayConfig(dns_upstream=IPv4Address("127.0.0.1")),
                                    policy)
        self.config = self.relay.config
        self.addressing = f.Addressing.of(self.config, guest_mac)
        self._sock: socket.socket | None = None
        self._transport: StreamTransport | None = None
        self._serving_sink = False
        self._buf = bytearray()
        self._backlog: deque[Reply] = deque()

    async def __aenter__(self) -> InMemoryGuest:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start the relay and attach the link (`async with` calls it)."""
        if self._owns_relay:
            self.relay.start()
        sink().acquire(asyncio.get_running_loop())
        self._serving_sink = True
        relay_end, guest_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        guest_end.setblocking(False)
        self._sock = guest_end
        self._transport = StreamTransport(relay_end, self.config.guest_queue_limit)
        self.relay.attach(self._transport)

    def close(self) -> None:
        """Close the relay (or, given one, detach from it) and the guest's end of the link."""
        if self._owns_relay:
            self.relay.close()
        else:
            self.relay.detach()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._serving_sink:
            self._serving_sink = False
            sink().release()

    @property
    def sink_port(self) -> int:
        """The kit's sink: a frame to the gateway at this port, TCP or UDP, reaches a
        loopback listener the kit owns (host 127.0.0.1 and ::1), which reads and
        discards everything while a guest runs (relaynat.testing.sink)."""
        return sink().port

    def stats(self) -> dict[str, int]:
        """The relay's `stats()`."""
        return self.relay.stats()

    # -- frames ------------------------------------------------------------------------

    async def send(self, frame: bytes) -> None:
        """Send one frame to the relay, as the guest's NIC would: whatever its bytes
        and its length, the relay handles it (and counts it, if it drops it).

        The link's stream framing cannot carry a frame under 14 bytes or over 65535 (the
        relay's transport reads such a length as lost framing and closes the link), so
        such a frame goes to the relay as a transport of your own would hand it over
        (`FrameSink.handle_frame`), once every frame sent before it was handled."""
        assert self._sock is not None, "start() first"
        if MIN_FRAME <= len(frame) <= MAX_FRAME:
            await asyncio.get_running_loop().sock_sendall(
                self._sock, _LEN.pack(len(frame)) + frame)
            return
        await self.delivered()
        with guest_scope(self.relay.name):  # as the transport's reader runs it
            self.relay.handle_frame(memoryview(frame))
            self.relay.end_of_batch()

    async def delivered(self, timeout: float = 2.0) -> None:
        """Wait until the relay has handled every frame sent so far, so that its
        `stats()` count them; ConnectionError if the relay no longer reads the link (it
        closed it, or the link went to another relay), TimeoutError after `timeout`."""
        transport = self._transport
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if (transport is None or transport.closed
                    or self.relay.transport is not transport):
                raise ConnectionError("the relay no longer reads the guest's link")
            # Nothing left in the socket, nor read and not yet handed to the relay: the
            # transport reads and delivers in one callback, ending the batch, so every
            # frame written before has been handled.
            if not _unread(transport.sock) and not transport.handover_state()[0]:
                return
            if loop.time() > deadline:
                raise TimeoutError(f"the relay did not read the guest's frames in {timeout} s")
            await asyncio.sleep(0)

    async def recv(self, timeout: float = 2.0) -> Reply:
        """The next frame from the relay (skipped ones first); TimeoutError if none."""
        if self._backlog:
            return self._backlog.popleft()
        return Reply.parse(await asyncio.wait_for(self._read_frame(), timeout))

    async def expect(self, match: Callable[[Reply], bool], timeout: float = 2.0) -> Reply:
        """The first frame from the relay that `match`es; the others are kept, in order,
        for later `recv`/`expect` calls (router advertisements arrive unasked)."""
        for i, reply in enumerate(self._backlog):
            if match(reply):
                del self._backlog[i]
                return reply
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"no matching frame from the relay in {timeout} s; "
                                   f"{len(self._backlog)} others received")
            reply = Reply.parse(await asyncio.wait_for(self._read_frame(), left))
            if match(reply):
                return reply
            self._backlog.append(reply)

    async def _read_frame(self) -> bytes:
        assert self._sock is not None, "start() first"
        loop = asyncio.get_running_loop()
        while True:
            if len(self._buf) >= 4:
                (length,) = _LEN.unpack_from(self._buf)
                if len(self._buf) >= 4 + length:
                    frame = bytes(self._buf[4:4 + length])
                    del self._buf[:4 + length]
                    return frame
            chunk = await loop.sock_recv(self._sock, 1 << 16)
            if not chunk:
                raise EOFError("the relay closed the guest's link")
            self._buf += chunk

    # -- TCP ---------------------------------------------------------------------------

    async def tcp_connect(self, dport: int, *, v6: bool = False, sport: int = 40000,
                          isn: int = 1000, timeout: float = 5.0) -> GuestTcp:
        """Open a connection to the gateway's `dport` (the host's loopback port): SYN,
        wait for the SYN-ACK (sent once the host connect() succeeded), ACK it."""
        conn = GuestTcp(self, v6, sport, dport, isn)
        await self.send(conn.frame(SYN, seq=isn, ack=0,
                                   options=b"\x02\x04\x05\xb4\x01\x03\x03\x07"))
        synack = await self.expect(conn.matches, timeout)
        assert synack.tcp is not None
        if synack.tcp.flags & (SYN | ACK) != SYN | ACK:
            raise ConnectionRefusedError(f"the relay answered flags {synack.tcp.flags:#x}")
        conn.rcv_nxt = (synack.tcp.seq + 1) & 0xFFFFFFFF
        await self.send(conn.frame(ACK))
        return conn


def _unread(sock: socket.socket) -> int:
    """Bytes waiting in `sock`'s receive queue (SIOCINQ, which is FIONREAD)."""
    (count,) = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, bytes(4)))
    return int(count)


class GuestTcp:
    """The guest's end of one TCP connection: no retransmission, no window logic, a
    test's scripted peer. `snd_nxt`/`rcv_nxt` are plain RFC 9293 §3.3.1 variables."""

    def __init__(self, guest: InMemoryGuest, v6: bool, sport: int, dport: int,
                 isn: int) -> None:
        self.guest, self.v6, self.sport, self.dport = guest, v6, sport, dport
        self.snd_nxt = (isn + 1) & 0xFFFFFFFF
        self.rcv_nxt = 0
        self.received = bytearray()

    def matches(self, reply: Reply) -> bool:
        """Whether `reply` is a segment of this connection."""
        seg = reply.tcp
        return seg is not None and seg.sport == self.dport and seg.dport == self.sport

    def frame(self, flags: int, payload: bytes = b"", *, seq: int | None = None,
              ack: int | None = None, options: bytes = b"") -> bytes:
        """A segment of this connection with `flags` and `payload`, at `snd_nxt` and
        acknowledging `rcv_nxt` unless `seq`/`ack` say otherwise; nothing is sent."""
        return f.tcp_segment(self.guest.addressing, self.v6, self.sport, self.dport,
                             self.snd_nxt if seq is None else seq,
                             self.rcv_nxt if ack is None else ack, flags, 65535, payload,
                             options)

    async def send(self, data: bytes) -> None:
        """Send `data` as one segment (it must fit the relay's MSS) and wait for its ACK."""
        await self.guest.send(self.frame(ACK | PSH, data))
        self.snd_nxt = (self.snd_nxt + len(data)) & 0xFFFFFFFF
        await self.guest.expect(self._acks(self.snd_nxt))

    def _acks(self, want: int) -> Callable[[Reply], bool]:
        def match(reply: Reply) -> bool:
            self._take(reply)
            seg = reply.tcp
            return (self.matches(reply) and seg is not None and bool(seg.flags & ACK)
                    and seg.ack == want)
        return match

    def _take(self, reply: Reply) -> bool:
        """Keep in-order data that arrives while waiting for something else."""
        seg = reply.tcp
        if not self.matches(reply) or seg is None or not seg.payload:
            return False
        if seg.seq == self.rcv_nxt:
            self.received += seg.payload
            self.rcv_nxt = (self.rcv_nxt + len(seg.payload)) & 0xFFFFFFFF
        return False

    async def recv_exactly(self, n: int, timeout: float = 5.0) -> bytes:
        """Read until `n` bytes arrived in order, ACKing each data segment."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.received) < n:
            reply = await self.guest.expect(
                lambda r: self.matches(r) and r.tcp is not None and bool(r.tcp.payload),
                max(0.01, deadline - loop.time()))
            self._take(reply)
            await self.guest.send(self.frame(ACK))
        out = bytes(self.received[:n])
        del self.received[:n]
        return out

    async def close(self) -> Reply:
        """Send a FIN and return the relay's ACK of it."""
        await self.guest.send(self.frame(FIN | ACK))
        self.snd_nxt = (self.snd_nxt + 1) & 0xFFFFFFFF
        return await self.guest.expect(self._acks(self.snd_nxt))


__all__ = ["GuestTcp", "InMemoryGuest", "Reply"]
