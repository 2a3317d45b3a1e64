"""Tests for relaynat.link.ndp: requests are built by scapy (the real peer's encoding), every
reply is parsed back by scapy as an independent oracle, checksums recomputed by scapy;
hypothesis fuzzes arbitrary and mutated messages."""

from __future__ import annotations

import struct
from ipaddress import IPv6Address, IPv6Network

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6ND_RA,
    ICMPv6ND_RS,
    ICMPv6NDOptDstLLAddr,
    ICMPv6NDOptMTU,
    ICMPv6NDOptPrefixInfo,
    ICMPv6NDOptRDNSS,
    ICMPv6NDOptSrcLLAddr,
    IPv6,
)
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from relaynat.config import RelayConfig
from relaynat.link.ndp import (
    MAX_GUEST_ADDRESSES,
    NdpReply,
    NdpResponder,
    icmpv6_checksum,
    multicast_mac,
    solicited_node,
    verify_icmpv6_checksum,
)

CFG = RelayConfig()
GW_MAC = "52:55:0a:00:02:02"
GW_LL = str(CFG.gateway_link_local)  # fe80::5055:aff:fe00:202
GUEST_MAC = "52:54:00:12:34:56"
GUEST_LL = "fe80::5054:ff:fe12:3456"
GUEST_SLAAC = "fd00::5054:ff:fe12:3456"


def mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def ip6(text: str) -> bytes:
    return IPv6Address(text).packed


def sol(addr: str) -> str:
    return str(IPv6Address(solicited_node(ip6(addr))))


def feed(
    responder: NdpResponder, pkt: Packet, src_mac: str = GUEST_MAC
) -> list[NdpReply]:
    """Hand the IPv6 packet scapy built to the responder the way the relay will."""
    raw = bytes(pkt)
    return responder.handle(raw[8:24], raw[24:40], raw[7], raw[40:], mac(src_mac))


def ns(target: str, src: str = GUEST_LL, dst: str | None = None, slla: str | None = GUEST_MAC,
       hlim: int = 255) -> Packet:
    pkt = IPv6(src=src, dst=dst or sol(target), hlim=hlim) / ICMPv6ND_NS(tgt=target)
    return pkt / ICMPv6NDOptSrcLLAddr(lladdr=slla) if slla else pkt


def rs(src: str = GUEST_LL, slla: str | None = GUEST_MAC, hlim: int = 255) -> Packet:
    pkt = IPv6(src=src, dst="ff02::2", hlim=hlim) / ICMPv6ND_RS()
    return pkt / ICMPv6NDOptSrcLLAddr(lladdr=slla) if slla else pkt


def parse(reply: NdpReply) -> Packet:
    """The reply as the guest receives it, parsed by scapy, with checks of the framing,
    the checksum (recomputed by scapy) and that no byte was left unparsed."""
    assert isinstance(reply, NdpReply) and isinstance(reply.message, bytes)
    assert len(reply.dst) == 16 and len(reply.src) == 16 and len(reply.dst_mac) == 6
    assert reply.hop_limit == 255
    header = struct.pack("!IHBB16s16s", 6 << 28, len(reply.message), 58, reply.hop_limit,
                         reply.src, reply.dst)
    frame = Ether(reply.dst_mac + mac(GW_MAC) + b"\x86\xdd" + header + reply.message)
    assert not frame.haslayer(Raw), frame.show(dump=True)
    icmp = frame[IPv6].payload
    recomputed = frame.copy()
    del recomputed[IPv6].payload.cksum
    assert icmp.cksum == Ether(bytes(recomputed))[IPv6].payload.cksum
    assert verify_icmpv6_checksum(reply.src, reply.dst, reply.message)
    if reply.dst[0] == 0xFF:
        assert reply.dst_mac == multicast_mac(reply.dst)
    return frame


def check_na(reply: NdpReply, target: str, *, to: str = GUEST_LL, to_mac: str = GUEST_MAC,
             override: bool = True) -> None:
    na = parse(reply)[ICMPv6ND_NA]
    assert na.R == 1 and na.S == 1 and bool(na.O) is override
    assert na.tgt == target and na.code == 0
    assert na[ICMPv6NDOptDstLLAddr].lladdr == GW_MAC
    assert reply.dst == ip6(to) and reply.dst_mac == mac(to_mac) and reply.src == ip6(target)


def check_ra(reply: NdpReply, cfg: RelayConfig = CFG) -> ICMPv6ND_RA:
    ra = parse(reply)[ICMPv6ND_RA]
    assert reply.src == cfg.gateway_link_local.packed
    assert (ra.chlim, ra.M, ra.O, ra.H, ra.prf, ra.P) == (64, 1, 1, 0, 0, 0)
    assert (ra.routerlifetime, ra.reachabletime, ra.retranstimer) == (
        cfg.ra_router_lifetime_s, 0, 0)
    assert ra[ICMPv6NDOptSrcLLAddr].lladdr == GW_MAC
    assert ra[ICMPv6NDOptMTU].mtu == cfg.mtu
    pio = ra[ICMPv6NDOptPrefixInfo]
    assert (pio.prefix, pio.prefixlen, pio.L, pio.A, pio.R) == (
        str(cfg.prefix_v6.network_address), 64, 1, 1, 0)
    assert (pio.validlifetime, pio.preferredlifetime) == (
        cfg.prefix_valid_lifetime_s, cfg.prefix_preferred_lifetime_s)
    rdnss = ra[ICMPv6NDOptRDNSS]
    assert rdnss.dns == [str(cfg.dns_ipv6)] and rdnss.lifetime >= 1800
    return ra


@pytest.fixture
def ndp() -> NdpResponder:
    return NdpResponder(CFG)


# --- checksum -----------------------------------------------------------------------------

@settings(max_examples=300)
@given(st.binary(min_size=16, max_size=16), st.binary(min_size=16, max_size=16),
       st.binary(min_size=4, max_size=200))
def test_checksum_matches_scapy(src: bytes, dst: bytes, body: bytes) -> None:
    message = body[:2] + b"\0\0" + body[4:]
    pkt = IPv6(src=str(IPv6Address(src)), dst=str(IPv6Address(dst)), nh=58) / Raw(message)
    from scapy.layers.inet6 import in6_chksum
    assert icmpv6_checksum(src, dst, message) == in6_chksum(58, pkt, message)
    filled = message[:2] + icmpv6_checksum(src, dst, message).to_bytes(2, "big") + message[4:]
    assert verify_icmpv6_checksum(src, dst, filled)
    assert icmpv6_checksum(src, dst, filled) == icmpv6_checksum(src, dst, message)


# --- neighbour solicitation ---------------------------------------------------------------

@pytest.mark.parametrize("target", [GW_LL, "fd00::2", "fd00::3"])
def test_ns_for_relay_addresses_answered_with_r_s_o(ndp: NdpResponder, target: str) -> None:
    [reply] = feed(ndp, ns(target))
    check_na(reply, target)
    assert ndp.counters == {"ns_answered": 1}


@pytest.mark.parametrize("target", ["fd00::1", "fd00::99", "fd00::", "fd00::ffff:ffff:ffff:ffff"])
def test_ns_for_other_prefix_addresses_proxied(ndp: NdpResponder, target: str) -> None:
    [reply] = feed(ndp, ns(target))
    check_na(reply, target, override=False)  # RFC 4861 §7.2.8: proxies leave O clear


def test_unicast_ns_without_slla_goes_to_frame_source(ndp: NdpResponder) -> None:
    # NUD probe (RFC 4861 §7.3.3): unicast to the target, no SLLA option.
    [reply] = feed(ndp, ns(GW_LL, src=GUEST_SLAAC, dst=GW_LL, slla=None),
                   src_mac="52:54:00:aa:bb:cc")
    check_na(reply, GW_LL, to=GUEST_SLAAC, to_mac="52:54:00:aa:bb:cc")


def test_slla_option_wins_over_frame_source(ndp: NdpResponder) -> None:
    [reply] = feed(ndp, ns("fd00::2", slla="52:54:00:00:00:07"), src_mac="52:54:00:aa:bb:cc")
    assert reply.dst_mac == mac("52:54:00:00:00:07")


@pytest.mark.parametrize("target", [GW_LL, "fd00::2", "fd00::15", "fd00::42"])
def test_dad_probes_never_answered(ndp: NdpResponder, target: str) -> None:
    assert feed(ndp, ns(target, src="::", slla=None)) == []
    assert ndp.counters == {"ns_dad_ignored": 1}


def test_dad_target_becomes_guest_address(ndp: NdpResponder) -> None:
    assert feed(ndp, ns(GUEST_SLAAC, src="::", slla=None)) == []
    assert feed(ndp, ns(GUEST_SLAAC)) == []
    assert ndp.counters["ns_guest_target"] == 1


def test_ns_for_guest_addresses_not_answered(ndp: NdpResponder) -> None:
    assert feed(ndp, ns(str(CFG.guest_ipv6))) == []  # the DHCPv6 address, from config
    ndp.note_guest_address(IPv6Address("fd00::77"))
    ndp.note_guest_address(ip6("fd00::78"))
    assert feed(ndp, ns("fd00::77")) == [] and feed(ndp, ns("fd00::78")) == []
    feed(ndp, IPv6(src="fd00::79", dst="fd00::2", hlim=255) / ICMPv6ND_NS(tgt="fd00::2"))
    assert feed(ndp, ns("fd00::79")) == []  # learned from the NS's own source
    assert ndp.counters["ns_guest_target"] == 4 and ndp.counters["ns_answered"] == 1


def test_guest_cannot_claim_relay_addresses(ndp: NdpResponder) -> None:
    for addr in ("fd00::2", "fd00::3", GW_LL):
        ndp.note_guest_address(ip6(addr))
        [reply] = feed(ndp, ns(addr))
        check_na(reply, addr)


def test_learned_addresses_bounded(ndp: NdpResponder) -> None:
    for i in range(MAX_GUEST_ADDRESSES + 5):
        ndp.note_guest_address(ip6(f"fd00::1:{i:x}"))
    assert feed(ndp, ns("fd00::1:0")) != []  # evicted first
    assert feed(ndp, ns(f"fd00::1:{MAX_GUEST_ADDRESSES + 4:x}")) == []


@pytest.mark.parametrize("target", ["fe80::1", "fd01::2", "2001:db8::1", "::1"])
def test_ns_outside_link_not_answered(ndp: NdpResponder, target: str) -> None:
    assert feed(ndp, ns(target)) == []
    assert ndp.counters == {"ns_not_ours": 1}


INVALID_NS = {
    "hop-limit-64": (ns("fd00::2", hlim=64), "bad_hop_limit"),
    "code-1": (IPv6(src=GUEST_LL, dst=sol("fd00::2"), hlim=255) / ICMPv6ND_NS(code=1,
               tgt="fd00::2"), "bad_code"),
    "bad-checksum": (IPv6(src=GUEST_LL, dst=sol("fd00::2"), hlim=255) / ICMPv6ND_NS(
                     tgt="fd00::2", cksum=0x1234), "bad_checksum"),
    "multicast-target": (ns("ff02::1"), "ns_multicast_target"),
    "dad-with-slla": (ns("fd00::2", src="::"), "ns_bad_dad"),
    "dad-to-unicast": (ns("fd00::2", src="::", dst="fd00::2", slla=None), "ns_bad_dad"),
    "dad-to-all-nodes": (ns("fd00::2", src="::", dst="ff02::1", slla=None), "ns_bad_dad"),
    "zero-length-option": (IPv6(src=GUEST_LL, dst=sol("fd00::2"), hlim=255) / ICMPv6ND_NS(
                           tgt="fd00::2") / Raw(b"\x01\x00" + bytes(6)), "option_zero_length"),
    "option-past-end": (IPv6(src=GUEST_LL, dst=sol("fd00::2"), hlim=255) / ICMPv6ND_NS(
                        tgt="fd00::2") / Raw(b"\x01\x02" + bytes(6)), "option_past_end"),
    "option-truncated": (IPv6(src=GUEST_LL, dst=sol("fd00::2"), hlim=255) / ICMPv6ND_NS(
                         tgt="fd00::2") / Raw(b"\x01"), "option_truncated"),
    "short": (IPv6(src=GUEST_LL, dst=sol("fd00::2"), hlim=255, nh=58) / Raw(
              bytes(ICMPv6ND_NS(tgt="fd00::2"))[:20]), "bad_checksum"),
}


@pytest.mark.parametrize(("pkt", "counter"), INVALID_NS.values(), ids=INVALID_NS.keys())
def test_invalid_ns_dropped_and_counted(pkt: Packet, counter: str) -> None:
    ndp = NdpResponder(CFG)
    assert feed(ndp, pkt) == []
    assert ndp.counters == {counter: 1}


def test_short_ns_with_valid_checksum() -> None:
    ndp = NdpResponder(CFG)
    src, dst = ip6(GUEST_LL), ip6(sol("fd00::2"))
    body = bytes(ICMPv6ND_NS(tgt="fd00::2"))[:20]
    body = body[:2] + icmpv6_checksum(src, dst, body).to_bytes(2, "big") + body[4:]
    assert ndp.handle(src, dst, 255, body, mac(GUEST_MAC)) == []
    assert ndp.counters == {"ns_short": 1}


# --- router solicitation and advertisement ------------------------------------------------

def test_rs_answered_unicast(ndp: NdpResponder) -> None:
    [reply] = feed(ndp, rs())
    check_ra(reply)
    assert reply.dst == ip6(GUEST_LL) and reply.dst_mac == mac(GUEST_MAC)
    assert ndp.counters == {"rs": 1, "ra_sent": 1}


def test_rs_without_slla_uses_frame_source(ndp: NdpResponder) -> None:
    [reply] = feed(ndp, rs(slla=None), src_mac="52:54:00:aa:bb:cc")
    check_ra(reply)
    assert reply.dst_mac == mac("52:54:00:aa:bb:cc")


def test_rs_from_unspecified_answered_to_all_nodes(ndp: NdpResponder) -> None:
    [reply] = feed(ndp, rs(src="::", slla=None))
    check_ra(reply)
    assert reply.dst == ip6("ff02::1") and reply.dst_mac == mac("33:33:00:00:00:01")


def test_unsolicited_ra_with_other_config() -> None:
    cfg = RelayConfig(prefix_v6=IPv6Network("2001:db8:1:2::/64"),
                      guest_ipv6=IPv6Address("2001:db8:1:2::15"),
                      gateway_ipv6=IPv6Address("2001:db8:1:2::1"),
                      dns_ipv6=IPv6Address("2001:db8:1:2::53"), map_host_loopback_v6=None,
                      mtu=1500, ra_router_lifetime_s=0, prefix_valid_lifetime_s=7200,
                      prefix_preferred_lifetime_s=3600,
                      gateway_mac=mac("02:00:00:00:00:01")).validate()
    ndp = NdpResponder(cfg)
    reply = ndp.router_advertisement()
    assert reply.dst == ip6("ff02::1")
    frame = parse(reply)
    assert frame[ICMPv6ND_RA][ICMPv6NDOptSrcLLAddr].lladdr == "02:00:00:00:00:01"
    assert frame[ICMPv6NDOptMTU].mtu == 1500
    assert frame[ICMPv6NDOptPrefixInfo].prefix == "2001:db8:1:2::"
    assert frame[ICMPv6NDOptRDNSS].dns == ["2001:db8:1:2::53"]
    assert frame[ICMPv6NDOptRDNSS].lifetime == 1800  # never 0, even with lifetime 0


def test_our_solicitation_for_the_guest_is_a_valid_ns(ndp: NdpResponder) -> None:
    """The relay asks a guest that never spoke for its MAC (RFC 4861 §7.2.2): an NS
    for its address, to the solicited-node group, from our link-local address, with
    our link-layer address so the guest can answer without asking back."""
    reply = ndp.neighbour_solicitation(ip6(GUEST_SLAAC))
    frame = parse(reply)
    assert frame[ICMPv6ND_NS].tgt == GUEST_SLAAC and frame[ICMPv6ND_NS].code == 0
    assert frame[ICMPv6NDOptSrcLLAddr].lladdr == GW_MAC
    assert reply.dst == ip6(sol(GUEST_SLAAC)) and reply.src == ip6(GW_LL)


INVALID_RS = {
    "hop-limit-254": (rs(hlim=254), "bad_hop_limit"),
    "code-3": (IPv6(src=GUEST_LL, dst="ff02::2", hlim=255) / ICMPv6ND_RS(code=3), "bad_code"),
    "unspecified-with-slla": (rs(src="::"), "rs_unspecified_with_slla"),
    "bad-checksum": (IPv6(src=GUEST_LL, dst="ff02::2", hlim=255) / ICMPv6ND_RS(cksum=1),
                     "bad_checksum"),
    "zero-length-option": (IPv6(src=GUEST_LL, dst="ff02::2", hlim=255) / ICMPv6ND_RS()
                           / Raw(b"\x01\x00" + bytes(6)), "option_zero_length"),
    "tiny": (IPv6(src=GUEST_LL, dst="ff02::2", hlim=255, nh=58) / Raw(b"\x85"), "icmpv6_short"),
}


@pytest.mark.parametrize(("pkt", "counter"), INVALID_RS.values(), ids=INVALID_RS.keys())
def test_invalid_rs_dropped_and_counted(pkt: Packet, counter: str) -> None:
    ndp = NdpResponder(CFG)
    assert feed(ndp, pkt) == []
    assert ndp.counters == {counter: 1}


@pytest.mark.parametrize(("pkt", "counter"), [
    (IPv6(src=GUEST_LL, dst="ff02::1", hlim=255) / ICMPv6ND_RA(), "ra_ignored"),
    (IPv6(src=GUEST_LL, dst="ff02::1", hlim=255) / ICMPv6ND_NA(tgt=GUEST_LL), "na_ignored"),
    (IPv6(src=GUEST_LL, dst="fd00::2", hlim=64) / ICMPv6EchoRequest(), "not_ndp"),
])
def test_other_icmpv6_ignored(pkt: Packet, counter: str) -> None:
    ndp = NdpResponder(CFG)
    assert feed(ndp, pkt) == []
    assert ndp.counters == {counter: 1}


def test_bad_arguments_counted(ndp: NdpResponder) -> None:
    assert ndp.handle(b"short", bytes(16), 255, bytes(ICMPv6ND_RS()), mac(GUEST_MAC)) == []
    assert ndp.counters == {"bad_arguments": 1}


# --- properties ---------------------------------------------------------------------------

VALID = [
    ns("fd00::2"), ns(GW_LL, src=GUEST_SLAAC, dst=GW_LL, slla=None), ns("fd00::99"),
    ns("fd00::42", src="::", slla=None), rs(), rs(src="::", slla=None),
    IPv6(src=GUEST_LL, dst="ff02::2", hlim=255) / ICMPv6ND_RS() / ICMPv6NDOptMTU(),
]


def check_any(ndp: NdpResponder, replies: list[NdpReply]) -> None:
    assert ndp.counters["error"] == 0
    assert sum(ndp.counters.values()) >= 1  # every message is accounted for
    for reply in replies:
        frame = parse(reply)
        assert frame.haslayer(ICMPv6ND_NA) or frame.haslayer(ICMPv6ND_RA)
        if frame.haslayer(ICMPv6ND_NA):
            assert frame[ICMPv6ND_NA].R == 1 and frame[ICMPv6ND_NA].S == 1
            assert reply.src != ip6(str(CFG.guest_ipv6))


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bytes, bytes, int, bytes, bool]:
    """(src, dst, hop limit, message, refresh checksum): a valid request, then damaged."""
    raw = bytes(draw(st.sampled_from(VALID)))
    src, dst, hlim, msg = raw[8:24], raw[24:40], raw[7], bytearray(raw[40:])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "append", "option", "hlim", "src"]))
        if op == "truncate":
            del msg[draw(st.integers(0, len(msg))):]
        elif op == "append":
            msg += draw(st.binary(max_size=24))
        elif op == "option":  # an option header with a lying length
            msg += bytes((draw(st.sampled_from([1, 2, 3, 5, 25, 99])), draw(st.integers(0, 4))))
            msg += draw(st.binary(max_size=14))
        elif op == "hlim":
            hlim = draw(st.integers(0, 255))
        elif op == "src":
            src = draw(st.sampled_from([bytes(16), ip6(GUEST_SLAAC), ip6("fd00::15")]))
        elif msg:
            msg[draw(st.integers(0, len(msg) - 1))] = draw(st.integers(0, 255))
    return src, dst, hlim, bytes(msg), draw(st.booleans())


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_messages_never_raise(case: tuple[bytes, bytes, int, bytes, bool]) -> None:
    src, dst, hlim, msg, refresh = case
    if refresh and len(msg) >= 4:  # let the damage reach past the checksum check
        msg = msg[:2] + icmpv6_checksum(src, dst, msg).to_bytes(2, "big") + msg[4:]
    ndp = NdpResponder(CFG)
    check_any(ndp, ndp.handle(src, dst, hlim, msg, mac(GUEST_MAC)))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=16), st.binary(max_size=17), st.integers(-1, 256), st.binary(max_size=80),
       st.binary(max_size=7))
def test_arbitrary_arguments_never_raise(
    src: bytes, dst: bytes, hlim: int, msg: bytes, src_mac: bytes
) -> None:
    ndp = NdpResponder(CFG)
    check_any(ndp, ndp.handle(src, dst, hlim, msg, src_mac))
    # The same bytes with a valid checksum and hop limit, and real addresses.
    src, dst = ip6(GUEST_LL), ip6("ff02::2")
    if len(msg) >= 4:
        msg = msg[:2] + icmpv6_checksum(src, dst, msg).to_bytes(2, "big") + msg[4:]
    check_any(ndp, ndp.handle(src, dst, 255, msg, mac(GUEST_MAC)))


@settings(max_examples=200)
@given(st.integers(0, 2**64 - 1), st.binary(min_size=6, max_size=6))
def test_any_prefix_target_answered_or_guest(iid: int, src_mac: bytes) -> None:
    ndp = NdpResponder(CFG)
    target = str(IPv6Address(int(CFG.prefix_v6.network_address) | iid))
    replies = feed(ndp, ns(target, slla=None), src_mac=":".join(f"{b:02x}" for b in src_mac))
    if target == str(CFG.guest_ipv6):
        assert replies == []
    else:
        [reply] = replies
        check_na(reply, target, to_mac=":".join(f"{b:02x}" for b in src_mac),
                 override=target in ("fd00::2", "fd00::3"))


def test_linux_boot_sequence() -> None:
    """What a Linux guest sends after link-up (seen with a veth peer and the kernel's
    SLAAC): DAD for its link-local, RS, DAD for the SLAAC address, NS for the router."""
    ndp = NdpResponder(CFG)
    assert feed(ndp, ns(GUEST_LL, src="::", slla=None)) == []
    [ra] = feed(ndp, rs())
    check_ra(ra)
    assert feed(ndp, ns(GUEST_SLAAC, src="::", slla=None)) == []
    [na] = feed(ndp, ns(GW_LL, src=GUEST_LL))
    check_na(na, GW_LL)
    assert feed(ndp, ns(GUEST_SLAAC, src="fd00::2")) == []  # never proxy the guest's own
    assert ndp.counters["ns_dad_ignored"] == 2 and ndp.counters["ns_answered"] == 1
