"""A guest that lies about who it is reaches nothing.

The guest may speak only as itself: IPv4 from its own address (0.0.0.0 only for DHCP),
IPv6 from its prefix or link-local addresses, Ethernet from a unicast MAC that is not
the gateway's. Hypothesis sends SYNs toward a real listener on host loopback from every
other source; each must be dropped and counted, open no host connection and leave no
flow. A guest that claims the gateway's IP by ARP changes nothing the relay does.
Driven through `InMemoryGuest`: the real relay on a socketpair, real host sockets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import select
import socket
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address, IPv6Network

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relaynat import RelayConfig
from relaynat.packet_builder import arp_reply
from relaynat.testing import frames
from relaynat.testing.guest import InMemoryGuest
from relaynat.wire import SYN

CONFIG = RelayConfig(dns_upstream=IPv4Address("127.0.0.1"))
PREFIX = IPv6Network(f"{CONFIG.guest_ipv6}/64", strict=False)
LINK_LOCAL = IPv6Network("fe80::/10")


@pytest.fixture(scope="module")
def listener() -> Iterator[socket.socket]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        sock.setblocking(False)
        yield sock


def _nothing_pending(sock: socket.socket) -> bool:
    return not select.select([sock], [], [], 0.02)[0]


async def _spoofed_syn(addressing: frames.Addressing, v6: bool, port: int) -> dict[str, int]:
    """Send one SYN as `addressing` says, then a genuine ARP request whose reply proves
    the SYN was handled (frames are handled in order); the relay's counters."""
    async with InMemoryGuest(CONFIG) as guest:
        await guest.send(frames.tcp_segment(addressing, v6, 40000, port, 1, 0, SYN))
        await guest.send(frames.arp_request(guest.addressing, guest.addressing.gateway4))
        await guest.expect(lambda r: r.arp is not None)
        assert guest.relay.flows() == []
        return guest.stats()


v4_not_guest = st.ip_addresses(v=4).filter(
    lambda a: a != CONFIG.guest_ipv4 and not a.is_unspecified)
v6_outside = st.ip_addresses(v=6).filter(lambda a: a not in PREFIX and a not in LINK_LOCAL
                                         and not a.is_unspecified)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(src=st.one_of(v4_not_guest, v6_outside))
def test_a_syn_from_any_other_address_is_dropped_and_reaches_no_host_socket(
        listener: socket.socket, src: IPv4Address | IPv6Address) -> None:
    v6 = src.version == 6
    spoofed = dataclasses.replace(frames.DEFAULT_ADDRESSING,
                                  **{"guest6" if v6 else "guest4": src.packed})
    stats = asyncio.run(_spoofed_syn(spoofed, v6, listener.getsockname()[1]))
    assert stats["drop_ip_spoofed_source"] == 1, stats
    assert _nothing_pending(listener), f"a SYN from {src} reached the host"


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mac=st.one_of(st.just(CONFIG.gateway_mac),
                     st.binary(min_size=6, max_size=6).map(lambda m: bytes([m[0] | 1]) + m[1:])),
       v6=st.booleans())
def test_a_syn_from_the_gateways_or_a_group_mac_is_dropped(
        listener: socket.socket, mac: bytes, v6: bool) -> None:
    spoofed = dataclasses.replace(frames.DEFAULT_ADDRESSING, guest_mac=mac)
    stats = asyncio.run(_spoofed_syn(spoofed, v6, listener.getsockname()[1]))
    assert stats["drop_eth_bad_source"] == 1, stats
    assert _nothing_pending(listener), f"a SYN from MAC {mac.hex()} reached the host"


async def test_claiming_the_gateways_address_by_arp_changes_nothing(
        listener: socket.socket) -> None:
    async with InMemoryGuest(CONFIG) as guest:
        a = guest.addressing
        # A gratuitous ARP in which the guest says the gateway's address is its own.
        await guest.send(arp_reply(a.guest_mac, a.gateway4, b"\xff" * 6, a.gateway4))
        await guest.send(frames.arp_request(a, a.gateway4))
        reply = await guest.expect(lambda r: r.arp is not None)
        assert reply.arp is not None and reply.arp.sender_mac == CONFIG.gateway_mac
        # The relay still speaks as the gateway and still relays the guest's own flows.
        conn = await guest.tcp_connect(listener.getsockname()[1])
        assert conn is not None
        accepted, _ = await asyncio.get_running_loop().sock_accept(listener)
        accepted.close()
