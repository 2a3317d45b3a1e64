"""Replies a guest can provoke in a loop are rate limited: ICMP errors for datagrams to
nowhere (RFC 4443 §2.4(f), at Linux's icmp_msgs_per_sec/icmp_msgs_burst) and router
advertisements answering solicitations (RFC 4861 §10). Frames are scapy-built; the
relay's output is collected as the frames it would send."""

from __future__ import annotations

import asyncio
from collections import Counter

from scapy.layers.inet import IP, UDP, Ether
from scapy.layers.inet6 import ICMPv6ND_RA, ICMPv6ND_RS, IPv6

from relaynat.addressing import AddressMap
from relaynat.config import RelayConfig
from relaynat.host.udp_relay import ICMP_ERRORS_BURST, ICMP_ERRORS_PER_S, UdpRelay
from relaynat.link.services import LinkServices
from relaynat.wire import parse_ethernet, parse_ipv4, parse_ipv6

GUEST_MAC = "02:00:00:00:00:15"


async def test_icmp_errors_toward_the_guest_are_rate_limited() -> None:
    config = RelayConfig()
    sent: list[bytes] = []
    stats: Counter[str] = Counter()
    loop = asyncio.get_running_loop()
    udp = UdpRelay(config, loop, sent.append, lambda head, payload: None, stats)
    udp.guest_mac = bytes.fromhex(GUEST_MAC.replace(":", ""))
    frame = bytes(Ether(src=GUEST_MAC) / IP(src="10.0.2.15", dst="10.0.2.3")
                  / UDP(sport=40000, dport=9) / b"x")
    ip = parse_ipv4(parse_ethernet(memoryview(frame)).payload)
    start = loop.time()
    for _ in range(3000):
        udp.refuse(ip)
    elapsed = loop.time() - start
    assert len(sent) >= ICMP_ERRORS_BURST
    assert len(sent) <= ICMP_ERRORS_BURST + ICMP_ERRORS_PER_S * elapsed + 1
    assert stats["udp_icmp_rate_limited"] == 3000 - len(sent)
    assert stats["udp_refused_unmapped"] == 3000
    udp.close()


def test_solicited_router_advertisements_are_rate_limited() -> None:
    config = RelayConfig()
    now = [0.0]
    sent: list[bytes] = []
    stats: Counter[str] = Counter()
    link = LinkServices(config, AddressMap(config, None), sent.append, stats,
                        clock=lambda: now[0])
    rs = bytes(IPv6(src="fe80::15", dst="ff02::2", hlim=255) / ICMPv6ND_RS())
    mac = bytes.fromhex(GUEST_MAC.replace(":", ""))

    def solicit(times: int) -> int:
        before = len(sent)
        for _ in range(times):
            assert link.ndp6(parse_ipv6(memoryview(rs)), mac)
        return len(sent) - before

    # A booting guest's three solicitations are all answered, a loop is not.
    assert solicit(3) == 3
    assert solicit(100) == 0
    now[0] = 3.0  # MIN_DELAY_BETWEEN_RAS later: one more
    assert solicit(5) == 1
    assert stats["ndp_ra_rate_limited"] == 104
    assert all(Ether(f).haslayer(ICMPv6ND_RA) for f in sent)
