"""UDP without a guest kernel: the flow table (udp_flow.py) against a model, the ICMP
port-unreachable and UDP frames, and a Relay in the test's own event loop routing a
guest's datagrams (DNS, DHCP, refusals) and relaying one to a loopback peer and back.
A real guest kernel: tests/integration/test_udp.py.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from ipaddress import IPv4Address

import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaynat.config import RelayConfig
from relaynat.packet_builder import icmp_unreachable_frame, udp_frame, udp_frame_head
from relaynat.relay import Relay
from relaynat.udp_flow import UdpFlowTable


def test_table_limit_and_remove() -> None:
    table = UdpFlowTable(limit=2, idle_s=30, stream_s=120)
    a = table.open((1, b"\x0a\x00\x02\x02", 53), 0.0)
    b = table.open((2, b"\x0a\x00\x02\x02", 53), 0.0)
    assert a is not None and b is not None
    assert table.open((3, b"\x0a\x00\x02\x02", 53), 0.0) is None
    table.remove(a)
    assert table.open((3, b"\x0a\x00\x02\x02", 53), 0.0) is not None
    with pytest.raises(KeyError):
        table.open((2, b"\x0a\x00\x02\x02", 53), 0.0)


def test_timeouts_one_way_30s_both_ways_120s_from_last_activity() -> None:
    table = UdpFlowTable(limit=10, idle_s=30, stream_s=120)
    one_way = table.open((1, b"\x01\x02\x03\x04", 9), 0.0)
    stream = table.open((2, b"\x01\x02\x03\x04", 9), 0.0)
    assert one_way is not None and stream is not None
    one_way.from_guest(10.0, b"q")
    stream.from_guest(10.0, b"q")
    stream.from_host(20.0)
    assert table.next_deadline() == 40.0
    assert list(table.expired(39.9)) == []
    assert list(table.expired(40.0)) == [one_way]
    assert list(table.expired(139.9)) == []
    stream.from_guest(130.0, b"q")  # traffic postpones it
    assert table.next_deadline() == 250.0
    assert list(table.expired(250.0)) == [stream]
    assert len(table) == 0 and table.next_deadline() is None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["open", "guest", "host", "remove", "expire"]),
                          st.integers(0, 5), st.floats(0, 50)), max_size=60))
def test_table_matches_a_simple_model(ops: list[tuple[str, int, float]]) -> None:
    table = UdpFlowTable(limit=3, idle_s=30, stream_s=120)
    model: dict[int, tuple[float, bool]] = {}  # port -> (last activity, replied)
    now = 0.0
    for op, port, step in ops:
        now += step
        key = (port, b"\x7f\x00\x00\x01", 7)
        flow = table.get(key)
        assert (flow is not None) == (port in model)
        if op == "open" and flow is None:
            opened = table.open(key, now)
            assert (opened is not None) == (len(model) < 3)
            if opened is not None:
                model[port] = (now, False)
        elif op == "guest" and flow is not None:
            flow.from_guest(now, b"q")
            model[port] = (now, model[port][1])
        elif op == "host" and flow is not None:
            flow.from_host(now)
            model[port] = (now, True)
        elif op == "remove" and flow is not None:
            table.remove(flow)
            del model[port]
        elif op == "expire":
            gone = {f.key[0] for f in table.expired(now)}
            due = {p for p, (last, replied) in model.items()
                   if last + (120 if replied else 30) <= now}
            assert gone == due
            for p in due:
                del model[p]
        assert len(table) == len(model) <= 3


def test_icmp_port_unreachable_frame_parses_and_quotes_the_datagram() -> None:
    guest_dgram = udp_frame(b"\x02" * 6, b"\x52" * 6, bytes([10, 0, 2, 15]),
                            bytes([10, 0, 2, 2]), 40000, 9999, b"payload")
    ip_packet = guest_dgram[14:]
    quote = ip_packet[:28]
    frame = icmp_unreachable_frame(b"\x02" * 6, b"\x52" * 6, bytes([10, 0, 2, 2]),
                                   bytes([10, 0, 2, 15]), quote, ident=5)
    eth = dpkt.ethernet.Ethernet(frame)
    ip = eth.data
    assert isinstance(ip, dpkt.ip.IP) and ip.p == dpkt.ip.IP_PROTO_ICMP
    assert dpkt.in_cksum(bytes(frame[14:34])) == 0
    icmp_bytes = bytes(frame[34:])
    assert dpkt.in_cksum(icmp_bytes) == 0
    assert icmp_bytes[:2] == b"\x03\x03" and icmp_bytes[4:8] == bytes(4)
    assert icmp_bytes[8:] == quote
    inner = dpkt.ip.IP(icmp_bytes[8:] + b"payload")
    assert (inner.udp.sport, inner.udp.dport) == (40000, 9999)


class _FakeTransport:
    """Collects what the relay sends; has a 12-byte vnet header like a TAP with offload."""

    vnet_hdr_len = 12
    offload = True

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def start(self, sink: object) -> None:
        pass

    def send(self, head: bytes, payload: bytes | memoryview = b"") -> None:
        self.frames.append(bytes(head) + bytes(payload))

    def close(self) -> None:
        pass

    @property
    def ipv4(self) -> list[bytes]:
        """The IPv4 frames (attach also sends an IPv6 router advertisement)."""
        return [f for f in self.frames if f[24:26] == b"\x08\x00"]


GUEST_MAC = b"\x02\x00\x00\x00\x00\x0f"


def _guest_udp(dst: str, dport: int, payload: bytes, sport: int = 40000,
               src: str = "10.0.2.15") -> memoryview:
    return memoryview(udp_frame(b"\x52\x55\x0a\x00\x02\x02", GUEST_MAC, IPv4Address(src).packed,
                                IPv4Address(dst).packed, sport, dport, payload))


async def test_relay_routes_udp_dns_and_dhcp_and_drops_what_has_no_destination() -> None:
    import dpkt.dns

    config = RelayConfig(dns_records=(("static.test", "192.0.2.77"),),
                         dns_upstream=IPv4Address("127.0.0.1"))
    transport = _FakeTransport()
    async with Relay(config) as relay:
        relay.attach(transport)  # type: ignore[arg-type]
        query = dpkt.dns.DNS(id=99, rd=1)
        query.qd = [dpkt.dns.DNS.Q(name="static.test", type=dpkt.dns.DNS_A)]
        relay.handle_frame(_guest_udp("10.0.2.3", 53, bytes(query), sport=5353))
        relay.handle_frame(_guest_udp("10.0.2.3", 54, b"x"))  # DNS address, not port 53
        relay.handle_frame(_guest_udp("224.0.0.251", 5353, b"x"))  # mDNS: multicast
        relay.handle_frame(_guest_udp("10.0.2.15", 9, b"x"))  # itself
        relay.handle_frame(_guest_udp("10.0.2.2", 9, b"x", src="0.0.0.0"))  # not DHCP
        stats = relay.stats()
    assert stats["dns_static_answers"] == 1
    assert stats["drop_udp_unmapped_destination"] == 1  # to the guest's own address
    assert stats["udp_refused_unmapped"] == 1  # the DNS address on port 54
    assert stats["drop_udp_multicast_or_broadcast"] == 1
    assert stats["drop_ip_spoofed_source"] == 1
    assert stats.get("udp_flows_opened", 0) == 0
    frame, refusal = transport.ipv4
    icmp = bytes(dpkt.ethernet.Ethernet(refusal[12:]).data.data)
    assert icmp[:2] == b"\x03\x03"  # destination unreachable, port unreachable
    assert dpkt.ip.IP(icmp[8:] + b"x").udp.dport == 54
    assert frame[:12] == bytes(12)  # a zero virtio-net header: nothing to offload
    eth = dpkt.ethernet.Ethernet(frame[12:])
    assert eth.dst == GUEST_MAC
    answer = dpkt.dns.DNS(eth.data.data.data)
    assert (eth.data.data.sport, eth.data.data.dport) == (53, 5353)
    assert answer.id == 99 and [rr.rdata for rr in answer.an] == [bytes([192, 0, 2, 77])]


async def test_relay_udp_to_a_host_peer_and_back_in_process() -> None:
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.setblocking(False)
    port = peer.getsockname()[1]
    transport = _FakeTransport()
    loop = asyncio.get_running_loop()
    async with Relay(RelayConfig(mtu=1500)) as relay:
        relay.attach(transport)  # type: ignore[arg-type]
        relay.handle_frame(_guest_udp("10.0.2.2", port, b"ping"))
        data, addr = await loop.sock_recvfrom(peer, 100)
        assert data == b"ping"
        peer.sendto(b"pong", addr)
        peer.sendto(b"x" * 1473, addr)  # does not fit MTU 1500 in one frame
        peer.sendto(b"y" * 1472, addr)
        for _ in range(100):
            if len(transport.ipv4) >= 2:
                break
            await asyncio.sleep(0.01)
        stats = relay.stats()
    peer.close()
    payloads = [dpkt.ethernet.Ethernet(f[12:]).data.data.data for f in transport.ipv4]
    assert payloads == [b"pong", b"y" * 1472]
    assert stats["udp_drop_too_big_for_mtu"] == 1 and stats["udp_flows"] == 1
    udp = dpkt.ethernet.Ethernet(transport.ipv4[0][12:]).data.data
    assert (udp.sport, udp.dport) == (port, 40000)


def test_a_fixed_timeout_overrides_idle_and_stream() -> None:
    table = UdpFlowTable(limit=10, idle_s=30, stream_s=120)
    dns = table.open((1, b"\x0a\x00\x02\x03", 53), 0.0, fixed_timeout=10.0)
    assert dns is not None
    dns.from_host(5.0)
    assert table.next_deadline() == 15.0
    assert list(table.expired(15.0)) == [dns]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000), st.integers(0, 0xFFFF), st.integers(1, 0xFFFF))
def test_udp_frame_head_full_and_partial_checksums(payload: bytes, ident: int,
                                                   port: int) -> None:
    from relaynat.checksum import finish, partial_sum

    args = (b"\x02" * 6, b"\x52" * 6, bytes([127, 0, 0, 1]), bytes([10, 0, 2, 15]), port, 53,
            payload, ident)
    # No vnet header: exactly what udp_frame builds, payload excluded.
    assert udp_frame_head(*args) + payload == udp_frame(*args)
    assert udp_frame_head(*args, vnet_hdr_len=12) == bytes(12) + udp_frame_head(*args)
    # Offload: NEEDS_CSUM from byte 34, field at +6 holds the folded pseudo-header sum;
    # completing it over the UDP header and payload (what the guest kernel or a NIC does)
    # gives udp_frame's checksum.
    head = udp_frame_head(*args, vnet_hdr_len=12, offload=True)
    flags, _gso, _hl, _gs, csum_start, csum_offset = struct.unpack_from("=BBHHHH", head)
    assert (flags, csum_start, csum_offset) == (1, 34, 6)
    udp = head[12 + 34:]
    done = finish(partial_sum(udp + payload))
    assert done == struct.unpack_from("!H", udp_frame(*args), 40)[0]
