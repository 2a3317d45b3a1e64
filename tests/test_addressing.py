"""addressing.AddressMap: where guest destinations are on the host, and which source a
forwarded client shows the guest, driven without I/O."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address

from hypothesis import given
from hypothesis import strategies as st

from relaynat.addressing import AddressMap
from relaynat.config import RelayConfig

MAP = AddressMap(RelayConfig(inbound_source="client"), "192.0.2.53")
MAP_GATEWAY = AddressMap(RelayConfig(), "192.0.2.53")


def packed(text: str) -> bytes:
    return ip_address(text).packed


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


@given(st.ip_addresses(), st.booleans(), st.booleans())
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
    net = RelayConfig().prefix_v6 if v6 else RelayConfig().network_v4
    assert seen not in net or got == gateway
    if not client_mode or addr.version != (6 if v6 else 4):
        assert got == gateway
    elif got != gateway:
        assert got == addr.packed
