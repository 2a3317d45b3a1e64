"""Inbound TCP (a host client on a forwarded port): the handshake `TcpNatEntry.inbound`
runs with the guest (RFC 9293 §3.5, §3.10.7.3; RFC 7323 §2.2, §3.2), driven without I/O.
The whole path with real kernels: tests/integration/test_inbound.py.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaynat.nat_entry import TcpNatEntry
from relaynat.packet_builder import TcpFrameTemplate
from relaynat.tcp_actions import CloseHost, SendFrame
from relaynat.tcp_state import TcpState
from relaynat.window import OUR_WSCALE, SYN_RETRIES_MAX, syn_timeout_s
from relaynat.wire import ACK, RST, SYN, TcpSegment, parse_ethernet, parse_ipv4, parse_tcp

GW, GUEST = bytes([10, 0, 2, 2]), bytes([10, 0, 2, 15])
M32 = 0xFFFFFFFF


def _entry(iss: int = 1000, timestamps: bool = True) -> TcpNatEntry:
    template = TcpFrameTemplate(dst_mac=b"\x02" * 6, src_mac=b"\x52" * 6, src=GW, dst=GUEST,
                                sport=40000, dport=8080, timestamps=timestamps)
    return TcpNatEntry.inbound(template=template, mtu=65520, iss=iss, now=0.0, facts=None)


def _sent(entry: TcpNatEntry) -> list[TcpSegment]:
    out = []
    for action in entry.take_actions():
        if isinstance(action, SendFrame):
            frame = bytes(action.head) + bytes(action.payload)
            out.append(parse_tcp(parse_ipv4(parse_ethernet(memoryview(frame)).payload)))
    return out


def _from_guest(flags: int, seq: int, ack: int, *, mss: int | None = 1460,
                wscale: int | None = 7, tsval: int | None = 55, window: int = 64240,
                payload: bytes = b"") -> TcpSegment:
    return TcpSegment(GUEST, GW, 8080, 40000, seq & M32, ack & M32, flags, window,
                      memoryview(payload), mss=mss, wscale=wscale, tsval=tsval,
                      tsecr=None if tsval is None else 1)


def test_our_syn_offers_mss_window_scale_and_timestamps() -> None:
    (syn,) = _sent(_entry(iss=1000))
    assert syn.flags == SYN and syn.seq == 1000
    assert (syn.mss, syn.wscale) == (65520 - 40, OUR_WSCALE) and syn.tsval is not None


def test_the_guests_syn_ack_gives_the_first_round_trip() -> None:
    """Its TSecr echoes our SYN's TSval (RFC 7323 §4.1): the RTO starts from the guest's
    round trip rather than the initial 1 s."""
    entry = _entry()
    (syn,) = _sent(entry)
    assert syn.tsval is not None and entry.guest_srtt is None
    synack = TcpSegment(GUEST, GW, 8080, 40000, 5000, 1001, SYN | ACK, 64240, memoryview(b""),
                        mss=1460, wscale=7, tsval=55, tsecr=syn.tsval)
    entry.on_guest_segment(synack, 0.005)
    assert entry.state is TcpState.ESTABLISHED
    assert entry.guest_srtt == pytest.approx(0.005)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, M32), st.integers(0, M32), st.one_of(st.none(), st.integers(0, 14)),
       st.booleans(), st.one_of(st.none(), st.integers(88, 65495)))
def test_syn_ack_establishes_with_what_the_guest_accepted(iss: int, guest_isn: int,
                                                          wscale: int | None, ts: bool,
                                                          mss: int | None) -> None:
    entry = _entry(iss)
    _sent(entry)
    entry.on_guest_segment(_from_guest(SYN | ACK, guest_isn, iss + 1, mss=mss, wscale=wscale,
                                       tsval=55 if ts else None), 0.1)
    assert entry.state is TcpState.ESTABLISHED
    (ack,) = _sent(entry)
    assert ack.flags == ACK and ack.seq == (iss + 1) & M32 and ack.ack == (guest_isn + 1) & M32
    # RFC 7323 §2.2: scaling only when both SYNs carried the option.
    assert (entry.our_wscale, entry.guest_wscale) == ((OUR_WSCALE, min(wscale, 14))
                                                      if wscale is not None else (0, 0))
    # RFC 7323 §3.2: timestamps only when the SYN-ACK carried them too.
    assert entry.template.timestamps is ts and (ack.tsval is not None) is ts
    assert entry.mss == min(mss or 536, 65520 - 40) - (12 if ts else 0)
    assert entry.host_read_budget() > 0


def test_guest_rst_resets_the_host_client_and_a_stray_rst_does_not() -> None:
    entry = _entry(iss=500)
    _sent(entry)
    entry.on_guest_segment(_from_guest(RST | ACK, 0, 999), 0.1)  # does not ack our SYN
    assert entry.state is TcpState.SYN_SENT
    entry.on_guest_segment(_from_guest(RST | ACK, 0, 501), 0.1)
    assert entry.closed
    assert [a for a in entry.take_actions() if isinstance(a, CloseHost)] == [CloseHost(True)]


def test_syn_ack_for_another_syn_is_reset() -> None:
    entry = _entry(iss=500)
    _sent(entry)
    entry.on_guest_segment(_from_guest(SYN | ACK, 77, 12345), 0.1)
    (rst,) = _sent(entry)
    assert rst.flags == RST and rst.seq == 12345
    assert entry.state is TcpState.SYN_SENT


def test_silent_guest_gets_syn_retries_then_the_client_is_reset() -> None:
    entry = _entry(iss=9)
    _sent(entry)
    now = 0.0
    for retry in range(SYN_RETRIES_MAX):
        now += syn_timeout_s(retry)
        entry.on_timer(now, None)
        (syn,) = _sent(entry)
        assert syn.flags == SYN and syn.seq == 9
    entry.on_timer(now + syn_timeout_s(SYN_RETRIES_MAX), None)
    assert entry.closed
    actions = entry.take_actions()
    assert CloseHost(True) in actions
    assert not any(isinstance(a, SendFrame) for a in actions)  # no RST to a guest never met


def test_our_syn_goes_again_at_once_to_the_guest_mac_once_learned() -> None:
    """A host client connected before the guest's first frame: the SYN went to the
    broadcast address, which the guest's TCP discards. When the MAC is learned the SYN
    goes again at once, to it, with the same ISN; established flows only change
    address."""
    mac = bytes.fromhex("020000000042")
    template = TcpFrameTemplate(dst_mac=b"\xff" * 6, src_mac=b"\x52" * 6, src=GW, dst=GUEST,
                                sport=40000, dport=8080, timestamps=True)
    entry = TcpNatEntry.inbound(template=template, mtu=65520, iss=77, now=0.0, facts=None)
    entry.take_actions()
    entry.on_guest_mac(mac, 0.1)
    (action,) = [a for a in entry.take_actions() if isinstance(a, SendFrame)]
    assert bytes(action.head)[:6] == mac
    syn = parse_tcp(parse_ipv4(parse_ethernet(memoryview(bytes(action.head))).payload))
    assert syn.flags == SYN and syn.seq == 77
    entry.on_guest_mac(mac, 0.2)  # the same MAC again: nothing to do
    assert entry.take_actions() == []

    entry = _entry(iss=5)
    _sent(entry)
    entry.on_guest_segment(_from_guest(SYN | ACK, 100, 6), 0.0)
    _sent(entry)
    entry.on_guest_mac(mac, 0.1)
    assert _sent(entry) == []
    entry.on_host_data(memoryview(b"data"), 0.2)
    entry.flush(None, 0.2)
    assert [a.head[:6] for a in entry.take_actions() if isinstance(a, SendFrame)] == [mac]


def test_host_data_waits_for_the_handshake() -> None:
    entry = _entry()
    _sent(entry)
    assert entry.host_read_budget() == 0
    entry.on_host_data(memoryview(b"early"), 0.05)
    assert _sent(entry) == []


def test_an_idle_flow_stops_checking_its_window() -> None:
    """A fresh loopback peer offers ~64 KiB, less than two segments at MTU 65520, so the
    window always looks "limited"; with no guest data the checks must stop (10,000 idle
    flows once spent 3/4 of the relay's time in them)."""
    from relaynat.window import SocketFacts, TcpInfo

    facts = SocketFacts(TcpInfo(rtt_us=50, rcv_space=65495, snd_wnd=65483), 2_626_560, 0)
    entry = _entry(iss=1)
    _sent(entry)
    entry.on_guest_segment(_from_guest(SYN | ACK, 100, 2, mss=65460), 0.0)
    assert entry._window_limited()  # the premise: the whole window is under 2 MSS
    entry.flush(facts, 0.0)
    checks, now = 0, 0.0
    while entry.ack_check_at is not None and entry.ack_check_at <= 10.0:
        now = entry.ack_check_at
        entry.on_timer(now, facts)
        checks += 1
    # Before: a check every 0.2 s at most (57 in 10 s). Now 1, 2, 4, 8 s apart.
    assert checks <= 6 and entry.ack_check_s >= 4.0
    # The guest sends a segment: the window is watched again for that burst.
    entry.on_guest_segment(_from_guest(ACK, 101, 2, payload=b"x" * 1000), now)
    entry.on_host_accepted(1000, now)
    entry.flush(facts, now)
    assert entry.ack_check_at is not None and entry.ack_check_at - now < 0.2
