"""The DNS address may be off the guest's subnet (pasta's `--dns-forward 169.254.1.1`,
reached through the gateway), but never an address no DNS server can have."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from relaynat.config import ConfigError, RelayConfig


@pytest.mark.parametrize("dns", ["169.254.1.1", "169.254.0.1", "192.0.2.53", "10.0.2.3"])
def test_off_link_dns_address_taken(dns: str) -> None:
    assert RelayConfig(dns_ipv4=IPv4Address(dns)).validate().dns_ipv4 == IPv4Address(dns)


@pytest.mark.parametrize("dns", ["127.0.0.53", "224.0.0.251", "0.0.0.0", "255.255.255.255",
                                 "10.0.2.0", "10.0.2.255", "10.0.2.15"])
def test_impossible_dns_address_refused(dns: str) -> None:
    with pytest.raises(ConfigError):
        RelayConfig(dns_ipv4=IPv4Address(dns)).validate()


def test_gateway_stays_on_link() -> None:
    with pytest.raises(ConfigError, match="outside the guest subnet"):
        RelayConfig(gateway_ipv4=IPv4Address("169.254.1.1"),
                    map_host_loopback_v4=None).validate()
