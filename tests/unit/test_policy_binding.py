"""A Policy is enforced bound to the relay that enforces it, not to the configuration it
was built with: its `host`, `loopback` and `dns` groups are that relay's addresses.

Before, a policy judged the mapped gateway of the config it was built from: a
`Policy.sandbox()` (built for 10.0.2.2) given to a relay whose gateway 198.18.0.2 stands
for host loopback let the guest reach the host's 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from ipaddress import IPv4Address, ip_address

import pytest

from relaynat import Guests, Policy, Relay, RelayConfig
from relaynat.testing import InMemoryGuest
from relaynat.wire import IPPROTO_TCP, IPPROTO_UDP

#: A relay whose gateway (not the default 10.0.2.2) stands for the host's loopback.
CFG = RelayConfig(guest_ipv4=IPv4Address("198.18.0.15"), gateway_ipv4=IPv4Address("198.18.0.2"),
                  dns_ipv4=IPv4Address("198.18.0.3"),
                  map_host_loopback_v4=IPv4Address("198.18.0.2"),
                  dns_upstream=IPv4Address("127.0.0.1"))


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A host service on loopback that a sandboxed guest must not reach."""
    sock = socket.create_server(("127.0.0.1", 0))
    sock.setblocking(False)
    yield sock
    sock.close()


def _accepted(sock: socket.socket) -> bool:
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


def test_bound_policy_judges_the_relays_addresses() -> None:
    built_for_default = Policy.sandbox()
    bound = built_for_default.bound_to(CFG)
    gateway = ip_address("198.18.0.2").packed
    assert built_for_default.decide(IPPROTO_TCP, gateway, 80).allow  # nothing maps it there
    decision = bound.decide(IPPROTO_TCP, gateway, 80)
    assert not decision.allow
    assert bound.rules[decision.rule].comment == "host loopback"
    # The `dns` group moves with the configuration too: the old DNS address is just a
    # private address to the bound policy, the relay's own is its DNS service.
    assert built_for_default.decide(IPPROTO_UDP, ip_address("10.0.2.3").packed, 53).allow
    assert not bound.decide(IPPROTO_UDP, ip_address("10.0.2.3").packed, 53).allow
    assert bound.decide(IPPROTO_UDP, ip_address("198.18.0.3").packed, 53).allow
    assert bound.bound_to(CFG) is bound
    assert bound == Policy.sandbox(CFG)
    assert bound != built_for_default


async def test_relay_binds_the_policy_it_is_given(listener: socket.socket) -> None:
    async with InMemoryGuest(CFG, policy=Policy.sandbox()) as guest:
        assert guest.relay.policy == Policy.sandbox(CFG)
        with pytest.raises(ConnectionRefusedError):
            await guest.tcp_connect(listener.getsockname()[1])
        await asyncio.sleep(0.05)
        assert not _accepted(listener)
        assert guest.stats()["policy_denied"] == 1


async def test_set_policy_binds_the_policy(listener: socket.socket) -> None:
    async with InMemoryGuest(CFG) as guest:
        guest.relay.set_policy(Policy.sandbox())
        with pytest.raises(ConnectionRefusedError):
            await guest.tcp_connect(listener.getsockname()[1])
        await asyncio.sleep(0.05)
        assert not _accepted(listener)


async def test_guests_add_binds_the_policy(listener: socket.socket) -> None:
    async with Guests() as guests:
        relay: Relay = guests.add("a", CFG, policy=Policy.sandbox())
        async with InMemoryGuest(relay=relay) as guest:
            with pytest.raises(ConnectionRefusedError):
                await guest.tcp_connect(listener.getsockname()[1])
            await asyncio.sleep(0.05)
            assert not _accepted(listener)
