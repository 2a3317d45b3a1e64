"""Per-frame costs of relaynat's hot path, with pytest-benchmark (no I/O, no root):

    python -m pytest benches/test_micro.py [--benchmark-json out.json]

Not collected by the default `pytest` run (testpaths is tests/). Frames are built with
the relay's own TcpFrameTemplate playing the guest, so parse costs are those of real
frames with valid checksums; the TcpNatEntry benchmarks drive the sans-I/O core the way
host/tcp_relay.py does (tests/support/tcp_sim.py and tests/unit/test_nat_entry.py do the
same with faults), one segment at a time, so each round is one frame's worth of protocol work.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from relaynat.checksum import internet_checksum, partial_sum
from relaynat.nat_entry import TcpNatEntry
from relaynat.packet_builder import TcpFrameTemplate, tcp_options_syn
from relaynat.tcp_state import TcpState
from relaynat.window import SocketFacts, TcpInfo
from relaynat.wire import (
    ACK,
    PSH,
    SYN,
    TcpSegment,
    parse_ethernet,
    parse_ipv4,
    parse_tcp,
    parse_tcp4_fast,
)

GUEST_MAC, RELAY_MAC = b"\x52\x54\x00\x12\x34\x56", b"\x52\x55\x0a\x00\x02\x02"
GUEST_IP, REMOTE_IP = bytes([10, 0, 2, 15]), bytes([10, 0, 2, 2])
GUEST_PORT, REMOTE_PORT = 40000, 5201
MTU = 65520
SIZES = {"66B": 0, "1460B": 1460, "64KiB": 65480 - 12}  # payload bytes (66 B: a bare ACK)
FACTS = SocketFacts(TcpInfo(rtt_us=50, rcv_space=1 << 20, snd_wnd=4 << 20), 4 << 20, 0)


def guest_template(offload: bool = False, timestamps: bool = False) -> TcpFrameTemplate:
    """Frames as the guest sends them (src = guest)."""
    return TcpFrameTemplate(dst_mac=RELAY_MAC, src_mac=GUEST_MAC, src=GUEST_IP, dst=REMOTE_IP,
                            sport=GUEST_PORT, dport=REMOTE_PORT,
                            vnet_hdr_len=12 if offload else 0, offload=offload,
                            timestamps=timestamps)


def relay_template(offload: bool = False) -> TcpFrameTemplate:
    """Frames toward the guest, as tcp_relay builds them."""
    return TcpFrameTemplate(dst_mac=GUEST_MAC, src_mac=RELAY_MAC, src=REMOTE_IP, dst=GUEST_IP,
                            sport=REMOTE_PORT, dport=GUEST_PORT,
                            vnet_hdr_len=12 if offload else 0, offload=offload)


def guest_frame(payload: bytes, flags: int = ACK | PSH, seq: int = 1000,
                options: bytes | None = None) -> bytes:
    return guest_template().build(seq, 5000, flags, 0xFFFF, payload, options) + payload


# -- parse ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", list(SIZES))
def test_parse_tcp_frame(benchmark: Any, size: str) -> None:
    """wire.parse_ethernet + parse_ipv4 (header checksum verified) + parse_tcp."""
    frame = memoryview(guest_frame(random.randbytes(SIZES[size])))

    def parse() -> TcpSegment:
        return parse_tcp(parse_ipv4(parse_ethernet(frame).payload))

    seg = benchmark(parse)
    assert len(seg.payload) == SIZES[size]


@pytest.mark.parametrize("timestamps", [False, True], ids=["plain", "ts"])
def test_parse_tcp_frame_fast(benchmark: Any, timestamps: bool) -> None:
    """wire.parse_tcp4_fast, the data path's parser (relay.handle_frame), on a 64 KiB
    data segment: one unpack, the IPv4 header checksum verified."""
    payload = random.randbytes(SIZES["64KiB"])
    frame = memoryview(guest_template(timestamps=timestamps).build(
        1000, 5000, ACK | PSH, 0xFFFF, payload, None) + payload)

    def parse() -> tuple[bytes, TcpSegment] | None:
        return parse_tcp4_fast(frame)

    out = benchmark(parse)
    assert out is not None and len(out[1].payload) == len(payload)
    assert (out[1].tsval is not None) == timestamps


def test_parse_syn_with_options(benchmark: Any) -> None:
    frame = memoryview(guest_frame(b"", SYN, options=tcp_options_syn(65480, 7, (1, 0))))
    seg = benchmark(lambda: parse_tcp(parse_ipv4(parse_ethernet(frame).payload)))
    assert seg.wscale == 7


# -- build ----------------------------------------------------------------------------


@pytest.mark.parametrize("offload", [False, True], ids=["csum", "offload"])
@pytest.mark.parametrize("size", list(SIZES))
def test_build_frame(benchmark: Any, size: str, offload: bool) -> None:
    """TcpFrameTemplate.build: headers of one segment toward the guest; without offload
    that includes the TCP checksum over the payload."""
    template = relay_template(offload)
    payload = memoryview(random.randbytes(SIZES[size]))
    head = benchmark(template.build, 1, 2, ACK, 512, payload, None, 65480 if offload else 0)
    assert head


# -- checksum -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [20, 1460, 65535])
def test_internet_checksum(benchmark: Any, size: int) -> None:
    data = random.randbytes(size)
    assert 0 <= benchmark(internet_checksum, data) <= 0xFFFF


def test_partial_sum_memoryview_64k(benchmark: Any) -> None:
    """The build path sums memoryview payload slices (what on_host_data hands it)."""
    data = memoryview(bytearray(random.randbytes(1 << 17)))[1:65536]
    benchmark(partial_sum, data)


# -- TcpNatEntry -----------------------------------------------------------------------


def syn_segment() -> TcpSegment:
    frame = guest_frame(b"", SYN, seq=1000, options=tcp_options_syn(65480, 7, None))
    return parse_tcp(parse_ipv4(parse_ethernet(memoryview(frame)).payload))


def test_flow_creation(benchmark: Any) -> None:
    """What tcp_relay does per SYN minus the socket: template, entry, connect result
    (SYN-ACK built and queued)."""
    syn = syn_segment()

    def create() -> TcpNatEntry:
        entry = TcpNatEntry(syn, template=relay_template(), mtu=MTU, iss=12345, now=0.0)
        entry.on_connect_result(True, FACTS, 0.0)
        entry.take_actions()
        return entry

    assert benchmark(create).state is TcpState.SYN_RCVD


def established(offload: bool = False) -> TcpNatEntry:
    syn = syn_segment()
    entry = TcpNatEntry(syn, template=relay_template(offload), mtu=MTU, iss=12345, now=0.0)
    entry.on_connect_result(True, FACTS, 0.0)
    ack = TcpSegment(GUEST_IP, REMOTE_IP, GUEST_PORT, REMOTE_PORT, 1001, 12346, ACK, 0xFFFF,
                     memoryview(b""))
    entry.on_guest_segment(ack, 0.001)
    entry.take_actions()
    assert entry.state is TcpState.ESTABLISHED
    return entry


@pytest.mark.parametrize("size", ["1460B", "64KiB"])
def test_segment_guest_to_host(benchmark: Any, size: str) -> None:
    """One in-order data segment from the guest: on_guest_segment, the host socket takes
    it all (on_host_accepted), end-of-batch flush with fresh socket facts (the ACK)."""
    entry = established()
    payload = memoryview(random.randbytes(SIZES[size]))
    seg = TcpSegment(GUEST_IP, REMOTE_IP, GUEST_PORT, REMOTE_PORT, 1001, 12346, ACK, 0xFFFF,
                     payload)
    state = {"now": 0.01}

    def one() -> None:
        seg.seq = entry.rcv_nxt
        state["now"] += 1e-5
        data = entry.on_guest_segment(seg, state["now"])
        assert data is not None
        entry.on_host_accepted(len(data), state["now"])
        entry.flush(FACTS, state["now"])
        entry.take_actions()

    benchmark(one)
    assert entry.bytes_from_guest > 0


@pytest.mark.parametrize("offload", [False, True], ids=["csum", "offload"])
@pytest.mark.parametrize("size", ["1460B", "64KiB"])
def test_segment_host_to_guest(benchmark: Any, size: str, offload: bool) -> None:
    """Host data peeked: on_host_data (frames built, checksummed unless offload), then
    the guest's ACK of it: on_guest_segment (ConsumeHost)."""
    entry = established(offload)
    data = memoryview(random.randbytes(SIZES[size]))
    ack = TcpSegment(GUEST_IP, REMOTE_IP, GUEST_PORT, REMOTE_PORT, 1001, 0, ACK, 0xFFFF,
                     memoryview(b""))
    state = {"now": 0.01}

    def one() -> None:
        state["now"] += 1e-5
        entry.on_host_data(data, state["now"])
        ack.ack = entry.snd_nxt
        entry.on_guest_segment(ack, state["now"])
        entry.take_actions()

    benchmark(one)
    assert entry.bytes_to_guest > 0


# -- flow table -----------------------------------------------------------------------


@pytest.mark.parametrize("nflows", [10, 1000, 100_000])
def test_flow_lookup(benchmark: Any, nflows: int) -> None:
    """tcp_relay's per-segment lookup: key (guest port, destination, port) built from the
    segment, then dict.get, with `nflows` flows in the table."""
    rnd = random.Random(1)
    flows = {}
    for i in range(nflows):
        key = (1024 + i % 60000, bytes([10, 0, rnd.randrange(256), rnd.randrange(256)]),
               rnd.randrange(1, 65536))
        flows[key] = object()
    wanted = list(flows)[nflows // 2]
    seg = TcpSegment(GUEST_IP, bytes(wanted[1]), wanted[0], REMOTE_PORT, 0, 0, ACK, 0,
                     memoryview(b""))
    seg.dport = wanted[2]

    def lookup() -> object | None:
        return flows.get((seg.sport, seg.dst, seg.dport))

    assert benchmark(lookup) is not None


