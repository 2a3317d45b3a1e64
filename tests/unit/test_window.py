"""relaynat.window: window scale negotiation, window encoding, the advertised window,
RTT exponent, RTO backoff and TCP_INFO parsing."""

from __future__ import annotations

import struct

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from relaynat import window as W
from relaynat.window import SocketFacts, TcpInfo

# -- window scale ---------------------------------------------------------------------

def test_negotiate_wscale_without_option() -> None:
    assert W.negotiate_wscale(None) == (0, 0)


@given(st.integers(0, 255))
@example(0)
@example(14)
@example(15)
def test_negotiate_wscale_with_option(shift: int) -> None:
    ours, theirs = W.negotiate_wscale(shift)
    assert ours == W.OUR_WSCALE == 8
    assert theirs == min(shift, 14)


# -- encode_window ----------------------------------------------------------------------

@given(st.integers(-(2**40), 2**40), st.integers(0, 14))
@example(0, 0)
@example(255, 8)
@example(256, 8)
@example(0xFFFF << 8, 8)
@example((0xFFFF << 8) + 255, 8)
@example((0xFFFF << 8) + 256, 8)
@example(65536, 0)
def test_encode_window(window: int, shift: int) -> None:
    field = W.encode_window(window, shift)
    assert 0 <= field <= 0xFFFF
    # Never advertise more than computed ...
    assert field << shift <= max(window, 0)
    # ... and lose less than one unit of the shift, unless clamped to the field.
    if field < 0xFFFF:
        assert max(window, 0) - (field << shift) < (1 << shift)
    else:
        assert window >= 0xFFFF << shift


def test_encode_window_examples() -> None:
    assert W.encode_window(14600, 0) == 14600
    assert W.encode_window(14600, 8) == 57  # 14592: rounded down
    assert W.encode_window(255, 8) == 0
    assert W.encode_window(70000, 0) == 0xFFFF
    assert W.encode_window(1 << 30, 8) == 0xFFFF
    assert W.encode_window(-5, 3) == 0


# -- advertised_window -------------------------------------------------------------------

def test_advertised_window_defaults() -> None:
    assert W.advertised_window(None) == W.WINDOW_DEFAULT == 14600
    assert W.advertised_window(SocketFacts(None, sndbuf=10**6, outq=0)) == 14600
    assert W.advertised_window(SocketFacts(None, sndbuf=0, outq=10**6)) == 14600


def test_advertised_window_examples() -> None:
    info = TcpInfo(rtt_us=100, rcv_space=60_000, snd_wnd=5_000)
    # Peer window small, receive space is the floor: 60000, below the 100000 free.
    assert W.advertised_window(SocketFacts(info, sndbuf=200_000, outq=0)) == 60_000
    # The send buffer is the limit: 100000 usable - 70000 queued.
    assert W.advertised_window(SocketFacts(info, sndbuf=200_000, outq=70_000)) == 30_000
    # Full (or over-full) send buffer: zero, never negative.
    assert W.advertised_window(SocketFacts(info, sndbuf=200_000, outq=100_000)) == 0
    assert W.advertised_window(SocketFacts(info, sndbuf=200_000, outq=150_000)) == 0
    # A large peer window passes through, up to the buffer.
    big = TcpInfo(rtt_us=100, rcv_space=14_600, snd_wnd=3_000_000)
    assert W.advertised_window(SocketFacts(big, sndbuf=8_000_000, outq=0)) == 3_000_000
    assert W.advertised_window(SocketFacts(big, sndbuf=4_000_000, outq=0)) == 2_000_000


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**31),
       st.integers(0, 2**31))
def test_advertised_window_bounds(rcv_space: int, snd_wnd: int, sndbuf: int, outq: int) -> None:
    facts = SocketFacts(TcpInfo(1000, rcv_space, snd_wnd), sndbuf, outq)
    win = W.advertised_window(facts)
    assert win == min(max(0, sndbuf // 2 - outq), max(snd_wnd, rcv_space))
    assert 0 <= win <= max(0, sndbuf // 2 - outq)


def test_send_budget() -> None:
    assert W.send_budget(1000, 0) == 1000
    assert W.send_budget(1000, 400) == 600
    assert W.send_budget(1000, 1000) == 0
    assert W.send_budget(1000, 5000) == 0


def test_mss_for_guest() -> None:
    assert W.mss_for_guest(None, 1500) == 536  # RFC 9293 §3.7.1 default
    assert W.mss_for_guest(1460, 1500) == 1460
    assert W.mss_for_guest(9000, 1500) == 1460  # our MTU limits it
    assert W.mss_for_guest(1460, 65520) == 1460
    assert W.mss_for_guest(None, 65520) == 536
    assert W.mss_for_guest(65535, 65520) == 65480
    # Linux's tcp_min_snd_mss floor: an MSS of 1 would cut every peek into as many
    # frames as bytes; the timestamp option comes off the floored MSS, never to 0.
    assert W.mss_for_guest(1, 1500) == W.MIN_SND_MSS == 48
    assert W.mss_for_guest(1, 1500, 20, 12) == 36
    assert W.mss_for_guest(12, 65520, 40, 12) == 36
    assert W.mss_for_guest(100, 1500, 20, 12) == 88


@given(st.one_of(st.none(), st.integers(0, 0xFFFF)), st.integers(576, 65520),
       st.sampled_from([20, 40]), st.sampled_from([0, 12]))
def test_mss_for_guest_is_floored_and_never_above_what_was_asked(
        guest: int | None, mtu: int, ip_hlen: int, options: int) -> None:
    mss = W.mss_for_guest(guest, mtu, ip_hlen, options)
    assert mss >= W.MIN_SND_MSS - options > 0
    assert mss + options <= max(W.MIN_SND_MSS, mtu - ip_hlen - 20)
    if guest and guest >= W.MIN_SND_MSS:
        assert mss + options <= guest


# -- RTT and timers ------------------------------------------------------------------------

def test_rtt_exponent_examples() -> None:
    assert W.rtt_exponent(0) == 0
    assert W.rtt_exponent(100) == 0
    assert W.rtt_exponent(101) == 1
    assert W.rtt_exponent(200) == 1
    assert W.rtt_exponent(201) == 2
    assert W.rtt_exponent(100 << 14) == 14
    assert W.rtt_exponent((100 << 14) + 1) == 15
    assert W.rtt_exponent(3_276_800) == 15  # 3.2768 s, the top
    assert W.rtt_exponent(10**9) == 15


@given(st.integers(0, 2**32 - 1))
def test_rtt_exponent_is_smallest_cover(rtt_us: int) -> None:
    e = W.rtt_exponent(rtt_us)
    assert 0 <= e <= 15
    assert (100 << e) >= rtt_us or e == 15
    assert e == 0 or (100 << (e - 1)) < rtt_us


def test_ack_check_interval() -> None:
    assert W.ack_check_interval_s(0) == 0.001  # 50 µs -> the 1 ms floor
    assert W.ack_check_interval_s(5) == pytest.approx(0.0016)  # 3.2 ms / 2
    assert W.ack_check_interval_s(11) == pytest.approx(0.1024)
    assert W.ack_check_interval_s(12) == 0.2  # 204.8 ms -> the 200 ms cap
    assert W.ack_check_interval_s(15) == 0.2


def test_rto_backoff() -> None:
    assert [W.rto_s(n, False) for n in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert W.rto_s(10**6, False) == 60.0
    # RFC 6298 §5.7: after a retransmitted SYN(-ACK), the data RTO starts at 3 s.
    assert [W.rto_s(n, True) for n in range(6)] == [3, 6, 12, 24, 48, 60]
    assert W.rto_s(10**6, True) == 60.0


@given(st.integers(0, 10**6), st.booleans())
def test_rto_bounds(retries: int, after_syn_retry: bool) -> None:
    rto = W.rto_s(retries, after_syn_retry)
    assert (3.0 if after_syn_retry else 1.0) <= rto <= 60.0
    assert W.rto_s(retries + 1, after_syn_retry) in (2 * rto, 60.0)


def test_rto_from_a_measured_round_trip() -> None:
    # RFC 6298 §2.3: SRTT + 4 RTTVAR, the second term at least 200 ms as in Linux.
    assert W.rto_s(0, False, 0.001, 0.0005) == pytest.approx(0.201)
    assert W.rto_s(0, True, 0.3, 0.1) == pytest.approx(0.7)
    assert W.rto_s(3, False, 0.3, 0.1) == pytest.approx(5.6)
    assert W.rto_s(10, False, 0.3, 0.05) == W.RTO_MAX_S


@given(st.lists(st.floats(0.0, 60.0), min_size=1, max_size=50))
def test_rtt_update_follows_rfc_6298(samples: list[float]) -> None:
    srtt, rttvar = W.rtt_update(None, 0.0, samples[0])
    # §2.2: the first sample sets SRTT to it and RTTVAR to half of it.
    assert (srtt, rttvar) == (samples[0], samples[0] / 2)
    for r in samples[1:]:
        new_srtt, new_rttvar = W.rtt_update(srtt, rttvar, r)
        # §2.3, RTTVAR before SRTT, with alpha 1/8 and beta 1/4.
        assert new_rttvar == pytest.approx(0.75 * rttvar + 0.25 * abs(srtt - r))
        assert new_srtt == pytest.approx(0.875 * srtt + 0.125 * r)
        srtt, rttvar = new_srtt, new_rttvar
        assert min(samples) - 1e-9 <= srtt <= max(samples) + 1e-9
    assert W.RTO_MIN_S <= W.rto_s(0, False, srtt, rttvar) <= W.RTO_MAX_S


def test_syn_timeout() -> None:
    assert [W.syn_timeout_s(n) for n in range(5)] == [1, 2, 4, 8, 16]


# -- TCP_INFO --------------------------------------------------------------------------------

def tcp_info_blob(length: int, rtt: int, rcv_space: int, snd_wnd: int) -> bytes:
    blob = bytearray(b"\xee" * max(length, 232))
    struct.pack_into("=I", blob, 68, rtt)
    struct.pack_into("=I", blob, 96, rcv_space)
    struct.pack_into("=I", blob, 228, snd_wnd)
    return bytes(blob[:length])


@given(st.integers(232, 400), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
       st.integers(0, 2**32 - 1))
def test_tcp_info_from_bytes(length: int, rtt: int, rcv_space: int, snd_wnd: int) -> None:
    info = TcpInfo.from_bytes(tcp_info_blob(length, rtt, rcv_space, snd_wnd))
    assert info == TcpInfo(rtt_us=rtt, rcv_space=rcv_space, snd_wnd=snd_wnd)


@given(st.integers(0, 231))
def test_tcp_info_too_short(length: int) -> None:
    """A kernel older than 5.4 returns no tcpi_snd_wnd: the blob is refused."""
    assert TcpInfo.from_bytes(tcp_info_blob(length, 1, 2, 3)) is None


def test_tcp_info_full_struct() -> None:
    blob = tcp_info_blob(W.TCP_INFO_LEN, 1234, 29200, 64240)
    assert TcpInfo.from_bytes(blob) == TcpInfo(1234, 29200, 64240)
