"""Egress policy for guest-initiated flows: an ordered, first-match list of allow/deny rules.

passt, slirp4netns and gvproxy relay whatever the guest asks for; a sandbox runtime needs to
say "not the cloud metadata service, not the host's loopback, not the LAN". This module owns
that decision and nothing else. It is pure: no sockets, no clock, no file I/O except the
`load` convenience, which only reads the file it is given.

How the relay uses it (the relay engineer wires this in):

- Call `Policy.decide(proto, dst, dport)` once per NEW flow, before any host socket exists:
  on a guest SYN for an unknown TCP flow, on the first datagram of a UDP flow (before
  `UdpFlowTable.open`), on the first echo request of an ICMP/ICMPv6 echo flow. `dst` is the
  packed destination as the guest sent it (before the mapped gateway is turned into host
  loopback), so the `host` and `loopback` groups can refuse the mapping. Established flows
  are never re-checked, so the cost is paid once per flow (a handful of int compares per rule).
- On deny: TCP gets a RST (as for a refused connect), UDP and ICMP get an ICMP destination
  unreachable with code `ICMP_ADMIN_PROHIBITED` (RFC 1812 §5.2.7.1; ICMPv6 code 1, RFC 4443
  §3.1), rate-limited like the relay's other ICMP errors. Count by `Decision.rule` (-1 is the
  default action) for stats.
- Traffic the relay answers itself is NOT subject to the policy: ARP, NDP, DHCP, DHCPv6, and
  the DNS address (`dns_ipv4`/`dns_ipv6`) port 53, which the relay serves or forwards to the
  host's resolver on its own behalf. The policy governs only flows relayed to host sockets at
  the guest's chosen destination. So `--sandbox`, which denies the private ranges containing
  10.0.2.3 and fd00::3, never breaks name resolution. As belt and braces (and so that a
  listing of the profile is self-explanatory), the sandbox profile also begins with an
  explicit allow for the `dns` group, port 53, should a relay ever consult it there.

A Policy names addresses that depend on the relay's addressing: the `host` and `loopback`
groups hold the mapped host-loopback addresses (`map_host_loopback_v4/_v6`) and the `dns`
group the relay's DNS addresses. The relay that enforces a policy binds it to its own
configuration (`bound_to`) whenever it puts one in force, whatever configuration the policy
was built with: a policy built for 10.0.2.2 given to a relay whose gateway 198.18.0.2
stands for host loopback must refuse 198.18.0.2, not 10.0.2.2.

Destinations and rules are normalised alike, so that no spelling of an address slips past
a rule written in another:

- IPv4-mapped IPv6 destinations (::ffff:a.b.c.d, RFC 4291 §2.5.5.2) are judged as the IPv4
  address they stand for: a host AF_INET6 socket connecting there reaches the IPv4 host,
  so "::ffff:169.254.169.254" must not slip past a rule for 169.254.169.254. A rule
  inside ::ffff:0:0/96 is the IPv4 range it embeds (`::ffff:0:0/96` itself is all of
  IPv4). A wider IPv6 rule (`::/0`) covers IPv6 destinations only: it does not turn
  into an IPv4 rule, and the mapped destinations are IPv4 ones.
- NAT64 destinations (64:ff9b::/96, RFC 6052 §2.1) and IPv4-compatible ones (::a.b.c.d,
  RFC 4291 §2.5.5.1; not ::, ::1 or ::0.x.y.z, which embed nothing a host can route to)
  reach the IPv4 address they embed where the host routes them (a NAT64 gateway, a sit
  tunnel), so a rule matches them if it covers either the IPv6 address or the embedded
  IPv4 one: a deny of 169.254.169.254 catches 64:ff9b::a9fe:a9fe, and a deny of
  64:ff9b::/96 still matches it.
- Rule CIDRs with an IPv6 zone ("fe80::1%eth0") are refused: a zone names one of the
  host's links, which a rule about where the guest's packets go cannot mean.

Host-local destinations (0.0.0.0/8, 127.0.0.0/8 and their IPv6 forms) never reach the
policy: the relay refuses them before it asks (addressing.py). The `loopback` group holds
them anyway (0.0.0.0/8 and :: beside 127.0.0.0/8 and ::1), so a policy says what it means
should it ever be asked.

File format (TOML; JSON has the same shape, with "rule" a list of objects)::

    default = "allow"            # or "deny"; the action when no rule matches
    [[rule]]
    action = "deny"              # required: allow | deny
    proto = "tcp"                # tcp | udp | icmp | any (default any); icmp covers ICMPv6
    to = "metadata"              # CIDR, address, group name, or a list of them (default: any)
    ports = "22,80-90"           # TCP/UDP destination ports: "N", "N-M", lists, or ints
    comment = "free text"        # optional, kept for listings
    domains = ["pypi.org", "*.pythonhosted.org"]   # optional, see "Domain rules"
    inspect_ports = "80,443"     # optional, with domains: TCP ports whose first flight
                                 # must name a covered name (default 80 and 443)

Groups: loopback, host, dns, private, link-local, metadata, multicast, public (see GROUPS).
Refused as input, rather than read as "any": an empty `to` or `ports`, and duplicate keys
in JSON (which keeps the last silently; TOML refuses them itself).

Domain rules. A rule with `domains` (exact names and `*.` wildcards, domains.py says how
they compare) matches a flow only when, besides its `proto`, `to` and `ports`, the flow's
destination address was answered through the relay's DNS forwarder, to this guest, for a
name the rule covers, and that answer is still valid (`domains.NameTable`). The relay
looks the names up and passes them to `decide(..., names)`; an address never resolved
through the relay has no names and matches no domain rule. Rules still apply in order,
so a `deny metadata` rule placed first refuses a covered name that resolves to
169.254.169.254 (DNS rebinding). `covers(rule, name)` and `allows_name(name)` answer
for names alone: the latter is what the DNS forwarder asks before forwarding a query
when `filters_dns` (domain rules and default "deny"): a name that no allow rule covers
is answered REFUSED and never leaves the relay.
"""

from __future__ import annotations

import ipaddress
import json
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_network
from pathlib import Path
from typing import Any, NamedTuple

from relaynat.config import ConfigError, RelayConfig, unique_keys
from relaynat.domains import domain_matches, normalize_pattern
from relaynat.wire import IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP

#: Rule protocol names and the IP protocol numbers each one matches.
PROTOS: dict[str, frozenset[int]] = {
    "tcp": frozenset({IPPROTO_TCP}),
    "udp": frozenset({IPPROTO_UDP}),
    "icmp": frozenset({IPPROTO_ICMP, IPPROTO_ICMPV6}),
    "any": frozenset({IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, IPPROTO_ICMPV6}),
}
ACTIONS = ("allow", "deny")
RULE_KEYS = frozenset({"action", "proto", "to", "ports", "comment", "domains",
                       "inspect_ports"})
#: TCP ports whose first flight must name a covered name, for a domain rule that does
#: not say (HTTP and HTTPS).
INSPECT_PORTS: tuple[tuple[int, int], ...] = ((80, 80), (443, 443))
TOP_KEYS = frozenset({"default", "rule"})

#: Static members of the named groups. `loopback` and `host` also get the config's mapped
#: host-loopback addresses (the guest-visible gateway) and `dns` the config's DNS
#: addresses, added per Policy for the configuration it is bound to.
_STATIC_GROUPS: dict[str, tuple[str, ...]] = {
    # RFC 1122 §3.2.1.3 (127/8) and RFC 4291 §2.5.3 (::1); 0.0.0.0/8 and :: because a
    # host socket connected there reaches loopback (addressing.py).
    "loopback": ("127.0.0.0/8", "0.0.0.0/8", "::1/128", "::/128"),
    "host": (),
    "dns": (),
    # RFC 1918 private IPv4; RFC 6598 shared address space 100.64/10, because carrier-grade
    # NAT and many cloud VPCs put internal, non-Internet hosts there that a sandbox must not
    # reach either; RFC 4193 unique local IPv6 fc00::/7. Not included: the RFC 6890
    # documentation and benchmarking ranges, which are nobody's network (see _SPECIAL).
    "private": ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7"),
    # RFC 3927 IPv4 link-local, RFC 4291 §2.5.6 IPv6 link-local.
    "link-local": ("169.254.0.0/16", "fe80::/10"),
    # The cloud instance metadata service (AWS, GCP, Azure, OpenStack on IPv4; AWS IMDS on
    # IPv6). Both also lie in link-local / private: a rule on `metadata` is the narrow one.
    "metadata": ("169.254.169.254/32", "fd00:ec2::254/128"),
    # RFC 5771 IPv4 multicast, RFC 4291 §2.7 IPv6 multicast.
    "multicast": ("224.0.0.0/4", "ff00::/8"),
}
GROUPS = (*_STATIC_GROUPS, "public")

#: RFC 6890 special-purpose blocks that are neither in a group above nor globally
#: reachable, so they are not `public` either: IETF protocol assignments (RFC 6890
#: §2.2.2), documentation (RFC 5737), benchmarking (RFC 2544), reserved 240/4 incl.
#: limited broadcast (RFC 1112 §4); "this network" (RFC 791) is in `loopback`. IPv6
#: `public` is only global unicast 2000::/3 (RFC 4291 §2.4) minus documentation (RFC
#: 3849, RFC 9637) and benchmarking (RFC 5180).
_SPECIAL = ("192.0.0.0/24", "192.0.2.0/24", "198.18.0.0/15", "198.51.100.0/24",
            "203.0.113.0/24", "240.0.0.0/4",
            "2001:db8::/32", "3fff::/20", "2001:2::/48")
_GLOBAL_UNICAST_V6 = (int(IPv6Address("2000::")), int(IPv6Address("3fff:" + "ffff:" * 6 + "ffff")))
# The top 96 bits of the IPv6 forms embedding an IPv4 address (see the module docstring):
_V4_MAPPED_PREFIX = 0xFFFF  # ::ffff:0:0/96, RFC 4291 §2.5.5.2
_NAT64_PREFIX = int(IPv6Address("64:ff9b::")) >> 32  # RFC 6052 §2.1
_V4_MASK = 0xFFFFFFFF
#: The lowest IPv4-compatible address judged as IPv4 (::1.0.0.0): below it are ::, ::1
#: and ::0.x.y.z, which embed no address a host could route to.
_V4_COMPATIBLE_FIRST = 1 << 24

_Range = tuple[int, int]  # inclusive (first, last) address or port as ints


class Decision(NamedTuple):
    """What `Policy.decide` returns: the verdict and which rule gave it (-1: the default).
    `inspect`: an allow by a domain rule of a TCP flow to one of its `inspect_ports`,
    whose first flight must name a name the rule covers."""

    allow: bool
    rule: int
    inspect: bool = False


@dataclass(slots=True, frozen=True)
class Rule:
    """One validated rule, in the canonical form `to_dict` writes.

    `to` is empty for "any destination"; `ports` is empty for "any port" and, when not
    empty, restricts the rule to TCP and UDP flows.
    """

    action: str
    """"allow" or "deny"."""
    proto: str = "any"
    """"tcp", "udp", "icmp" (ICMP and ICMPv6 echo) or "any"."""
    to: tuple[str, ...] = ()
    """CIDRs and group names (canonical: an address is its /32 or /128)."""
    ports: tuple[_Range, ...] = ()
    """Inclusive (first, last) destination port ranges."""
    comment: str = ""
    """Free text, kept for listings."""
    domains: tuple[str, ...] = ()
    """Normalised names and `*.` patterns (domains.py); empty: no domain condition."""
    inspect_ports: tuple[_Range, ...] = INSPECT_PORTS
    """With `domains`: the TCP destination port ranges whose first flight (TLS SNI,
    HTTP Host) must name a covered name learned for the destination."""

    def __post_init__(self) -> None:
        # Rules built in Python get the same canonical names as rules read from a file.
        object.__setattr__(self, "domains", tuple(normalize_pattern(d) for d in self.domains))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], index: int = 0) -> Rule:
        """Validate one rule mapping; ConfigError names the rule `index` and the problem."""
        where = f"policy rule {index}"
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a table of keys, not {type(data).__name__}")
        unknown = sorted(set(map(str, data)) - RULE_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r} "
                              f"(known: {', '.join(sorted(RULE_KEYS))})")
        action = data.get("action")
        if action not in ACTIONS:
            raise ConfigError(f"{where}: action must be 'allow' or 'deny', not {action!r}")
        proto = data.get("proto", "any")
        if not isinstance(proto, str) or proto not in PROTOS:
            raise ConfigError(f"{where}: unknown proto {proto!r} (known: tcp, udp, icmp, any)")
        to = _parse_to(data.get("to", ()), where)
        ports = parse_ports(data.get("ports", ()), where)
        if ports and proto == "icmp":
            raise ConfigError(f"{where}: ports apply to tcp and udp only, not to icmp")
        comment = data.get("comment", "")
        if not isinstance(comment, str):
            raise ConfigError(f"{where}: comment must be a string")
        domains = _parse_domains(data.get("domains", ()), where)
        inspect = INSPECT_PORTS
        if "inspect_ports" in data:
            if not domains:
                raise ConfigError(f"{where}: inspect_ports applies to rules with domains")
            raw = data["inspect_ports"]
            # An empty list says "inspect nothing", which is meaningful here.
            inspect = () if raw in ([], ()) else parse_ports(raw, f"{where} inspect_ports")
        return cls(action, proto, to, ports, comment, domains, inspect)

    def to_dict(self) -> dict[str, Any]:
        """The rule as a policy file writes it (`from_dict` reads it back)."""
        out: dict[str, Any] = {"action": self.action, "proto": self.proto}
        if self.to:
            out["to"] = self.to[0] if len(self.to) == 1 else list(self.to)
        if self.ports:
            out["ports"] = format_ports(self.ports)
        if self.comment:
            out["comment"] = self.comment
        if self.domains:
            out["domains"] = list(self.domains)
            if self.inspect_ports != INSPECT_PORTS:
                out["inspect_ports"] = (format_ports(self.inspect_ports)
                                        if self.inspect_ports else [])
        return out


def _parse_domains(value: object, where: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ConfigError(f"{where}: 'domains' must be a name or a list of names")
    if not items and value != ():
        raise ConfigError(f"{where}: 'domains' is empty (leave it out for no domain "
                          "condition)")
    try:
        return tuple(dict.fromkeys(normalize_pattern(d) for d in items))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _parse_to(value: object, where: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ConfigError(f"{where}: 'to' must be a CIDR, a group or a list of them")
    if not items and value != ():
        # An empty list would silently mean "any destination": make the user say so.
        raise ConfigError(f"{where}: 'to' is empty (leave it out for any destination)")
    out = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"{where}: destination {item!r} is not a string")
        if item in GROUPS:
            out.append(item)
            continue
        if "%" in item:
            # ipaddress takes "fe80::1%eth0" (Python 3.9+) and then ignores the zone.
            raise ConfigError(f"{where}: {item!r} has a zone (%...): a rule matches the "
                              "guest's destination address only; leave the zone out")
        try:
            out.append(str(ip_network(item, strict=True)))
        except ValueError as exc:
            kind = "bad CIDR" if any(c in item for c in "./:") else "unknown group"
            raise ConfigError(f"{where}: {kind} {item!r} ({exc}; groups: "
                              f"{', '.join(GROUPS)})") from None
    return tuple(out)


def parse_ports(value: object, where: str = "ports") -> tuple[_Range, ...]:
    """"22,80-90", 22, or a list of ints and such strings -> sorted inclusive ranges."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: ports must be numbers or ranges, not {value!r}")
    if isinstance(value, int):
        value = [value]
    elif isinstance(value, str):
        value = value.split(",") if value.strip() else []
    if not isinstance(value, list | tuple):
        raise ConfigError(f"{where}: ports must be a string like '22,80-90' or a list")
    if not value and value != ():
        # "" or [] would silently mean any port: make the user say so by leaving it out.
        raise ConfigError(f"{where}: ports is empty (leave it out for any port)")
    ranges = []
    for item in value:
        if isinstance(item, int) and not isinstance(item, bool):
            first = last = item
        elif isinstance(item, str):
            lo, sep, hi = item.strip().partition("-")
            first = _port_number(lo, item, where)
            last = _port_number(hi, item, where) if sep else first
        else:
            raise ConfigError(f"{where}: port {item!r} is not a number or a range")
        for port in (first, last):
            if not 0 <= port <= 65535:
                raise ConfigError(f"{where}: port {port} is out of range 0..65535")
        if first > last:
            raise ConfigError(f"{where}: port range {item!r} is reversed ({first} > {last})")
        ranges.append((first, last))
    return tuple(sorted(ranges))


def _port_number(text: str, item: str, where: str) -> int:
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 6:
        raise ConfigError(f"{where}: port {item!r} is not a number or a range N-M")
    return int(text)


def format_ports(ranges: Iterable[_Range]) -> str:
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def _to_ranges(cidrs: Iterable[str]) -> tuple[list[_Range], list[_Range]]:
    """Split CIDRs into inclusive integer ranges per family (v4, v6); a range inside
    ::ffff:0:0/96 is the IPv4 range it embeds, as mapped destinations are judged."""
    v4: list[_Range] = []
    v6: list[_Range] = []
    for cidr in cidrs:
        net = ip_network(cidr)
        first, last = int(net.network_address), int(net.broadcast_address)
        if net.version == 4:
            v4.append((first, last))
        elif net.prefixlen >= 96 and first >> 32 == _V4_MAPPED_PREFIX:
            v4.append((first & _V4_MASK, last & _V4_MASK))
        else:
            v6.append((first, last))
    return v4, v6


def _within(ranges: Iterable[_Range], addr: int) -> bool:
    return any(lo <= addr <= hi for lo, hi in ranges)


@dataclass(slots=True, frozen=True)
class _Compiled:
    protos: frozenset[int]
    any_dst: bool
    public: bool
    v4: tuple[_Range, ...]
    v6: tuple[_Range, ...]
    ports: tuple[_Range, ...]
    domains: tuple[str, ...]


class Policy:
    """An ordered rule list plus a default action, compiled for `decide`.

    Build one from `Rule`s or rule mappings, or load the file format (`load`,
    `from_toml`, `from_json`, `from_dict`): a `default` ("allow" or "deny") and
    `[[rule]]` tables with `action`, optional `proto` (tcp, udp, icmp, any), `to`
    (CIDR, address or group, or a list: loopback, host, dns, private, link-local, metadata,
    multicast, public) and `ports` ("22,80-90"). Malformed input raises ConfigError
    naming the rule and what is wrong. `sandbox` is the `--sandbox` profile.

    `config` supplies the addresses of the `host` and `loopback` groups (the mapped
    host-loopback addresses, `map_host_loopback_v4/_v6`; None there leaves `host` empty)
    and of the `dns` group; it is a default only: a `Relay` enforces the policy bound to its
    own configuration (`bound_to`). Immutable: the control socket replaces the whole
    Policy, which keeps decide() lock-free and atomic.
    """

    __slots__ = ("_compiled", "_decisions", "_default", "_dns", "_inspected", "_mapped",
                 "_nonpublic_v4", "_nonpublic_v6", "default", "has_domains", "rules")

    def __init__(self, rules: Sequence[Rule | Mapping[str, Any]] = (), default: str = "allow",
                 config: RelayConfig | None = None) -> None:
        if default not in ACTIONS:
            raise ConfigError(f"policy: default must be 'allow' or 'deny', not {default!r}")
        cfg = config if config is not None else RelayConfig()
        self.rules: tuple[Rule, ...] = tuple(
            r if isinstance(r, Rule) else Rule.from_dict(r, i) for i, r in enumerate(rules))
        """The rules, validated, in the order they are tried (the first match decides)."""
        self.default = default
        """The action when no rule matches: "allow" or "deny"."""
        self._mapped = _mapped_of(cfg)
        self._dns = _dns_of(cfg)
        groups = self._groups()
        nonpublic = [c for cidrs in groups.values() for c in cidrs] + list(_SPECIAL)
        v4, v6 = _to_ranges(nonpublic)
        self._nonpublic_v4 = tuple(v4)
        self._nonpublic_v6 = tuple(v6)
        self._compiled = tuple(self._compile(r, groups) for r in self.rules)
        self._decisions = tuple(Decision(r.action == "allow", i) for i, r in enumerate(self.rules))
        self._inspected = tuple(Decision(True, i, True) for i in range(len(self.rules)))
        self._default = Decision(default == "allow", -1)
        self.has_domains = any(r.domains for r in self.rules)
        """Whether a rule names domains (the relay then looks up a destination's names)."""

    @staticmethod
    def _compile(rule: Rule, groups: dict[str, list[str]]) -> _Compiled:
        cidrs = [c for t in rule.to for c in (groups.get(t, ()) if t in GROUPS else (t,))]
        v4, v6 = _to_ranges(cidrs)
        protos = PROTOS[rule.proto]
        if rule.ports:  # ports only make sense for TCP and UDP
            protos = protos & PROTOS["tcp"] | protos & PROTOS["udp"]
        return _Compiled(protos, not rule.to, "public" in rule.to, tuple(v4), tuple(v6),
                         rule.ports, rule.domains)

    def decide(self, proto: int, dst: bytes, dport: int = 0,
               names: Sequence[str] = ()) -> Decision:
        """Verdict for a new flow: IP protocol number (6, 17, 1, 58), packed destination as
        the guest addressed it (4 or 16 bytes), destination port (ignored for ICMP), and
        the names valid DNS answers held the destination for (normalised; a rule with
        domains matches only if it covers one of them)."""
        i = self._first_match(self._compiled, proto, dst, dport, names)
        if i < 0:
            return self._default
        if (proto == IPPROTO_TCP and self._compiled[i].domains
                and self._decisions[i].allow
                and any(lo <= dport <= hi for lo, hi in self.rules[i].inspect_ports)):
            return self._inspected[i]
        return self._decisions[i]

    def covers(self, rule: int, name: str) -> bool:
        """Whether rule `rule` names normalised `name` (exactly or under a `*.`)."""
        return any(domain_matches(p, name) for p in self.rules[rule].domains)

    @property
    def filters_dns(self) -> bool:
        """Whether the DNS forwarder refuses names no allow rule covers: the policy has
        domain rules and denies by default (an allowlist by name)."""
        return self.has_domains and self.default == "deny"

    def allows_name(self, name: str) -> bool:
        """Whether an allow rule with domains covers normalised `name`: a query for it
        may leave the relay under `filters_dns`."""
        return any(rule.action == "allow" and any(domain_matches(p, name) for p in rule.domains)
                   for rule in self.rules)

    def _first_match(self, compiled: Sequence[_Compiled], proto: int, dst: bytes,
                     dport: int, names: Sequence[str] = ()) -> int:
        """Index of the first rule of `compiled` matching the flow, or -1."""
        addr = int.from_bytes(dst, "big")
        v6 = len(dst) == 16
        embedded = -1  # the IPv4 address a NAT64 or IPv4-compatible destination embeds
        if v6:
            top = addr >> 32
            if top == _V4_MAPPED_PREFIX:
                addr &= _V4_MASK
                v6 = False
            elif top == _NAT64_PREFIX or (top == 0 and addr >= _V4_COMPATIBLE_FIRST):
                embedded = addr & _V4_MASK
        public: bool | None = None
        for i, rule in enumerate(compiled):
            if proto not in rule.protos:
                continue
            if rule.ports:
                for lo, hi in rule.ports:
                    if lo <= dport <= hi:
                        break
                else:
                    continue
            if rule.domains and not any(domain_matches(p, n)
                                        for p in rule.domains for n in names):
                continue
            if not rule.any_dst:
                for lo, hi in rule.v6 if v6 else rule.v4:
                    if lo <= addr <= hi:
                        break
                else:
                    if embedded >= 0 and _within(rule.v4, embedded):
                        return i
                    if not rule.public:
                        continue
                    if public is None:
                        public = self._is_public(addr, v6) or (
                            embedded >= 0 and self._is_public(embedded, False))
                    if not public:
                        continue
            return i
        return -1

    def _is_public(self, addr: int, v6: bool) -> bool:
        if v6 and not _GLOBAL_UNICAST_V6[0] <= addr <= _GLOBAL_UNICAST_V6[1]:
            return False
        return all(not lo <= addr <= hi
                   for lo, hi in (self._nonpublic_v6 if v6 else self._nonpublic_v4))

    def in_group(self, group: str, addr: IPv4Address | IPv6Address) -> bool:
        """Whether `addr` is in a named group under this policy's config (for tests and for
        explaining a decision)."""
        if group not in GROUPS:
            raise ConfigError(f"policy: unknown group {group!r}")
        rule = self._compile(Rule("deny", "any", (group,)), self._groups())
        return self._first_match((rule,), IPPROTO_TCP, addr.packed, 1) == 0

    def _groups(self) -> dict[str, list[str]]:
        groups = {name: list(cidrs) for name, cidrs in _STATIC_GROUPS.items()}
        groups["loopback"] += self._mapped
        groups["host"] += self._mapped
        groups["dns"] += self._dns
        return groups

    def bound_to(self, config: RelayConfig) -> Policy:
        """This policy with the `host`, `loopback` and `dns` groups of `config`, the
        configuration of the relay that enforces it (itself if they are already those).
        `Relay` calls this whenever it puts a policy in force."""
        if (_mapped_of(config), _dns_of(config)) == (self._mapped, self._dns):
            return self
        return Policy(self.rules, self.default, config)

    # --- construction and serialisation ---------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], config: RelayConfig | None = None) -> Policy:
        """From the file/JSON shape: {"default": "allow", "rule": [{...}, ...]}."""
        if not isinstance(data, Mapping):
            raise ConfigError("policy: expected a table with 'default' and 'rule'")
        unknown = sorted(set(map(str, data)) - TOP_KEYS)
        if unknown:
            raise ConfigError(f"policy: unknown key {unknown[0]!r} (known: default, rule)")
        rules = data.get("rule", [])
        if not isinstance(rules, list):
            raise ConfigError("policy: 'rule' must be a list of rules ([[rule]] in TOML)")
        return cls(rules, data.get("default", "allow"), config)

    def to_dict(self) -> dict[str, Any]:
        """The file/JSON shape, which `from_dict` (with the same config) reads back into an
        equal Policy."""
        return {"default": self.default, "rule": [r.to_dict() for r in self.rules]}

    @classmethod
    def from_toml(cls, text: str, config: RelayConfig | None = None) -> Policy:
        """From a policy file's text (TOML); ConfigError says what is wrong."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"policy: not valid TOML: {exc}") from None
        return cls.from_dict(data, config)

    @classmethod
    def from_json(cls, text: str, config: RelayConfig | None = None) -> Policy:
        """From the JSON form of the file's shape; ConfigError says what is wrong."""
        return cls.from_dict(loads_json(text), config)

    @classmethod
    def load(cls, path: str | Path, config: RelayConfig | None = None) -> Policy:
        """Read a policy file: JSON if it ends in .json, TOML otherwise."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"policy file {path}: {exc}") from None
        if str(path).endswith(".json"):
            return cls.from_json(text, config)
        return cls.from_toml(text, config)

    @classmethod
    def sandbox(cls, config: RelayConfig | None = None) -> Policy:
        """The `--sandbox` profile: no metadata service, no link-local, no private ranges,
        no host loopback (direct or through the mapped gateway); everything else allowed.
        The DNS addresses' port 53 stays reachable (see the module docstring)."""
        cfg = config if config is not None else RelayConfig()
        return cls([
            Rule("allow", "any", ("dns",), ((53, 53),), "the relay's own DNS forwarder"),
            Rule("deny", "any", ("metadata",), comment="cloud instance metadata"),
            Rule("deny", "any", ("link-local",)),
            Rule("deny", "any", ("host", "loopback"), comment="host loopback"),
            Rule("deny", "any", ("private",), comment="RFC 1918, RFC 6598, RFC 4193"),
        ], "allow", cfg)

    @classmethod
    def allow_domains(cls, names: Iterable[str], config: RelayConfig | None = None) -> Policy:
        """The `--allow-domain` policy: the relay's DNS; no metadata service,
        link-local, private ranges or host loopback (before the names, so that a name
        resolving there is refused); TCP 80 and 443 to `names` (names and `*.`
        patterns), the name on the wire checked; everything else denied (UDP 443, DNS
        over TLS on 853, other resolvers). ConfigError for a bad name or none at all."""
        domains = tuple(names)
        if not domains:
            raise ConfigError("policy: allow_domains needs at least one domain")
        cfg = config if config is not None else RelayConfig()
        return cls([
            Rule("allow", "any", ("dns",), ((53, 53),), "the relay's own DNS forwarder"),
            Rule("deny", "any", ("metadata",), comment="cloud instance metadata"),
            Rule("deny", "any", ("link-local",)),
            Rule("deny", "any", ("host", "loopback"), comment="host loopback"),
            Rule("deny", "any", ("private",), comment="RFC 1918, RFC 6598, RFC 4193"),
            Rule("allow", "tcp", (), ((80, 80), (443, 443)), "allowed domains", domains),
        ], "deny", cfg)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Policy):
            return NotImplemented
        return ((self.rules, self.default, self._mapped, self._dns)
                == (other.rules, other.default, other._mapped, other._dns))

    __hash__ = None  # type: ignore[assignment]  # __eq__ without __hash__: unhashable

    def __repr__(self) -> str:
        return f"Policy({len(self.rules)} rules, default={self.default!r})"


def _mapped_of(config: RelayConfig) -> tuple[str, ...]:
    """The `host` group's addresses under `config`: its mapped host-loopback addresses."""
    return tuple(str(ipaddress.ip_network(a)) for a in
                 (config.map_host_loopback_v4, config.map_host_loopback_v6) if a is not None)


def _dns_of(config: RelayConfig) -> tuple[str, ...]:
    """The `dns` group's addresses under `config`: the relay's DNS addresses."""
    return (str(ipaddress.ip_network(config.dns_ipv4)), str(ipaddress.ip_network(config.dns_ipv6)))


def loads_json(text: str | bytes) -> Any:
    """A policy's JSON text parsed, refusing duplicate keys (json.loads keeps the last
    silently, so `{"action": "deny", "action": "allow"}` would allow); ConfigError says
    what is wrong."""
    try:
        return json.loads(text, object_pairs_hook=unique_keys)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"policy: not valid JSON: {exc}") from None
