"""Relay configuration: the guest's addressing, limits and options.

One frozen `RelayConfig` describes one guest. Its defaults are slirp's addressing
(guest 10.0.2.15/24, gateway 10.0.2.2, DNS 10.0.2.3), which is also what qemu's
user networking and slirp4netns users expect, and passt's MTU of 65520 so that one
frame carries almost 64 KiB and per-frame Python costs are amortised.

`validate()` refuses inconsistent settings with a message that names the field and
what is wrong with it, so a CLI or an embedding launcher can show it as is.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from relaynat.errors import Error
from relaynat.syn_backlog import SYN_RATE

#: Largest MTU we accept: 65535 (IPv4 total length) minus a 14-byte Ethernet header,
#: rounded down to a multiple of 8 as passt does (`ETH_MAX_MTU` / `MAX_MTU`).
MAX_MTU = 65520
#: RFC 791 §3.1: every host must accept 576-byte datagrams; below that TCP is unusable.
MIN_MTU = 576
#: RFC 8200 §5: every IPv6 link has an MTU of at least 1280.
MIN_MTU_V6 = 1280

#: Locally administered unicast MAC of the relay's side of the link (bit 1 of the first
#: octet set, bit 0 clear). The guest sees every address we answer for at this MAC.
DEFAULT_GATEWAY_MAC = bytes.fromhex("5255" "0a000202")


class ConfigError(Error, ValueError):
    """A configuration value is invalid; the message says which and why."""


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`json.loads`'s object_pairs_hook for input a person writes (policy files, control
    requests): json.loads keeps the last of a repeated key silently, so
    `{"default": "deny", ..., "default": "allow"}` would mean allow-all while it reads as
    deny. A repeated key is a ConfigError (a ValueError) naming it."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ConfigError(f"duplicate key {key!r} in a JSON object")
        out[key] = value
    return out


@dataclass(slots=True, frozen=True)
class RelayConfig:
    """Everything that shapes one guest's network.

    Addresses are `ipaddress` objects; the core only compares and packs them. IPv6
    defaults are slirp's (fd00::/64, gateway fd00::2, DNS fd00::3); the guest picks its
    own addresses by SLAAC from the router advertisement, and DHCPv6 hands out
    `guest_ipv6` (as 10.0.2.15 by DHCP), so any address of the prefix is the guest's.
    """

    ipv4: bool = True
    """Serve IPv4 (`-6` on the command line turns it off)."""
    ipv6: bool = True
    """Serve IPv6 (`-4` on the command line turns it off)."""

    guest_ipv4: IPv4Address = IPv4Address("10.0.2.15")
    """The guest's address: DHCP hands it out, and frames from any other source are dropped."""
    prefix_len_v4: int = 24
    """Prefix length of the guest's subnet, which holds the guest and gateway addresses
    (and the DNS address, unless that is off-link)."""
    gateway_ipv4: IPv4Address = IPv4Address("10.0.2.2")
    """The relay's address on the link: answers ARP, serves DHCP, is the default route."""
    dns_ipv4: IPv4Address = IPv4Address("10.0.2.3")
    """The DNS address DHCP announces; its port 53 (UDP and TCP) goes to `dns_upstream`.
    It may lie outside the guest's subnet (pasta's `--dns-forward 169.254.1.1`), reached
    through the gateway."""
    map_host_loopback_v4: IPv4Address | None = IPv4Address("10.0.2.2")
    """Guest address whose traffic goes to the host's loopback (slirp and passt map the
    gateway there), the only way there: a guest destination the host would deliver to
    itself (0.0.0.0/8, 127.0.0.0/8, ::, ::1 and their IPv4-mapped, IPv4-compatible and
    NAT64 forms) is refused (addressing.py). None disables the mapping: the guest cannot
    reach host loopback."""
    host_loopback_v4: IPv4Address = IPv4Address("127.0.0.1")
    """Where `map_host_loopback_v4` traffic goes on the host."""
    mtu: int = MAX_MTU
    """The link MTU DHCP and router advertisements offer, `MIN_MTU` to `MAX_MTU`
    (at least `MIN_MTU_V6` with IPv6)."""
    gateway_mac: bytes = DEFAULT_GATEWAY_MAC
    """The relay's MAC address on the link (6 bytes, unicast)."""
    dhcp_lease_s: int = 3600
    """DHCP lease time in seconds (option 51)."""
    max_tcp_flows: int = 16384
    """Upper bound of concurrent TCP flows; a SYN beyond it is answered with RST."""
    max_pending_connects: int = 512
    """Upper bound of host connect() calls in progress; a SYN beyond it gets RST."""
    connect_timeout_s: float = 10.0
    """How long a host connect() may take before the guest gets a RST."""
    first_flight_timeout_s: float = 10.0
    """How long a guest has to send the first flight of a flow whose name is checked on
    the wire (a domain rule's inspected ports) before it is reset (first_flight.py)."""
    tcp_idle_timeout_s: float = 7200.0
    """A flow with no traffic either way for this long is reset both ways (passt: 2 h)."""
    tcp_ooo_budget: int = 16 << 20
    """Bytes of out-of-order guest TCP data all flows may hold together, waiting for a
    hole to fill (ooo_queue.py: each held segment is charged its length plus 64); 0
    holds none, and SACK is then not offered: every segment beyond a hole is dropped
    and retransmitted by the guest."""
    guest_queue_limit: int = 8 << 20
    """Frames queued toward a socket transport that cannot take them yet, in bytes;
    beyond it frames are dropped and counted (TCP retransmits them)."""
    pcap_path: str | None = None
    """Write every frame both ways to this pcap file (None: no capture)."""
    max_udp_flows: int = 4096
    """Upper bound of concurrent UDP flows (guest port, destination, destination port);
    a datagram that would open one more is dropped and counted."""
    max_icmp_flows: int = 1024
    """Upper bound of concurrent ICMP echo sessions (one ping socket per identifier and
    destination); an echo request that would open one more is dropped and counted."""
    new_flow_rate: float | None = None
    """New guest-initiated flows per second, TCP, UDP and ICMP echo together (one token
    bucket, so switching protocol buys nothing), including queries forwarded from the
    DNS address (each opens a host socket; only static answers are free). Inbound
    (forwarded) flows do not spend it: they count toward the max_*_flows bounds only.
    None: unlimited (passt and slirp have no such limit). Over it: TCP SYN gets RST,
    UDP and ICMP are dropped, each counted."""
    new_flow_burst: int | None = None
    """Flows that may open at once after a quiet spell (the bucket's size); None: one
    second's worth, ceil(new_flow_rate), at least 1."""
    syn_rate: float = SYN_RATE
    """Guest TCP flows opened per second under a sustained stream of SYNs (after a
    burst of 256): the SYNs beyond wait in a backlog of 1024, then are dropped and
    retransmitted by the guest; nothing is refused (syn_backlog.py). It keeps a SYN
    flood from taking the relay's thread from the flows already open."""
    udp_idle_timeout_s: float = 30.0
    """A UDP flow idle this long is closed (conntrack's nf_conntrack_udp_timeout, passt);
    once it has seen traffic both ways, `udp_stream_timeout_s` applies instead."""
    udp_stream_timeout_s: float = 120.0
    """Idle timeout of a UDP flow that has seen traffic both ways
    (nf_conntrack_udp_timeout_stream)."""
    dns_udp_timeout_s: float = 10.0
    """Lifetime of a forwarded DNS query's UDP flow past its last datagram (slirp's
    SO_EXPIREFAST): resolvers use a fresh port per query."""
    dns_upstream: IPv4Address | IPv6Address | None = None
    """Where the guest's DNS traffic (dns_ipv4, port 53, UDP and TCP) goes on the host.
    None: the first nameserver of `resolv_conf`, followed as that file changes."""
    resolv_conf: str = "/etc/resolv.conf"
    """The host's resolver configuration (resolv.conf(5), an absolute path) whose first
    nameserver is the upstream when `dns_upstream` is None. Read at start, and looked at
    again (a stat, at most once a second, when the guest asks its DNS address) so that a
    changed file (VPN, DHCP renewal, NetworkManager, a symbolic link pointed elsewhere)
    serves new DNS flows without a restart, while open ones finish with the old
    resolver; a version naming no nameserver keeps the last one (link/dns.py)."""
    dns_records: tuple[tuple[str, str], ...] = ()
    """Static records (name, IPv4 or IPv6 address) answered by the relay itself for A and
    AAAA queries, gvproxy-style; names compare case-insensitively, without a final dot."""
    dns_ttl_min_s: float = 10.0
    """Floor of the TTL with which an address answered to the guest stays valid for its
    name under a policy's domain rules (domains.py): an answer with TTL 0 (dnsmasq's
    local names) must still let the connect that follows it through."""
    dns_ttl_max_s: float = 3600.0
    """Cap of that TTL: an answer with a week-long TTL keeps its address valid this long."""
    dns_names_grace_s: float = 60.0
    """How long an address learned for a name stays valid after the last flow to it
    ended (while flows to it are open it stays valid, whatever its TTL)."""
    max_dns_names: int = 4096
    """Upper bound of (name, address) pairs learned per guest; beyond it the oldest goes
    first (counted as dns_names_evicted)."""
    prefix_v6: IPv6Network = IPv6Network("fd00::/64")
    """The /64 the router advertisement offers for SLAAC (RFC 4862 §5.5.3 needs 64 bits
    of interface identifier on Ethernet, RFC 2464 §4)."""
    guest_ipv6: IPv6Address = IPv6Address("fd00::15")
    """Address DHCPv6 assigns (IA_NA) and namespace mode configures."""
    gateway_ipv6: IPv6Address = IPv6Address("fd00::2")
    """The relay's global IPv6 address on the link (its router advertisements come from
    `gateway_link_local`)."""
    dns_ipv6: IPv6Address = IPv6Address("fd00::3")
    """The IPv6 DNS address (RDNSS and DHCPv6 announce it), served like `dns_ipv4`."""
    map_host_loopback_v6: IPv6Address | None = IPv6Address("fd00::2")
    """As map_host_loopback_v4, for IPv6: the gateway stands for the host's ::1."""
    host_loopback_v6: IPv6Address = IPv6Address("::1")
    """Where `map_host_loopback_v6` traffic goes on the host."""
    ra_router_lifetime_s: int = 9000
    """Router lifetime in router advertisements, 0..9000 s (RFC 4861 §4.2)."""
    prefix_valid_lifetime_s: int = 86400
    """Valid lifetime of the prefix (RFC 4861 §4.6.2) and of DHCPv6 leases."""
    prefix_preferred_lifetime_s: int = 14400
    """Preferred lifetime of the prefix and of DHCPv6 leases; at most the valid one."""
    inbound_source: str = "gateway"
    """Source address the guest sees on a forwarded (inbound) flow: "gateway" (passt's
    and slirp's default: every client seems to be the host) or "client" (its real
    address, where that can travel on the guest's link; addressing.py)."""
    udp_inbound_timeout_s: float = 180.0
    """Lifetime of an inbound UDP flow (a forwarded port's client) past its last
    datagram either way; passt uses 180 s for its UDP flows."""

    @property
    def network_v4(self) -> IPv4Network:
        """The guest's IPv4 subnet (`guest_ipv4`/`prefix_len_v4`)."""
        return IPv4Network(f"{self.guest_ipv4}/{self.prefix_len_v4}", strict=False)

    @property
    def gateway_link_local(self) -> IPv6Address:
        """fe80::/64 with the modified EUI-64 of the gateway MAC (RFC 4291 Appendix A):
        router advertisements must come from a link-local address (RFC 4861 §6.1.2)."""
        return IPv6Address(b"\xfe\x80" + bytes(6) + eui64(self.gateway_mac))

    def replace(self, **changes: Any) -> RelayConfig:
        """A copy with `changes` (field=value) applied; not validated, call `validate()`."""
        return dataclasses.replace(self, **changes)

    def validate(self) -> RelayConfig:
        """Check consistency; return self so calls chain. Raises ConfigError."""
        if not 0 < self.prefix_len_v4 <= 30:
            raise ConfigError(
                f"IPv4 prefix length {self.prefix_len_v4} must be 1..30 "
                "(the subnet must hold the guest, the gateway and the DNS address)"
            )
        net = self.network_v4
        for name in ("guest_ipv4", "gateway_ipv4", "dns_ipv4"):
            addr = getattr(self, name)
            # The DNS address may be off-link, reached through the gateway as pasta's
            # --dns-forward 169.254.1.1 is; the relay answers it by address alone.
            if addr not in net and name != "dns_ipv4":
                raise ConfigError(f"{name} {addr} is outside the guest subnet {net}")
            if addr in (net.network_address, net.broadcast_address):
                raise ConfigError(f"{name} {addr} is the network or broadcast address of {net}")
        if (self.dns_ipv4 not in net and (self.dns_ipv4.is_loopback or self.dns_ipv4.is_multicast
                                          or self.dns_ipv4.is_unspecified
                                          or self.dns_ipv4 == IPv4Address("255.255.255.255"))):
            raise ConfigError(f"dns_ipv4 {self.dns_ipv4} cannot be a DNS server's address")
        if self.guest_ipv4 in (self.gateway_ipv4, self.dns_ipv4):
            raise ConfigError(f"guest address {self.guest_ipv4} clashes with gateway or DNS")
        if self.map_host_loopback_v4 is not None and self.map_host_loopback_v4 == self.guest_ipv4:
            raise ConfigError("the host-loopback mapping address cannot be the guest's address")
        if not self.host_loopback_v4.is_loopback:
            raise ConfigError(f"host loopback address {self.host_loopback_v4} is not loopback")
        if not MIN_MTU <= self.mtu <= MAX_MTU:
            raise ConfigError(f"MTU {self.mtu} must be between {MIN_MTU} and {MAX_MTU}")
        if len(self.gateway_mac) != 6 or self.gateway_mac[0] & 1:
            raise ConfigError("gateway MAC must be a 6-byte unicast address")
        for name in ("max_tcp_flows", "max_pending_connects", "dhcp_lease_s", "guest_queue_limit",
                     "max_udp_flows", "max_icmp_flows", "max_dns_names"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("connect_timeout_s", "first_flight_timeout_s", "tcp_idle_timeout_s",
                     "udp_idle_timeout_s",
                     "udp_stream_timeout_s", "dns_udp_timeout_s", "udp_inbound_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, not {getattr(self, name)}")
        if not 0 <= self.dns_ttl_min_s <= self.dns_ttl_max_s or self.dns_names_grace_s < 0:
            raise ConfigError("dns_ttl_min_s must be at least 0 and at most dns_ttl_max_s, "
                              "and dns_names_grace_s at least 0")
        if self.tcp_ooo_budget < 0:
            raise ConfigError(f"tcp_ooo_budget must be at least 0, not {self.tcp_ooo_budget}")
        self._validate_rate()
        for record in self.dns_records:
            if len(record) != 2 or not str(record[0]).strip(".") or len(str(record[0])) > 253:
                raise ConfigError(f"DNS record {record!r} is not (name, IP address)")
            parse_ip(str(record[1]), f"DNS record {record[0]}")
        if (not isinstance(self.resolv_conf, str) or not self.resolv_conf.startswith("/")
                or "\0" in self.resolv_conf):
            raise ConfigError(f"resolv_conf {self.resolv_conf!r} must be an absolute path "
                              "(a str)")
        if self.inbound_source not in ("gateway", "client"):
            raise ConfigError(f"inbound source {self.inbound_source!r} must be 'gateway' or "
                              "'client'")
        if not (self.ipv4 or self.ipv6):
            raise ConfigError("at least one of IPv4 and IPv6 must be enabled")
        if self.ipv6:
            self._validate_v6()
        return self

    def _validate_rate(self) -> None:
        if not 0 < self.syn_rate < float("inf"):
            raise ConfigError(f"syn_rate must be a positive number of flows per second, "
                              f"not {self.syn_rate}")
        rate, burst = self.new_flow_rate, self.new_flow_burst
        if rate is not None and not (0 < rate < float("inf")):
            raise ConfigError(f"new_flow_rate must be a positive number of flows per second, "
                              f"not {rate} (None means unlimited)")
        if burst is not None:
            if rate is None:
                raise ConfigError("new_flow_burst needs new_flow_rate (without a rate new "
                                  "flows are unlimited)")
            if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
                raise ConfigError(f"new_flow_burst must be a whole number of at least 1, "
                                  f"not {burst!r}")

    def _validate_v6(self) -> None:
        if self.mtu < MIN_MTU_V6:
            raise ConfigError(f"MTU {self.mtu} is below IPv6's minimum of {MIN_MTU_V6}; "
                              "raise it or run IPv4 only")
        net = self.prefix_v6
        if net.prefixlen != 64:
            raise ConfigError(f"IPv6 prefix {net} must be a /64 (SLAAC, RFC 4862)")
        if net.is_multicast or net.is_link_local:
            raise ConfigError(f"IPv6 prefix {net} must be a unicast, non-link-local prefix")
        for name in ("guest_ipv6", "gateway_ipv6", "dns_ipv6"):
            addr = getattr(self, name)
            if addr not in net:
                raise ConfigError(f"{name} {addr} is outside the IPv6 prefix {net}")
            if addr == net.network_address:
                raise ConfigError(f"{name} {addr} is the subnet-router anycast address of {net}")
        if self.guest_ipv6 in (self.gateway_ipv6, self.dns_ipv6):
            raise ConfigError(f"guest address {self.guest_ipv6} clashes with gateway or DNS")
        if self.map_host_loopback_v6 is not None and self.map_host_loopback_v6 == self.guest_ipv6:
            raise ConfigError("the host-loopback mapping address cannot be the guest's address")
        if not self.host_loopback_v6.is_loopback:
            raise ConfigError(f"host loopback address {self.host_loopback_v6} is not loopback")
        if not 0 < self.prefix_preferred_lifetime_s <= self.prefix_valid_lifetime_s:
            raise ConfigError("prefix preferred lifetime must be positive and not above the "
                              "valid lifetime (RFC 4861 §4.6.2)")
        if not 0 <= self.ra_router_lifetime_s <= 9000:
            raise ConfigError("router lifetime must be 0..9000 s (RFC 4861 §6.2.1)")


def eui64(mac: bytes) -> bytes:
    """Modified EUI-64 interface identifier of a MAC (RFC 4291 Appendix A)."""
    return bytes([mac[0] ^ 2]) + mac[1:3] + b"\xff\xfe" + mac[3:6]


def parse_ip(text: str, what: str) -> IPv4Address | IPv6Address:
    """Parse an IPv4 or IPv6 address for option `what`, or raise ConfigError naming it."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(f"{what}: {text!r} is not an IPv4 or IPv6 address") from None


def parse_ipv6(text: str, what: str) -> IPv6Address:
    """Parse an IPv6 address for option `what`, or raise ConfigError naming it."""
    try:
        return IPv6Address(text)
    except ipaddress.AddressValueError as exc:
        raise ConfigError(f"{what}: {text!r} is not an IPv6 address ({exc})") from None


def parse_ipv4(text: str, what: str) -> IPv4Address:
    """Parse a dotted-quad for option `what`, or raise ConfigError naming it."""
    try:
        return IPv4Address(text)
    except ipaddress.AddressValueError as exc:
        raise ConfigError(f"{what}: {text!r} is not an IPv4 address ({exc})") from None
