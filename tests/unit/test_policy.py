"""Tests for relaynat.policy: groups, validation messages, file formats, the sandbox
profile, and hypothesis checks of first-match semantics against a plain list scan."""

from __future__ import annotations

import contextlib
import json
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaynat.config import ConfigError, RelayConfig
from relaynat.policy import (
    GROUPS,
    Decision,
    Policy,
    Rule,
)
from relaynat.wire import IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP

CFG = RelayConfig()


def pk(addr: str) -> bytes:
    return ip_address(addr).packed


def deny_to(*to: str, proto: str = "any", ports: str = "") -> Policy:
    rule: dict[str, object] = {"action": "deny", "proto": proto}
    if to:
        rule["to"] = list(to)
    if ports:
        rule["ports"] = ports
    return Policy([rule], "allow", CFG)


# --- groups ---------------------------------------------------------------------------

GROUP_MEMBERS = {
    "loopback": ["127.0.0.1", "127.255.255.255", "::1", "10.0.2.2", "fd00::2",
                 # Connected to, these reach host loopback too (addressing.py).
                 "0.0.0.0", "0.255.255.255", "::", "::ffff:0.0.0.0", "::ffff:127.0.0.2",
                 "::127.0.0.1", "64:ff9b::7f00:1", "64:ff9b::1"],
    "host": ["10.0.2.2", "fd00::2"],
    "dns": ["10.0.2.3", "fd00::3"],
    "private": ["10.0.0.0", "10.255.255.255", "172.16.0.1", "172.31.255.255", "192.168.1.1",
                "100.64.0.1", "100.127.255.255", "fc00::1", "fdff:ffff::1", "10.0.2.3"],
    "link-local": ["169.254.0.1", "169.254.169.254", "fe80::1", "febf::1"],
    "metadata": ["169.254.169.254", "fd00:ec2::254"],
    "multicast": ["224.0.0.1", "239.255.255.255", "ff02::1", "ff0e::1"],
    "public": ["93.184.216.34", "93.184.216.35", "2a00::8888", "2a00::1", "172.32.0.0",
               "100.128.0.0", "::ffff:93.184.216.34", "64:ff9b::5db8:d822", "::93.184.216.34"],
}
GROUP_NONMEMBERS = {
    "loopback": ["128.0.0.1", "::2", "10.0.2.3", "1.0.0.0", "::1.0.0.0", "64:ff9b::1:0:1"],
    "host": ["127.0.0.1", "::1", "10.0.2.15"],
    "dns": ["10.0.2.2", "fd00::2", "10.0.2.4", "127.0.0.53"],
    "private": ["11.0.0.0", "172.15.255.255", "172.32.0.0", "192.169.0.0", "100.63.255.255",
                "fe00::1"],
    "link-local": ["169.253.255.255", "169.255.0.0", "fec0::1"],
    "metadata": ["169.254.169.253", "fd00:ec2::253"],
    "multicast": ["223.255.255.255", "240.0.0.0", "fe80::1"],
    "public": ["10.0.0.1", "127.0.0.1", "169.254.1.1", "224.0.0.1", "192.0.2.1",
               "198.51.100.1", "203.0.113.1", "255.255.255.255", "0.0.0.1", "::", "::1",
               "fe80::1", "fc00::1", "2001:db8::1", "ff02::1", "198.18.0.1", "3fff::1",
               "::ffff:10.0.2.2", "64:ff9b::a9fe:a9fe", "::10.0.0.1"],
}


@pytest.mark.parametrize("group", GROUPS)
def test_group_membership(group: str) -> None:
    policy = deny_to(group)
    for addr in GROUP_MEMBERS[group]:
        assert policy.decide(IPPROTO_TCP, pk(addr), 80) == Decision(False, 0), addr
        assert policy.in_group(group, ip_address(addr)), addr
    for addr in GROUP_NONMEMBERS[group]:
        assert policy.decide(IPPROTO_TCP, pk(addr), 80) == Decision(True, -1), addr
        assert not policy.in_group(group, ip_address(addr)), addr


def test_host_group_follows_config() -> None:
    cfg = CFG.replace(map_host_loopback_v4=IPv4Address("10.0.2.9"), map_host_loopback_v6=None)
    policy = Policy([{"action": "deny", "to": "host"}], "allow", cfg)
    assert not policy.decide(IPPROTO_TCP, pk("10.0.2.9"), 1).allow
    assert policy.decide(IPPROTO_TCP, pk("10.0.2.2"), 1).allow
    assert policy.decide(IPPROTO_TCP, pk("fd00::2"), 1).allow
    assert not Policy([{"action": "deny", "to": "loopback"}], "allow", cfg).decide(
        IPPROTO_UDP, pk("10.0.2.9"), 1).allow


def test_v4_mapped_v6_is_judged_as_v4() -> None:
    policy = deny_to("169.254.169.254/32")
    assert not policy.decide(IPPROTO_TCP, pk("::ffff:169.254.169.254"), 80).allow
    assert policy.decide(IPPROTO_TCP, pk("::ffff:169.254.169.253"), 80).allow


def test_rules_in_v4_mapped_form_match_both_spellings() -> None:
    """A rule written as ::ffff:a.b.c.d is the IPv4 rule it embeds."""
    policy = deny_to("::ffff:169.254.169.254")
    for dst in ("169.254.169.254", "::ffff:169.254.169.254", "64:ff9b::a9fe:a9fe"):
        assert policy.decide(IPPROTO_TCP, pk(dst), 80) == Decision(False, 0), dst
    assert policy.decide(IPPROTO_TCP, pk("169.254.169.253"), 80).allow
    everything_v4 = deny_to("::ffff:0:0/96")
    for dst in ("93.184.216.34", "::ffff:93.184.216.34", "0.0.0.0", "255.255.255.255"):
        assert not everything_v4.decide(IPPROTO_UDP, pk(dst), 53).allow, dst
    assert everything_v4.decide(IPPROTO_UDP, pk("2001:db8::1"), 53).allow
    assert not deny_to("::ffff:10.0.0.0/104").decide(IPPROTO_TCP, pk("10.9.8.7"), 1).allow
    # A wider IPv6 rule stays an IPv6 rule: it does not take all of IPv4 with it.
    all_v6 = deny_to("::/0")
    assert all_v6.decide(IPPROTO_TCP, pk("93.184.216.34"), 1).allow
    assert all_v6.decide(IPPROTO_TCP, pk("::ffff:93.184.216.34"), 1).allow
    assert not all_v6.decide(IPPROTO_TCP, pk("2001:db8::1"), 1).allow


def test_nat64_and_v4_compatible_match_rules_on_either_form() -> None:
    metadata = deny_to("169.254.169.254")
    for dst in ("64:ff9b::a9fe:a9fe", "::169.254.169.254"):
        assert metadata.decide(IPPROTO_TCP, pk(dst), 80) == Decision(False, 0), dst
    assert metadata.decide(IPPROTO_TCP, pk("64:ff9b::a9fe:a9fd"), 80).allow
    assert metadata.decide(IPPROTO_TCP, pk("64:ff9b:1::a9fe:a9fe"), 80).allow  # not /96
    assert not deny_to("64:ff9b::/96").decide(IPPROTO_TCP, pk("64:ff9b::a9fe:a9fe"), 80).allow
    assert not deny_to("::/96").decide(IPPROTO_TCP, pk("::169.254.169.254"), 80).allow
    # :: and ::1 are not IPv4-compatible addresses: an IPv4 rule does not take them.
    only_v4 = Policy([{"action": "allow", "to": "0.0.0.0/0"}], "deny", CFG)
    for dst in ("::", "::1", "::2"):
        assert only_v4.decide(IPPROTO_TCP, pk(dst), 80) == Decision(False, -1), dst
    assert only_v4.decide(IPPROTO_TCP, pk("::93.184.216.34"), 80).allow


# --- protocols and ports ---------------------------------------------------------------

def test_protocols() -> None:
    for proto, denied in [("tcp", {IPPROTO_TCP}), ("udp", {IPPROTO_UDP}),
                          ("icmp", {IPPROTO_ICMP, IPPROTO_ICMPV6}),
                          ("any", {IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, IPPROTO_ICMPV6})]:
        policy = deny_to("0.0.0.0/0", "::/0", proto=proto)
        for number in (IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, IPPROTO_ICMPV6):
            assert policy.decide(number, pk("1.2.3.4"), 7).allow == (number not in denied)


def test_ports_restrict_to_tcp_udp() -> None:
    policy = deny_to("10.0.0.0/8", ports="22,80-90")
    for port, allowed in [(21, True), (22, False), (23, True), (79, True), (80, False),
                          (90, False), (91, True)]:
        assert policy.decide(IPPROTO_TCP, pk("10.1.2.3"), port).allow == allowed, port
        assert policy.decide(IPPROTO_UDP, pk("10.1.2.3"), port).allow == allowed, port
    assert policy.decide(IPPROTO_ICMP, pk("10.1.2.3"), 22).allow


def test_rule_without_to_matches_everything() -> None:
    policy = Policy([{"action": "deny", "proto": "udp"}], "allow", CFG)
    assert not policy.decide(IPPROTO_UDP, pk("::1"), 5).allow
    assert policy.decide(IPPROTO_TCP, pk("::1"), 5).allow
    assert Policy([], "deny").decide(IPPROTO_TCP, pk("93.184.216.34"), 1) == Decision(False, -1)


# --- validation --------------------------------------------------------------------------

@pytest.mark.parametrize(("rule", "message"), [
    ({"action": "deny", "to": "intranet"}, "policy rule 1: unknown group 'intranet'"),
    ({"action": "deny", "to": "10.0.0.1/8"}, "policy rule 1: bad CIDR '10.0.0.1/8'"),
    ({"action": "deny", "to": "300.0.0.0/8"}, "policy rule 1: bad CIDR"),
    ({"action": "deny", "to": "fd00::/129"}, "policy rule 1: bad CIDR"),
    ({"action": "deny", "ports": "65536"}, "policy rule 1: port 65536 is out of range"),
    ({"action": "deny", "ports": [70000]}, "policy rule 1: port 70000 is out of range"),
    ({"action": "deny", "ports": "90-80"}, "policy rule 1: port range '90-80' is reversed"),
    ({"action": "deny", "ports": "http"}, "policy rule 1: port 'http' is not a number"),
    ({"action": "deny", "port": "22"}, "policy rule 1: unknown key 'port'"),
    ({"action": "reject"}, "policy rule 1: action must be 'allow' or 'deny', not 'reject'"),
    ({}, "policy rule 1: action must be"),
    ({"action": "deny", "proto": "sctp"}, "policy rule 1: unknown proto 'sctp'"),
    ({"action": "deny", "proto": "icmp", "ports": "1"}, "policy rule 1: ports apply to tcp"),
    ({"action": "deny", "to": 7}, "policy rule 1: 'to' must be"),
    ({"action": "deny", "to": []}, "policy rule 1: 'to' is empty"),
    ({"action": "deny", "proto": ["tcp"]}, "policy rule 1: unknown proto ['tcp']"),
    ({"action": "deny", "ports": True}, "policy rule 1: ports must be"),
    ({"action": "deny", "ports": ""}, "policy rule 1: ports is empty"),
    ({"action": "deny", "ports": " "}, "policy rule 1: ports is empty"),
    ({"action": "deny", "ports": []}, "policy rule 1: ports is empty"),
    ({"action": "deny", "to": "fe80::1%eth0"}, "policy rule 1: 'fe80::1%eth0' has a zone"),
    ({"action": "deny", "to": ["fe80::%1/64"]}, "policy rule 1: 'fe80::%1/64' has a zone"),
])
def test_rule_errors_name_the_rule(rule: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Policy([{"action": "allow"}, rule])
    assert str(info.value).startswith(message), str(info.value)


def test_top_level_errors() -> None:
    with pytest.raises(ConfigError, match="default must be"):
        Policy.from_dict({"default": "maybe"})
    with pytest.raises(ConfigError, match="unknown key 'rules'"):
        Policy.from_dict({"rules": []})
    with pytest.raises(ConfigError, match="not valid TOML"):
        Policy.from_toml("default = ")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Policy.from_json("{")
    with pytest.raises(ConfigError, match="'rule' must be a list"):
        Policy.from_json('{"rule": {}}')


def test_duplicate_json_keys_are_refused(tmp_path) -> None:
    # json.loads keeps the last of two equal keys: this rule would silently allow.
    text = '{"rule": [{"action": "deny", "to": "metadata", "action": "allow"}]}'
    with pytest.raises(ConfigError, match="duplicate key 'action'"):
        Policy.from_json(text)
    with pytest.raises(ConfigError, match="duplicate key 'default'"):
        Policy.from_json('{"default": "deny", "rule": [], "default": "allow"}')
    path = tmp_path / "policy.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match="duplicate key"):
        Policy.load(path)
    with pytest.raises(ConfigError, match="not valid TOML"):
        Policy.from_toml('default = "deny"\ndefault = "allow"\n')


# --- files and serialisation ------------------------------------------------------------

TOML = """
default = "allow"
[[rule]]
action = "deny"
proto = "tcp"
to = "metadata"
[[rule]]
action = "deny"
to = "10.0.0.0/8"
ports = "22,80-90"
comment = "no ssh or web to the LAN"
"""


def test_toml_and_json_files(tmp_path) -> None:
    toml_file = tmp_path / "policy.toml"
    toml_file.write_text(TOML)
    policy = Policy.load(toml_file, CFG)
    assert policy.decide(IPPROTO_TCP, pk("169.254.169.254"), 80) == Decision(False, 0)
    assert policy.decide(IPPROTO_UDP, pk("169.254.169.254"), 80) == Decision(True, -1)
    assert policy.decide(IPPROTO_UDP, pk("10.9.9.9"), 85) == Decision(False, 1)
    json_file = tmp_path / "policy.json"
    json_file.write_text(json.dumps(policy.to_dict()))
    assert Policy.load(json_file, CFG) == policy
    with pytest.raises(ConfigError, match="policy file"):
        Policy.load(tmp_path / "missing.toml")


def test_dict_round_trip_and_rule_objects() -> None:
    policy = Policy([Rule("deny", "udp", ("private", "::/0"), ((53, 53), (1000, 2000))),
                     {"action": "allow", "to": ["public"], "ports": [443, "8000-8100"]}],
                    "deny", CFG)
    data = json.loads(json.dumps(policy.to_dict()))
    assert data["rule"][0] == {"action": "deny", "proto": "udp", "to": ["private", "::/0"],
                               "ports": "53,1000-2000"}
    assert data["rule"][1]["ports"] == "443,8000-8100"
    assert Policy.from_dict(data, CFG) == policy


# --- sandbox ------------------------------------------------------------------------------

def test_sandbox_profile() -> None:
    policy = Policy.sandbox(CFG)
    for addr in ("169.254.169.254", "fd00:ec2::254", "169.254.3.4", "fe80::1", "10.0.2.2",
                 "fd00::2", "127.0.0.1", "::1", "192.168.1.1", "172.20.0.1", "10.0.2.3",
                 "100.64.1.1", "fd12::1", "0.0.0.0", "::", "::ffff:0.0.0.0",
                 "::ffff:127.0.0.1", "::127.0.0.1", "64:ff9b::7f00:1",
                 "64:ff9b::a9fe:a9fe", "::ffff:10.0.2.2", "64:ff9b::a00:202"):
        for proto in (IPPROTO_TCP, IPPROTO_UDP):
            assert not policy.decide(proto, pk(addr), 80).allow, addr
    for addr in ("93.184.216.34", "2a00::1111"):
        assert policy.decide(IPPROTO_TCP, pk(addr), 443) == Decision(True, -1)
    # The relay's DNS addresses stay reachable on port 53 even if the relay consults it.
    for addr in ("10.0.2.3", "fd00::3"):
        assert policy.decide(IPPROTO_UDP, pk(addr), 53).allow
        assert policy.decide(IPPROTO_TCP, pk(addr), 53).allow
    assert Policy.from_dict(policy.to_dict(), CFG) == policy


# --- hypothesis: first-match against a reference scan -------------------------------------

MAPPED, NAT64, COMPATIBLE = (ip_network(n) for n in ("::ffff:0:0/96", "64:ff9b::/96", "::/96"))


def judged_as(addr: IPv4Address | IPv6Address) -> list[IPv4Address | IPv6Address]:
    """The addresses a destination is judged as (the module docstring, read literally)."""
    if isinstance(addr, IPv6Address):
        if addr.ipv4_mapped is not None:
            return [addr.ipv4_mapped]
        if addr in NAT64 or (addr in COMPATIBLE and addr >= IPv6Address("::1.0.0.0")):
            return [addr, IPv4Address(int(addr) & 0xFFFFFFFF)]
    return [addr]


def normalised(net: IPv4Network | IPv6Network) -> IPv4Network | IPv6Network:
    if isinstance(net, IPv6Network) and net.subnet_of(MAPPED):
        return IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
    return net


def reference(rules: list[dict], default: str, proto: int, dst: bytes, port: int) -> Decision:
    """A literal reading of the spec with ipaddress, for CIDR rules only."""
    forms = judged_as(ip_address(dst))
    names = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmp"}
    for i, rule in enumerate(rules):
        if rule["proto"] not in ("any", names[proto]):
            continue
        if rule["ports"] and (proto not in (6, 17)
                              or not any(lo <= port <= hi for lo, hi in rule["ports"])):
            continue
        nets = [normalised(ip_network(t)) for t in rule["to"]]
        if nets and not any(a.version == n.version and a in n for n in nets for a in forms):
            continue
        return Decision(rule["action"] == "allow", i)
    return Decision(default == "allow", -1)


v4_nets = st.builds(lambda a, n: ip_network((a, n), strict=False),
                    st.integers(0, 2**32 - 1), st.integers(0, 32))
v6_nets = st.builds(lambda a, n: ip_network((IPv6Address(a), n), strict=False),
                    st.integers(2**48, 2**128 - 1), st.integers(0, 128))
#: IPv4 prefixes written in the IPv6 forms that embed them (mapped, NAT64, compatible).
embedded_nets = st.builds(lambda net, prefix: ip_network(
    (IPv6Address(int(prefix.network_address) | int(net.network_address)), net.prefixlen + 96)),
    v4_nets, st.sampled_from([MAPPED, NAT64, COMPATIBLE]))
port_ranges = st.tuples(st.integers(0, 65535), st.integers(0, 65535)).map(sorted).map(tuple)
rules_st = st.lists(st.fixed_dictionaries({
    "action": st.sampled_from(["allow", "deny"]),
    "proto": st.sampled_from(["tcp", "udp", "icmp", "any"]),
    "to": st.lists(st.one_of(v4_nets, v6_nets, embedded_nets).map(str), max_size=3),
    "ports": st.lists(port_ranges, max_size=3),
}), max_size=6).map(lambda rules: [r | {"ports": [] if r["proto"] == "icmp" else r["ports"]}
                                   for r in rules])


def edges(net_text: str) -> list[bytes]:
    """First and last address of a prefix and their neighbours just outside."""
    net = ip_network(net_text)
    top = 2**net.max_prefixlen - 1
    first, last = int(net.network_address), int(net.broadcast_address)
    width = net.max_prefixlen // 8
    return [a.to_bytes(width, "big") for a in (first - 1, first, last, last + 1) if 0 <= a <= top]


@settings(max_examples=100, deadline=None)
@given(rules=rules_st, default=st.sampled_from(["allow", "deny"]),
       proto=st.sampled_from([6, 17, 1, 58]), port=st.integers(0, 65535), data=st.data())
def test_first_match_matches_reference(rules, default, proto, port, data) -> None:
    policy = Policy([{k: v for k, v in r.items() if v} | (
        {"ports": ",".join(f"{a}-{b}" for a, b in r["ports"])} if r["ports"] else {})
        for r in rules], default, CFG)
    candidates = [e for r in rules for t in r["to"] for e in edges(t)]
    candidates += [pk("93.184.216.34"), pk("2001:db8::1"), pk("::"), pk("::1")]
    # Each IPv4 candidate in the IPv6 spellings that embed it, too.
    candidates += [prefix.network_address.packed[:12] + e for e in candidates if len(e) == 4
                   for prefix in (MAPPED, NAT64, COMPATIBLE)]
    dst = data.draw(st.sampled_from(candidates))
    ports = [p for r in rules for lo, hi in r["ports"] for p in (lo - 1, lo, hi, hi + 1)]
    port = data.draw(st.sampled_from([port, *[p for p in ports if 0 <= p <= 65535]]))
    assert policy.decide(proto, dst, port) == reference(rules, default, proto, dst, port)
    assert Policy.from_dict(json.loads(json.dumps(policy.to_dict())), CFG) == policy


@settings(max_examples=100, deadline=None)
@given(net=st.one_of(v4_nets, v6_nets, embedded_nets))
def test_cidr_edges(net) -> None:
    policy = deny_to(str(net))
    for dst in edges(str(net)):
        inside = ip_address(dst) in net
        assert policy.decide(IPPROTO_TCP, dst, 1).allow == (not inside)


@settings(max_examples=100, deadline=None)
@given(lo=st.integers(0, 65535), hi=st.integers(0, 65535))
def test_port_range_edges(lo: int, hi: int) -> None:
    lo, hi = min(lo, hi), max(lo, hi)
    policy = deny_to(ports=f"{lo}-{hi}")
    for port in (lo - 1, lo, hi, hi + 1):
        if 0 <= port <= 65535:
            assert policy.decide(IPPROTO_UDP, pk("1.2.3.4"), port).allow == (not lo <= port <= hi)


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.fixed_dictionaries({"action": st.sampled_from(["allow", "deny"])},
                                            optional={k: inner for k in ("proto", "to", "ports",
                                                                         "comment", "x")}),
                    max_leaves=8))
def test_arbitrary_input_raises_only_config_error(data) -> None:
    with contextlib.suppress(ConfigError):
        Policy.from_dict({"default": "allow", "rule": [data]})


def test_decide_accepts_ipv4_and_ipv6_bytes() -> None:
    assert isinstance(Policy.sandbox().decide(IPPROTO_ICMPV6, IPv6Address("::1").packed), Decision)
