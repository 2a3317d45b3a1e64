"""addressing.AddressMap: where guest destinations are on the host, and which source a
forwarded client shows the guest, driven without I/O."""

from __future__ import annotations

from collections import Counter
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

from hypothesis import given
from hypothesis import strategies as st

from relaynat.addressing import AddressMap
from relaynat.config import RelayConfig

MAP = AddressMap(RelayConfig(inbound_source="client"), "192.0.2.53")
MAP_GATEWAY = AddressMap(RelayConfig(), "192.0.2.53")
MAP_NONE = AddressMap(RelayConfig(map_host_loopback_v4=None, map_host_loopback_v6=None),
                      "127.0.0.53")
#: Destinations a host socket connected to would reach host loopback with.
HOST_LOCAL = ("0.0.0.0", "0.1.2.3", "127.0.0.1", "127.0.0.2", "127.255.255.255", "::", "::1",
              "::ffff:0.0.0.0", "::ffff:127.0.0.1", "::ffff:127.9.9.9", "::127.0.0.1",
              "::0.0.0.2", "64:ff9b::7f00:1", "64:ff9b::", "64:ff9b::1")
#: The IPv6 prefixes that embed an IPv4 address: mapped, NAT64, compatible.
EMBEDDING = tuple(IPv6Network(n) for n in ("::ffff:0:0/96", "64:ff9b::/96", "::/96"))


def packed(text: str) -> bytes:
    return ip_address(text).packed


def reaches_host_loopback(addr: IPv4Address | IPv6Address) -> bool:
    """The oracle, from ipaddress: loopback or "this network" (0.0.0.0/8, which Linux
    connects to loopback), :: , or an IPv6 form embedding such an IPv4 address."""
    if isinstance(addr, IPv6Address):
        if addr.is_loopback or addr.is_unspecified:
            return True
        if not any(addr in net for net in EMBEDDING):
            return False
        addr = IPv4Address(int(addr) & 0xFFFFFFFF)
    return addr.is_loopback or addr in IPv4Network("0.0.0.0/8")


embedded_host_local = st.builds(
    lambda net, first, rest: IPv6Address(int(net.network_address) | first << 24 | rest),
    st.sampled_from(EMBEDDING), st.sampled_from([0, 127]), st.integers(0, 2**24 - 1))


def test_outbound_mapping() -> None:
    assert MAP.host_ip_for(packed("10.0.2.2"), 80) == "127.0.0.1"
    assert MAP.host_ip_for(packed("fd00::2"), 80) == "::1"
    assert MAP.host_ip_for(packed("10.0.2.3"), 53) == "192.0.2.53"
    assert MAP.host_ip_for(packed("10.0.2.3"), 80) is None
    assert MAP.host_ip_for(packed("fd00::3"), 53) == "192.0.2.53"
    assert MAP.host_ip_for(packed("10.0.2.15"), 80) is None
    assert MAP.host_ip_for(packed("fd00::99"), 80) is None  # the guest's own /64
    assert MAP.host_ip_for(packed("fe80::1"), 80) is None
    assert MAP.host_ip_for(packed("198.51.100.7"), 80) == "198.51.100.7"
    assert MAP.host_ip_for(packed("2001:db8::7"), 80) == "2001:db8::7"


def test_inbound_source_examples() -> None:
    assert MAP.inbound_source(packed("198.51.100.7"), False) == packed("198.51.100.7")
    assert MAP.inbound_source(packed("2001:db8::7"), True) == packed("2001:db8::7")
    # Loopback, the guest's own network, and the other family appear as the gateway.
    assert MAP.inbound_source(packed("127.0.0.1"), False) == packed("10.0.2.2")
    assert MAP.inbound_source(packed("127.8.9.10"), False) == packed("10.0.2.2")
    assert MAP.inbound_source(packed("::1"), True) == packed("fd00::2")
    assert MAP.inbound_source(packed("10.0.2.15"), False) == packed("10.0.2.2")
    assert MAP.inbound_source(packed("fd00::15"), True) == packed("fd00::2")
    assert MAP.inbound_source(packed("198.51.100.7"), True) == packed("fd00::2")
    assert MAP_GATEWAY.inbound_source(packed("198.51.100.7"), False) == packed("10.0.2.2")


@given(st.one_of(st.ip_addresses(), embedded_host_local), st.booleans(), st.booleans())
def test_inbound_source_is_one_the_guest_can_answer(addr: IPv4Address | IPv6Address,
                                                    v6: bool, client_mode: bool) -> None:
    """Whatever the client, the source is of the guest's family, never loopback,
    multicast or unspecified, never inside the guest's network unless it is the
    gateway, and the client itself whenever none of that rules it out."""
    amap = MAP if client_mode else MAP_GATEWAY
    gateway = packed("fd00::2") if v6 else packed("10.0.2.2")
    got = amap.inbound_source(addr.packed, v6)
    assert len(got) == (16 if v6 else 4)
    seen = ip_address(got)
    assert not (seen.is_loopback or seen.is_multicast or seen.is_unspecified)
    assert not reaches_host_loopback(seen)
    net = RelayConfig().prefix_v6 if v6 else RelayConfig().network_v4
    assert seen not in net or got == gateway
    if not client_mode or addr.version != (6 if v6 else 4):
        assert got == gateway
    elif got != gateway:
        assert got == addr.packed


def test_host_local_destinations_are_never_relayed() -> None:
    """With the mapping on or off, only the mapped address
    stands for host loopback; the other spellings of it reach nothing."""
    for amap in (MAP, MAP_GATEWAY, MAP_NONE):
        for dst in HOST_LOCAL:
            for port in (80, 53):
                assert amap.host_ip_for(packed(dst), port) is None, dst
    assert MAP.host_ip_for(packed("10.0.2.2"), 80) == "127.0.0.1"
    assert MAP.host_ip_for(packed("fd00::2"), 80) == "::1"
    assert MAP_NONE.host_ip_for(packed("10.0.2.2"), 80) is None
    assert MAP_NONE.host_ip_for(packed("fd00::2"), 80) is None
    # The DNS address still goes to a resolver on host loopback: that is its purpose.
    assert MAP_NONE.host_ip_for(packed("10.0.2.3"), 53) == "127.0.0.53"
    assert MAP_NONE.host_ip_for(packed("fd00::3"), 53) == "127.0.0.53"
    # Other embedded IPv4 addresses are ordinary destinations (the policy's business).
    assert MAP.host_ip_for(packed("::ffff:198.51.100.7"), 80) == "::ffff:c633:6407"
    assert MAP.host_ip_for(packed("64:ff9b::c633:6407"), 80) == "64:ff9b::c633:6407"
    assert MAP.host_ip_for(packed("1.0.0.0"), 80) == "1.0.0.0"


def test_host_local_refusals_are_counted() -> None:
    stats: Counter[str] = Counter()
    for dst in HOST_LOCAL:
        MAP_NONE.host_ip_for(packed(dst), 80, stats)
    MAP_NONE.host_ip_for(packed("10.0.2.2"), 80, stats)  # unmapped gateway: another reason
    MAP.host_ip_for(packed("10.0.2.2"), 80, stats)
    assert stats == {"dst_host_local_refused": len(HOST_LOCAL)}


@given(st.one_of(st.ip_addresses(), embedded_host_local), st.integers(0, 65535),
       st.booleans())
def test_nothing_but_the_mapped_and_dns_addresses_reaches_host_loopback(
        dst: IPv4Address | IPv6Address, port: int, mapped: bool) -> None:
    amap = MAP if mapped else MAP_NONE
    stats: Counter[str] = Counter()
    got = amap.host_ip_for(dst.packed, port, stats)
    special = {"10.0.2.3", "fd00::3"} | ({"10.0.2.2", "fd00::2"} if mapped else set())
    if reaches_host_loopback(dst):
        assert got is None
        assert stats == {"dst_host_local_refused": 1}
    elif got is not None and str(dst) not in special:
        assert ip_address(got) == dst
        assert not reaches_host_loopback(ip_address(got))
