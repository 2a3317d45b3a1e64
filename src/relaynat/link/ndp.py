"""Neighbour Discovery for the relay's side of the link: NS -> NA, RS -> RA.

This module owns the relay's answers to the guest's Neighbour Discovery (RFC 4861).
It is pure: no sockets, no clock. The relay hands `NdpResponder.handle` the ICMPv6
message of every guest IPv6 packet whose next header is 58 (the IPv6 payload, from
the ICMPv6 type byte on) together with the IPv6 source, destination and hop limit and
the frame's Ethernet source, and sends each returned `NdpReply` as one frame:

    Ethernet(dst=reply.dst_mac, src=config.gateway_mac, type=0x86DD)
    IPv6(src=reply.src, dst=reply.dst, next header 58, hop limit reply.hop_limit)
    reply.message            # checksum already filled in for (src, dst)

Non-NDP ICMPv6 types (echo, errors, MLD) are only counted, so the relay may route all
of ICMPv6 here or only types 133..137 (`NDP_TYPES`). The relay also calls
`note_guest_address(src)` for every guest packet's source address, and sends an
unsolicited `router_advertisement()` at start-up and then every few minutes (RFC 4861
§6.2.4 / §6.2.1: at most `MAX_RTR_ADV_INTERVAL_S` apart); the guest's kernel then does
SLAAC (RFC 4862) in the advertised prefix and uses DHCPv6 (flags M and O) as well.

What we answer, and why:
- RS (RFC 4861 §6.2.6) with one RA: cur hop limit 64, M and O set (link/dhcpv6.py serves an
  address and DNS), router lifetime, source link-layer address, MTU (§4.6.4), one prefix
  information option with L and A (§4.6.2) and RDNSS (RFC 8106 §5.1) so that SLAAC-only
  guests learn DNS too. The RA goes unicast to a specified RS source (§6.2.6 allows it;
  it spares other listeners) and to all-nodes ff02::1 when the RS came from ::.
- NS (§7.2.3/§7.2.4) with a NA carrying our MAC when the target is the gateway's
  link-local address or any address of `prefix_v6` that is not the guest's: proxy NDP,
  as proxy ARP, because every other address on the prefix is reached through the relay.
  R is set in every NA (§7.2.4: a router MUST set it; the relay routes for all it
  answers); O is set for the relay's own addresses (gateway, DNS, host-loopback map)
  and clear for proxied ones (§7.2.4 / §7.2.8 ask proxies to leave it clear, as Linux's
  proxy_ndp does), which changes nothing here since only one MAC ever answers.
- DAD probes (NS from ::, RFC 4862 §5.4.3) are never answered: the guest probes the
  addresses it is about to take, and an answer would make them duplicate. Their target
  is remembered as the guest's.

Validation follows §6.1.1 (RS) and §7.1.1 (NS): hop limit 255 (proves the sender is
on-link), code 0, checksum, minimum length, every option of non-zero length and inside
the message, no multicast NS target, and from :: only a solicited-node destination and
no source link-layer option. Input is untrusted: all accesses are bounds-checked, work
is linear in the message size, and the set of learned guest addresses is bounded.
"""

from __future__ import annotations

import struct
from collections import Counter
from ipaddress import IPv6Address
from typing import NamedTuple

from relaynat.checksum import partial_sum, pseudo_header_sum, verify
from relaynat.config import ConfigError, RelayConfig
from relaynat.wire import IPPROTO_ICMPV6, MalformedFrame

# RFC 4861 §4: message types.
RS, RA, NS, NA, REDIRECT = 133, 134, 135, 136, 137
NDP_TYPES = frozenset((RS, RA, NS, NA, REDIRECT))
# RFC 4861 §4.6 option types; RFC 8106 §5.1 RDNSS.
OPT_SLLA, OPT_TLLA, OPT_PREFIX, OPT_MTU, OPT_RDNSS = 1, 2, 3, 5, 25
#: RFC 4861 §6.1.1/§7.1.1: only a hop limit of 255 proves the sender is on our link.
NDP_HOP_LIMIT = 255
#: RFC 4861 §6.2.1: default MaxRtrAdvInterval, the relay's ceiling between unsolicited RAs.
MAX_RTR_ADV_INTERVAL_S = 600
#: RFC 4861 §4.2: a host's default hop limit advertised to the guest (Linux's default).
CUR_HOP_LIMIT = 64
#: Bound on remembered guest addresses (SLAAC, privacy addresses, DHCPv6, link-local);
#: a guest cycling through sources only evicts its own oldest entries.
MAX_GUEST_ADDRESSES = 64

ALL_NODES = IPv6Address("ff02::1").packed
ALL_ROUTERS = IPv6Address("ff02::2").packed
UNSPECIFIED = bytes(16)
_SOLICITED_NODE_PREFIX = IPv6Address("ff02::1:ff00:0").packed[:13]

# RA flags (RFC 4861 §4.2): M managed address config, O other config.
RA_FLAG_M, RA_FLAG_O = 0x80, 0x40
# NA flags (RFC 4861 §4.4), in the first byte of the 32-bit flags word.
NA_FLAG_R, NA_FLAG_S, NA_FLAG_O = 0x80, 0x40, 0x20
# Prefix information flags (RFC 4861 §4.6.2): on-link, autonomous (SLAAC).
PIO_FLAG_L, PIO_FLAG_A = 0x80, 0x40

_ICMP_HEADER = struct.Struct("!BBH")
_RA = struct.Struct("!BBHBBHII")  # type, code, checksum, hop limit, flags, lifetime, times
_NA = struct.Struct("!BBHB3x16s")  # type, code, checksum, flags, reserved, target
_PIO = struct.Struct("!BBBBII4x16s")
_MTU = struct.Struct("!BB2xI")
_RDNSS = struct.Struct("!BB2xI16s")


class NdpReply(NamedTuple):
    """One ICMPv6 message for the relay to send to the guest, from `config.gateway_mac`."""

    dst: bytes  #: IPv6 destination, 16 bytes packed
    dst_mac: bytes  #: Ethernet destination, 6 bytes
    src: bytes  #: IPv6 source, 16 bytes packed (one of the relay's addresses)
    message: bytes  #: the ICMPv6 message, checksum filled in for (src, dst)
    hop_limit: int = NDP_HOP_LIMIT  #: RFC 4861 §4: every NDP message is sent with 255


def icmpv6_checksum(src: bytes, dst: bytes, message: bytes | bytearray | memoryview) -> int:
    """The checksum field value for `message` sent from `src` to `dst` (RFC 4443 §2.3).

    The message's own checksum field (bytes 2..3) is treated as zero. The pseudo-header
    is never all zero (next header 58), so a sum congruent to 0 is the ones'-complement
    0xffff and the field is 0x0000, exactly what a 16-bit ones'-complement adder gives.
    """
    total = pseudo_header_sum(src, dst, IPPROTO_ICMPV6, len(message)) + partial_sum(message[:2])
    total = (total + partial_sum(message[4:])) % 0xFFFF
    return 0xFFFF - total if total else 0


def verify_icmpv6_checksum(src: bytes, dst: bytes, message: bytes | bytearray | memoryview) -> bool:
    """True if `message` (checksum field included) checks out for `src` -> `dst`."""
    return verify(message, pseudo_header_sum(src, dst, IPPROTO_ICMPV6, len(message)))


def with_checksum(src: bytes, dst: bytes, message: bytes | bytearray) -> bytes:
    """`message` with its checksum field filled in for `src` -> `dst`."""
    checksum = icmpv6_checksum(src, dst, message)
    return bytes(message[:2]) + checksum.to_bytes(2, "big") + bytes(message[4:])


def multicast_mac(addr: bytes) -> bytes:
    """RFC 2464 §7: 33:33 followed by the last four bytes of the IPv6 multicast address."""
    return b"\x33\x33" + addr[12:16]


def solicited_node(addr: bytes) -> bytes:
    """RFC 4291 §2.7.1: ff02::1:ff00:0/104 plus the low 24 bits of `addr`."""
    return _SOLICITED_NODE_PREFIX + addr[13:16]


def parse_options(message: bytes, start: int) -> dict[int, bytes]:
    """The options of `message` from `start`: first instance of each type -> whole option.

    Raises MalformedFrame if one has length 0 or runs past the end (RFC 4861 §4.6: the
    length is in units of 8 octets including type and length; §6.1.1/§7.1.1 make such a
    message invalid). Repeated types keep the first, which is all we read.
    """
    options: dict[int, bytes] = {}
    i, end = start, len(message)
    while i < end:
        if i + 2 > end:
            raise MalformedFrame("option_truncated")
        units = message[i + 1]
        if units == 0:
            raise MalformedFrame("option_zero_length")
        option_end = i + 8 * units
        if option_end > end:
            raise MalformedFrame("option_past_end")
        options.setdefault(message[i], message[i:option_end])
        i = option_end
    return options


def _link_layer_address(option: bytes | None) -> bytes | None:
    """The MAC in a source/target link-layer option, if it is Ethernet's 8-byte form
    (RFC 2464 §8) and unicast; anything else is not usable as a frame destination."""
    if option is None or len(option) != 8 or option[2] & 1:
        return None
    return option[2:8]


class NdpResponder:
    """Answers one guest's RS and NS messages for the relay's side of the link."""

    def __init__(self, config: RelayConfig) -> None:
        if len(config.gateway_mac) != 6:
            raise ConfigError("gateway MAC must be 6 bytes")
        if not 0 < config.prefix_preferred_lifetime_s <= config.prefix_valid_lifetime_s:
            raise ConfigError("prefix lifetimes must satisfy 0 < preferred <= valid")
        self._config = config
        self._mac = config.gateway_mac
        self._link_local = config.gateway_link_local.packed
        self._prefix = config.prefix_v6
        self._prefix_bytes = config.prefix_v6.network_address.packed[:8]
        # Addresses the relay itself uses: NAs for them set Override (RFC 4861 §7.2.4).
        own = [config.gateway_link_local, config.gateway_ipv6, config.dns_ipv6]
        if config.map_host_loopback_v6 is not None:
            own.append(config.map_host_loopback_v6)
        self._own = frozenset(a.packed for a in own)
        self._guest_config_address = config.guest_ipv6.packed
        # Insertion-ordered: the oldest learned address is evicted first.
        self._guest_addresses: dict[bytes, None] = {}
        self._ra_options = self._build_ra_options(config)
        self.counters: Counter[str] = Counter()

    @staticmethod
    def _build_ra_options(config: RelayConfig) -> bytes:
        prefix = config.prefix_v6
        # RFC 8106 §5.1: the RDNSS lifetime SHOULD be at least 3 x MaxRtrAdvInterval; it
        # must not be 0 (withdraw) when the router lifetime is 0, so take the larger.
        dns_lifetime = max(3 * MAX_RTR_ADV_INTERVAL_S, config.ra_router_lifetime_s)
        return b"".join((
            bytes((OPT_SLLA, 1)) + config.gateway_mac,
            _MTU.pack(OPT_MTU, 1, config.mtu),
            _PIO.pack(OPT_PREFIX, 4, prefix.prefixlen, PIO_FLAG_L | PIO_FLAG_A,
                      config.prefix_valid_lifetime_s, config.prefix_preferred_lifetime_s,
                      prefix.network_address.packed),
            _RDNSS.pack(OPT_RDNSS, 3, dns_lifetime, config.dns_ipv6.packed),
        ))

    # --- guest addresses ----------------------------------------------------------------

    def note_guest_address(self, addr: bytes | IPv6Address) -> None:
        """Remember `addr` as one of the guest's: NS for it are not proxied any more.

        Only addresses of the prefix matter (we never proxy other ones); ::, multicast
        and the relay's own addresses are ignored, so a guest spoofing the gateway's
        address cannot silence the relay's answers for it.
        """
        packed = addr.packed if isinstance(addr, IPv6Address) else bytes(addr)
        if len(packed) != 16 or packed[:8] != self._prefix_bytes or packed in self._own:
            return
        if packed in self._guest_addresses:
            return
        if len(self._guest_addresses) >= MAX_GUEST_ADDRESSES:
            del self._guest_addresses[next(iter(self._guest_addresses))]
        self._guest_addresses[packed] = None

    def is_guest_address(self, addr: bytes) -> bool:
        return addr == self._guest_config_address or addr in self._guest_addresses

    def _answers_for(self, target: bytes) -> bool:
        """RFC 4861 §7.2.3 plus proxying: the gateway's link-local, or the prefix minus
        the guest's addresses."""
        if target == self._link_local:
            return True
        return target[:8] == self._prefix_bytes and not self.is_guest_address(target)

    # --- messages -----------------------------------------------------------------------

    def router_advertisement(
        self, dst: bytes = ALL_NODES, dst_mac: bytes | None = None
    ) -> NdpReply:
        """An RA (RFC 4861 §4.2) from the gateway's link-local address to `dst`.

        `dst_mac` defaults to the multicast mapping of `dst` (RFC 2464 §7); pass it for
        a unicast `dst`. The relay calls this with no arguments for unsolicited RAs.
        """
        if dst_mac is None:
            dst_mac = multicast_mac(dst)
        header = _RA.pack(RA, 0, 0, CUR_HOP_LIMIT, RA_FLAG_M | RA_FLAG_O,
                          self._config.ra_router_lifetime_s, 0, 0)
        self.counters["ra_sent"] += 1
        message = with_checksum(self._link_local, dst, header + self._ra_options)
        return NdpReply(dst, dst_mac, self._link_local, message)

    def neighbour_solicitation(self, target: bytes) -> NdpReply:
        """Our NS for the guest's address `target` (RFC 4861 §7.2.2), multicast to its
        solicited-node group, from our link-local address with our link-layer address
        (§4.3): the guest's NA tells the relay its MAC. The NA layout serves: an NS is
        type, code, checksum, 4 reserved bytes, target."""
        dst = solicited_node(target)
        ns = _NA.pack(NS, 0, 0, 0, target) + bytes((OPT_SLLA, 1)) + self._mac
        self.counters["ns_sent"] += 1
        return NdpReply(dst, multicast_mac(dst), self._link_local,
                        with_checksum(self._link_local, dst, ns))

    def handle(
        self, src: bytes, dst: bytes, hop_limit: int, message: bytes | memoryview,
        src_mac: bytes,
    ) -> list[NdpReply]:
        """One ICMPv6 message from the guest -> replies to send (often none). Never raises.

        `src`, `dst`: the packet's IPv6 addresses (16 bytes); `hop_limit`: its hop limit;
        `message`: the IPv6 payload (ICMPv6 header onward); `src_mac`: the frame's
        Ethernet source, used when the message carries no source link-layer option.
        """
        try:
            return self._handle(bytes(src), bytes(dst), hop_limit, bytes(message),
                                bytes(src_mac))
        except MalformedFrame as exc:
            self.counters[exc.reason] += 1
        except Exception:
            # Defence in depth: _handle checks every bound itself and the tests assert
            # this stays 0; a bug must not take the relay down.
            self.counters["error"] += 1
        return []

    def _handle(
        self, src: bytes, dst: bytes, hop_limit: int, message: bytes, src_mac: bytes
    ) -> list[NdpReply]:
        if len(src) != 16 or len(dst) != 16 or len(src_mac) != 6:
            raise MalformedFrame("bad_arguments")
        if len(message) < 4:
            raise MalformedFrame("icmpv6_short")
        kind = message[0]
        if kind not in (RS, NS):
            names = {RA: "ra_ignored", NA: "na_ignored", REDIRECT: "redirect_ignored"}
            self.counters[names.get(kind, "not_ndp")] += 1
            return []
        # RFC 4861 §6.1.1 / §7.1.1, in the order of the RFC's lists.
        if hop_limit != NDP_HOP_LIMIT:
            raise MalformedFrame("bad_hop_limit")
        if not verify_icmpv6_checksum(src, dst, message):
            raise MalformedFrame("bad_checksum")
        if message[1] != 0:
            raise MalformedFrame("bad_code")
        if kind == RS:
            return self._router_solicitation(src, message, src_mac)
        return self._neighbour_solicitation(src, dst, message, src_mac)

    def _router_solicitation(self, src: bytes, message: bytes, src_mac: bytes) -> list[NdpReply]:
        if len(message) < 8:
            raise MalformedFrame("rs_short")
        options = parse_options(message, 8)
        unspecified = src == UNSPECIFIED
        if unspecified and OPT_SLLA in options:
            raise MalformedFrame("rs_unspecified_with_slla")  # §6.1.1
        self.counters["rs"] += 1
        if unspecified:
            return [self.router_advertisement()]
        self.note_guest_address(src)
        mac = _link_layer_address(options.get(OPT_SLLA)) or src_mac
        return [self.router_advertisement(src, mac)]

    def _neighbour_solicitation(
        self, src: bytes, dst: bytes, message: bytes, src_mac: bytes
    ) -> list[NdpReply]:
        if len(message) < 24:
            raise MalformedFrame("ns_short")
        target = message[8:24]
        if target[0] == 0xFF:
            raise MalformedFrame("ns_multicast_target")  # §7.1.1
        options = parse_options(message, 24)
        if src == UNSPECIFIED:
            # §7.1.1: a DAD probe goes to a solicited-node group and has no SLLA.
            if dst[:13] != _SOLICITED_NODE_PREFIX or OPT_SLLA in options:
                raise MalformedFrame("ns_bad_dad")
            # RFC 4862 §5.4.3: answering would mark the guest's tentative address
            # duplicate. The guest is about to own the target: remember it.
            self.note_guest_address(target)
            self.counters["ns_dad_ignored"] += 1
            return []
        self.note_guest_address(src)
        if not self._answers_for(target):
            reason = "ns_guest_target" if self.is_guest_address(target) else "ns_not_ours"
            self.counters[reason] += 1
            return []
        flags = NA_FLAG_R | NA_FLAG_S  # §7.2.4: solicited; we are a router
        if target in self._own:
            flags |= NA_FLAG_O  # proxied targets leave O clear (§7.2.4, §7.2.8)
        na = _NA.pack(NA, 0, 0, flags, target) + bytes((OPT_TLLA, 1)) + self._mac
        # §7.2.4: the NA goes to the soliciting node at the link-layer address of its
        # SLLA option or, for a unicast NS without one, that of the frame.
        mac = _link_layer_address(options.get(OPT_SLLA)) or src_mac
        self.counters["ns_answered"] += 1
        return [NdpReply(src, mac, target, with_checksum(target, src, na))]
