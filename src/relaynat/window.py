"""Pure window, RTT and timer arithmetic for the TCP relay. No I/O, no clock.

Window scaling (RFC 7323 §2.2, §2.3): scaling is in force only when both SYNs carry
the option. So we put our own shift in the SYN-ACK only if the guest's SYN offered
one; otherwise neither side scales and windows are capped at 65535 bytes.

The window we advertise to the guest (`advertised_window`)
-----------------------------------------------------------
We hold no payload buffer: guest data is written straight into the host socket and we
ACK only what the socket accepted (nat_entry.py). The guest must therefore never be
allowed to send more than the host socket can queue right now, or every excess
segment is thrown away and retransmitted. With `usable = SO_SNDBUF / 2` (the kernel
doubles the requested size to cover skb bookkeeping, so half of what it reports is
payload room, cf. socket(7) SO_SNDBUF) and `outq = SIOCOUTQ` (bytes not yet acked by
the peer), the socket can absorb `absorb = usable - outq` more bytes.

    window = min(absorb, max(tcpi_snd_wnd, tcpi_rcv_space))

`tcpi_snd_wnd` is the peer's receive window as our socket last saw it: mirroring it
passes the peer's flow control through to the guest, as passt does, so the relay does
not turn into a queue the size of the send buffer in front of a slow peer. It is not a
per-RTT cap: with loopback or LAN peers it grows into the megabytes, which is why the
result is not limited to 64 KiB per round trip. `tcpi_rcv_space` (our socket's receive
space estimate, at least one initial window) is a floor so that a momentarily small or
zero `snd_wnd` does not stop a guest while the send buffer still has room; the kernel
keeps that data and sends it when the peer opens up. Before the host socket has
TCP_INFO (the SYN-ACK is sent right after connect) we offer `WINDOW_DEFAULT`.

The window is then clamped to what the header can say (65535 << shift) and rounded
down to the shift's granularity, so we never advertise more than we computed.

RTT and timers
--------------
The kernel's smoothed RTT of the host socket (`tcpi_rtt`, µs) is kept coarsely as an
exponent like passt's: 100 µs << e for e in 0..15 (100 µs ... 3.2768 s). Window
updates toward a guest that is blocked on our window are checked every RTT/2 (the peer
cannot have acked new data sooner), within the event loop's millisecond granularity.

Retransmission toward the guest follows RFC 6298: the RTO starts at 1 s (§2.1) and
doubles on each expiry (§5.5) up to 60 s (§2.5); if the SYN-ACK had to be
retransmitted, the first data RTO is 3 s (§5.7). Once the guest's round trip is
measured (from the timestamps it echoes, RFC 7323 §4.1) the RTO is SRTT + 4 RTTVAR
(§2.2, §2.3), the variation term at least 200 ms as Linux has it (tcp_set_rto,
TCP_RTO_MIN) instead of §2.4's floor of 1 s for the whole: the guest is on this
machine, and every expiry is a stall of the whole flow (what the guest's SACK blocks
cannot reveal, a lost tail, waits for it). How long an unanswered flow lives does not
depend on it (`DATA_GIVE_UP_S`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

#: Our receive-window shift when the guest offered scaling: 65535 << 8 is ~16 MiB,
#: above any send buffer the kernel autotunes to by default (tcp_wmem max 4 MiB).
OUR_WSCALE = 8
#: Ten full 1460-byte segments, the initial window of RFC 6928; passt's default too.
WINDOW_DEFAULT = 14600
#: RFC 9293 §3.7.1: MSS assumed when the SYN has no MSS option.
DEFAULT_MSS_V4 = 536
DEFAULT_MSS_V6 = 1220
#: The smallest MSS we send with, whatever the guest announced: Linux's
#: net.ipv4.tcp_min_snd_mss default (TCP_MIN_SND_MSS, 40 bytes of options and 8 of
#: data), added against CVE-2019-11479, where a peer's MSS of a few bytes made a sender
#: cut its data into that many segments. Here an MSS of 1 made every peek of up to
#: 1 MiB a million frames, and with timestamps an MSS of 12 or less left no payload.
MIN_SND_MSS = 48

RTO_INITIAL_S = 1.0
RTO_AFTER_SYN_RETRY_S = 3.0
RTO_MAX_S = 60.0
#: Linux's TCP_RTO_MIN: the floor of the variation term of a measured RTO.
RTO_MIN_S = 0.2
#: SYN-ACK retransmissions before the flow is reset (1+2+4+8 s, as Linux's tcp_synack_retries
#: spirit with a shorter tail: the guest is on the same machine).
SYN_RETRIES_MAX = 4
#: Seconds of RTO expiries without an acknowledgement (from the first) after which the
#: flow is reset: what 9 expiries from 1 s take (1 + 2 + ... + 32 + 60 + 60 + 60, less
#: the first), however short a measured RTO made them. RFC 9293 §3.8.3 asks for R2 of
#: at least 100 s.
DATA_GIVE_UP_S = 242.0
#: RFC 8985 §7.2 tail loss probe: the floor of the probe timeout. Two round trips of a
#: guest on this host are a fraction of a millisecond, less than a guest descheduled for
#: a moment takes to ACK; the TLP draft this section grew from used max(2 SRTT, 10 ms).
TLP_MIN_S = 0.010
#: RFC 8985 §7.2 WCDelAckT: with one segment in flight the guest may delay its ACK (Linux
#: up to 200 ms, TCP_DELACK_MAX), so the probe waits for that as well.
TLP_DELACK_S = 0.2
#: Duplicate ACKs that trigger fast retransmit (RFC 5681 §3.2).
DUP_ACK_THRESHOLD = 3

RTT_MIN_US = 100
RTT_EXP_MAX = 15
ACK_CHECK_MIN_S = 0.001
ACK_CHECK_MAX_S = 0.2
#: The same for a flow whose guest sent nothing since the last check (nat_entry.py).
ACK_CHECK_IDLE_MAX_S = 30.0

TCP_INFO_LEN = 280
_U32 = struct.Struct("=I")


@dataclass(slots=True, frozen=True)
class TcpInfo:
    """The few `struct tcp_info` fields we use (include/uapi/linux/tcp.h)."""

    rtt_us: int
    rcv_space: int
    snd_wnd: int

    @classmethod
    def from_bytes(cls, blob: bytes) -> TcpInfo | None:
        """Parse getsockopt(TCP_INFO) output, checking the kernel returned each field
        (older kernels return a shorter struct: tcpi_snd_wnd needs 5.4+)."""
        if len(blob) < 232:
            return None
        return cls(_U32.unpack_from(blob, 68)[0], _U32.unpack_from(blob, 96)[0],
                   _U32.unpack_from(blob, 228)[0])


@dataclass(slots=True, frozen=True)
class SocketFacts:
    """What the shell read from the host socket for one window computation."""

    info: TcpInfo | None
    #: getsockopt(SO_SNDBUF): the kernel's doubled send-buffer size.
    sndbuf: int
    #: ioctl(SIOCOUTQ): bytes queued and not yet acknowledged by the peer.
    outq: int


def negotiate_wscale(guest_wscale: int | None) -> tuple[int, int]:
    """Return (our_shift, guest_shift); both 0 unless the guest's SYN offered scaling."""
    if guest_wscale is None:
        return 0, 0
    return OUR_WSCALE, min(guest_wscale, 14)


def mss_for_guest(guest_mss: int | None, mtu: int, ip_header_len: int = 20,
                  options_len: int = 0) -> int:
    """Payload bytes per segment we send: the MSS is no more than the guest announced
    (or 536 if it did not, RFC 9293 §3.7.1) and our link MTU allows, and no less than
    MIN_SND_MSS; then the options every segment carries (`options_len`, the timestamp
    option's 12 bytes) come off it (RFC 6691: the MSS excludes options), as Linux's
    tcp_current_mss takes them off its floored MSS: at least 36 bytes remain."""
    ours = mtu - ip_header_len - 20
    # RFC 9293 §3.7.1: without the option assume 536 (IPv4) or 1220 (IPv6, 1280 - 60).
    default = DEFAULT_MSS_V4 if ip_header_len == 20 else DEFAULT_MSS_V6
    return max(MIN_SND_MSS, min(guest_mss if guest_mss else default, ours)) - options_len


def advertised_window(facts: SocketFacts | None) -> int:
    """Bytes the guest may send beyond what we acked; see the module docstring."""
    if facts is None or facts.info is None:
        return WINDOW_DEFAULT
    absorb = max(0, facts.sndbuf // 2 - facts.outq)
    return min(absorb, max(facts.info.snd_wnd, facts.info.rcv_space))


def encode_window(window: int, shift: int) -> int:
    """The 16-bit header field for `window` bytes at `shift` (rounds down, clamps)."""
    return min(max(window, 0) >> shift, 0xFFFF)


def send_budget(guest_window: int, bytes_in_flight: int) -> int:
    """How many more bytes we may send the guest: never beyond its window."""
    return max(0, guest_window - bytes_in_flight)


def rtt_exponent(rtt_us: int) -> int:
    """Smallest e with 100 µs << e >= rtt_us, clamped to 0..15."""
    e = 0
    while e < RTT_EXP_MAX and (RTT_MIN_US << e) < rtt_us:
        e += 1
    return e


def ack_check_interval_s(rtt_exp: int) -> float:
    """Half the stored RTT, within the event loop's useful range."""
    half = (RTT_MIN_US << rtt_exp) / 2e6
    return min(max(half, ACK_CHECK_MIN_S), ACK_CHECK_MAX_S)


def rto_s(retries: int, syn_was_retransmitted: bool, srtt_s: float | None = None,
          rttvar_s: float = 0.0) -> float:
    """RTO after `retries` consecutive expiries (RFC 6298 §2.1, §5.5, §5.7, §2.5), from
    the smoothed round trip when there is one (§2.3, 4 RTTVAR at least RTO_MIN_S)."""
    if srtt_s is not None:
        base = srtt_s + max(RTO_MIN_S, 4 * rttvar_s)
    else:
        base = RTO_AFTER_SYN_RETRY_S if syn_was_retransmitted else RTO_INITIAL_S
    return min(base * (1 << min(retries, 16)), RTO_MAX_S)


def pto_s(srtt_s: float, flight: int, mss: int) -> float:
    """The tail loss probe's timeout with `flight` bytes in flight (RFC 8985 §7.2)."""
    pto = max(2 * srtt_s, TLP_MIN_S)
    return pto + TLP_DELACK_S if flight <= mss else pto


def rtt_update(srtt_s: float | None, rttvar_s: float, sample_s: float) -> tuple[float, float]:
    """(SRTT, RTTVAR) after one round-trip sample (RFC 6298 §2.2, §2.3: alpha 1/8,
    beta 1/4)."""
    if srtt_s is None:
        return sample_s, sample_s / 2
    rttvar_s = 0.75 * rttvar_s + 0.25 * abs(srtt_s - sample_s)
    return 0.875 * srtt_s + 0.125 * sample_s, rttvar_s


def syn_timeout_s(retries: int) -> float:
    """SYN-ACK retransmission timeout: 1 s doubling (RFC 6298 §2.1)."""
    return RTO_INITIAL_S * (1 << retries)
