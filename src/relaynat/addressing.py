"""Where a guest's destination is on the host, and how a host client appears to the
guest: the address translation of the relay, with no I/O.

Outbound (slirp's and passt's mapping): the mapped address (the gateway by default)
stands for the host's loopback, the DNS address port 53 for the upstream resolver, and
every other address outside the guest's own network is itself. Inbound, the reverse:
a forwarded connection comes from the gateway (passt's default), or with
`inbound_source="client"` from the client's real address, unless that address could
not travel on the guest's link (loopback is a martian source to the guest's kernel,
RFC 1122 §3.2.1.3; an address of the guest's own network would be answered locally),
in which case the mapped address stands for it, as it stands for host loopback
outbound.

Host-local destinations are never relayed: those the host's kernel delivers to itself
without routing, whatever the guest wrote. A host socket connected to 0.0.0.0 or ::
reaches loopback (Linux: ip_route_output_key_hash_rcu turns a zero IPv4 destination
into 127.0.0.1, tcp_v6_connect and ip6_datagram_connect turn :: into ::1), 127.0.0.0/8
and ::1 are loopback itself (RFC 1122 §3.2.1.3, RFC 4291 §2.5.3), and an AF_INET6 socket
reaches the IPv4 address an IPv4-mapped destination embeds (RFC 4291 §2.5.5.2). So
0.0.0.0/8, 127.0.0.0/8, and in IPv6 the IPv4-mapped (::ffff:0:0/96), IPv4-compatible
(::/96, RFC 4291 §2.5.5.1, which also holds :: and ::1) and NAT64 (64:ff9b::/96, RFC
6052 §2.1) forms of those two blocks are refused like any destination with nothing
behind it: only the mapped address stands for host loopback, and with the mapping off
(`map_host_loopback_v4/_v6` None) nothing does. The host's other addresses (its LAN
address, say) are ordinary destinations, for the egress policy to judge.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Container
from ipaddress import IPv4Address, IPv6Address

from relaynat.config import RelayConfig

DNS_PORT = 53
LINK_LOCAL_PREFIX = b"\xfe\x80" + bytes(6)
_V4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"
#: The first 96 bits of the IPv6 forms that embed an IPv4 address in their last 32:
#: IPv4-compatible (RFC 4291 §2.5.5.1), IPv4-mapped (§2.5.5.2), NAT64's well-known prefix
#: (RFC 6052 §2.1).
_V4_EMBEDDING_PREFIXES = (bytes(12), _V4_MAPPED_PREFIX, b"\x00\x64\xff\x9b" + bytes(8))
#: First octets of the IPv4 blocks the host delivers to itself: "this network" (RFC 791,
#: 0.0.0.0 connects to loopback on Linux) and loopback (RFC 1122 §3.2.1.3).
_HOST_LOCAL_V4_FIRST = (0, 127)
#: The stats counter of guest packets refused for a host-local destination.
HOST_LOCAL_REFUSED = "dst_host_local_refused"
#: Linux's default ip_local_port_range: where a forwarded client's source port comes
#: from when its own port is already taken toward the guest.
EPHEMERAL_FIRST, EPHEMERAL_LAST = 32768, 60999


def is_host_local(addr: bytes) -> bool:
    """Whether the host's kernel delivers packed `addr` (4 or 16 bytes) to itself without
    routing: 0.0.0.0/8 or 127.0.0.0/8, or an IPv6 form embedding one of them (:: and ::1
    among them, see the module docstring)."""
    if len(addr) == 4:
        return addr[0] in _HOST_LOCAL_V4_FIRST
    return addr[12] in _HOST_LOCAL_V4_FIRST and addr[:12] in _V4_EMBEDDING_PREFIXES


def inbound_flow_key(guest_ip: bytes, guest_port: int, src_ip: bytes, src_port: int,
                     taken: Container[tuple[int, bytes, int, bytes]]
                     ) -> tuple[int, bytes, int, bytes]:
    """The flow key (guest port, source as the guest sees it, source port, guest
    address) of a new forwarded flow. `src_port` (the client's own) is a wish: two
    clients on different hosts may share a port but both appear from the same source
    address, so a key already in `taken` gets another port."""
    key = (guest_port, src_ip, src_port, guest_ip)
    while key in taken:
        key = (guest_port, src_ip, random.randint(EPHEMERAL_FIRST, EPHEMERAL_LAST), guest_ip)
    return key


class AddressMap:
    """The relay's address translation for one guest (a frozen RelayConfig's view).

    `dns_upstream` (where the DNS address port 53 goes; None: nowhere) is the one part
    that changes: the relay sets it when the host's resolv.conf names another resolver,
    and only flows opened afterwards ask for it (link/dns.py)."""

    def __init__(self, config: RelayConfig, dns_upstream: str | None) -> None:
        c = config
        self.guest_ip = c.guest_ipv4.packed
        self.gateway_ip = c.gateway_ipv4.packed
        self.dns_ip = c.dns_ipv4.packed
        self._net = int(c.network_v4.network_address)
        self._mask = int(c.network_v4.netmask)
        self._map_from = c.map_host_loopback_v4.packed if c.map_host_loopback_v4 else None
        self._host_loopback = str(c.host_loopback_v4)
        self.prefix6 = c.prefix_v6.network_address.packed[:8]
        self.gateway_ip6 = c.gateway_ipv6.packed
        self.dns_ip6 = c.dns_ipv6.packed
        self._map_from6 = c.map_host_loopback_v6.packed if c.map_host_loopback_v6 else None
        self._host_loopback6 = str(c.host_loopback_v6)
        self.dns_upstream = dns_upstream
        self._client_source = c.inbound_source == "client"

    def is_guest(self, addr: bytes) -> bool:
        """`addr` may be the guest's: its IPv4 address, or IPv6 in the prefix (SLAAC
        chooses) or link-local."""
        return addr == self.guest_ip or addr[:8] in (self.prefix6, LINK_LOCAL_PREFIX)

    def in_subnet_v4(self, addr: bytes) -> bool:
        return int.from_bytes(addr, "big") & self._mask == self._net

    def host_ip_for(self, dst: bytes, dport: int,
                    stats: Counter[str] | None = None) -> str | None:
        """Where a guest destination is on the host: the mapped address goes to host
        loopback, the DNS address port 53 to the upstream resolver, everything else
        stays itself. None: nothing there (the gateway when the mapping is off, the
        guest's own address, the DNS address on another port or without upstream, a
        host-local destination: see the module docstring). A host-local refusal is
        counted in `stats` under HOST_LOCAL_REFUSED."""
        if len(dst) == 16:
            return self._host_ip6_for(dst, dport, stats)
        if dst == self._map_from:
            return self._host_loopback
        if dst == self.dns_ip:
            return self.dns_upstream if dport == DNS_PORT else None
        if dst == self.gateway_ip or dst == self.guest_ip:
            return None
        if dst[0] in _HOST_LOCAL_V4_FIRST:
            if stats is not None:
                stats[HOST_LOCAL_REFUSED] += 1
            return None
        return str(IPv4Address(dst))

    def _host_ip6_for(self, dst: bytes, dport: int, stats: Counter[str] | None) -> str | None:
        """As `host_ip_for`, for IPv6. Nothing on the guest's own /64 but the mapped
        and DNS addresses is on the host (the rest is the guest itself), and link-local
        or multicast destinations have no meaning beyond the link."""
        if dst == self._map_from6:
            return self._host_loopback6
        if dst == self.dns_ip6:
            return self.dns_upstream if dport == DNS_PORT else None
        if dst[:8] == self.prefix6 or dst[:8] == LINK_LOCAL_PREFIX or dst[0] == 0xFF:
            return None
        if is_host_local(dst):
            if stats is not None:
                stats[HOST_LOCAL_REFUSED] += 1
            return None
        return str(IPv6Address(dst))

    def inbound_source(self, client: bytes, v6: bool) -> bytes:
        """The source address the guest sees on a forwarded flow from host `client`
        (packed; an IPv4-mapped IPv6 client already unwrapped), reaching the guest over
        IPv6 when `v6`."""
        gateway = self.gateway_ip6 if v6 else self.gateway_ip
        if not self._client_source or (len(client) == 16) != v6:
            return gateway
        if v6:
            if (is_host_local(client) or client[:8] in (self.prefix6, LINK_LOCAL_PREFIX)
                    or client[0] == 0xFF or client[:12] == _V4_MAPPED_PREFIX):
                return self._map_from6 or gateway
            return client
        if is_host_local(client) or self.in_subnet_v4(client) or client[0] >= 224:
            return self._map_from or gateway
        return client
