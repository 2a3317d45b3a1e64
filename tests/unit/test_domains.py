"""Domain rules in the egress policy: names normalised and matched (domains.py), the
table of DNS answers, and `Policy`/`EgressGate` judging flows by the names their
destination was answered for, with hypothesis properties of both."""

from __future__ import annotations

from collections import Counter
from ipaddress import ip_address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaynat.config import ConfigError, RelayConfig
from relaynat.domains import (
    NameTable,
    domain_matches,
    normalize_domain,
    normalize_pattern,
    wire_name,
)
from relaynat.egress_gate import EgressGate
from relaynat.policy import Policy, Rule
from relaynat.wire import IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP

CFG = RelayConfig()
DNS = (CFG.dns_ipv4.packed, CFG.dns_ipv6.packed)


def pk(addr: str) -> bytes:
    return ip_address(addr).packed


# --- names ------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "norm"), [
    ("Example.ORG", "example.org"),
    ("example.org.", "example.org"),
    ("  PyPI.org. ", "pypi.org"),
    ("bücher.example", "xn--bcher-kva.example"),
    ("BÜCHER.example", "xn--bcher-kva.example"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("_dmarc.example.org", "_dmarc.example.org"),
])
def test_normalize_domain(raw: str, norm: str) -> None:
    assert normalize_domain(raw) == norm


@pytest.mark.parametrize("bad", ["straße.de", "\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.org",
                                 "a\u200db.example", "\u03c3\u03bf\u03c6\u03af\u03b1\u03c2.gr",
                                 "", ".", "a..b", "example.org..", ".example.org",
                                 "a" * 64 + ".org", ("a" * 60 + ".") * 5 + "org",
                                 "ex ample.org", "*.org", "a.*.org"])
def test_normalize_domain_refuses(bad: str) -> None:
    with pytest.raises(ConfigError):
        normalize_domain(bad)


@pytest.mark.parametrize("bad", ["*", "*.", "a.*.org", "*example.org", "**.example.org",
                                 "*.*.example.org", "*."])
def test_normalize_pattern_refuses(bad: str) -> None:
    with pytest.raises(ConfigError):
        normalize_pattern(bad)


def test_normalize_pattern() -> None:
    assert normalize_pattern("*.Example.ORG.") == "*.example.org"
    assert normalize_pattern("*.bücher.example") == "*.xn--bcher-kva.example"
    assert normalize_pattern("pypi.org") == "pypi.org"


@pytest.mark.parametrize(("pattern", "name", "match"), [
    ("example.org", "example.org", True),
    ("example.org", "www.example.org", False),
    ("*.example.org", "example.org", False),
    ("*.example.org", "www.example.org", True),
    ("*.example.org", "a.b.example.org", True),
    ("*.example.org", "evilexample.org", False),
    ("*.example.org", "wwwexample.org", False),
    ("*.example.org", "example.org.evil.com", False),
    ("*.example.org", ".example.org", False),
    ("example.org", "example.org.evil.com", False),
    ("pypi.org", "pypi.org.", False),  # not normalised: the caller normalises first
])
def test_domain_matches(pattern: str, name: str, match: bool) -> None:
    assert domain_matches(pattern, name) is match


def test_wire_name() -> None:
    assert wire_name("WWW.Example.org.") == "www.example.org"
    assert wire_name("bücher.example") is None
    assert wire_name("") is None
    assert wire_name(".") is None
    assert wire_name("a..example.org") is None
    assert wire_name(".example.org") is None


labels = st.from_regex(r"\A[a-z0-9_]([a-z0-9-]{0,10}[a-z0-9])?\Z")
names_st = st.lists(labels, min_size=1, max_size=4).map(".".join)


def _case(draw: st.DrawFn, text: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
    return "".join(c.upper() if f else c for c, f in zip(text, flips, strict=True))


@st.composite
def spelled(draw: st.DrawFn, name: str) -> str:
    """Another spelling of `name`: any case, maybe a final dot."""
    return _case(draw, name) + draw(st.sampled_from(["", "."]))


@settings(max_examples=300, deadline=None)
@given(data=st.data(), name=names_st)
def test_spellings_are_one_name(data: st.DataObject, name: str) -> None:
    """Case and a final dot never change the name, nor whether a pattern covers it."""
    other = data.draw(spelled(name))
    assert normalize_domain(other) == normalize_domain(name) == name
    assert wire_name(other) == name
    pattern = data.draw(st.sampled_from(["*." + name, name]))
    pattern_spelled = normalize_pattern(data.draw(spelled(pattern)))
    assert pattern_spelled == pattern
    assert domain_matches(pattern_spelled, normalize_domain(other)) == domain_matches(
        pattern, name)


@settings(max_examples=300, deadline=None)
@given(suffix=names_st, prefix=names_st, glued=labels)
def test_wildcard_edges(suffix: str, prefix: str, glued: str) -> None:
    """`*.s` covers every name strictly below s, never s itself nor a label that merely
    ends with s's first label (evilexample.org against *.example.org)."""
    pattern = "*." + suffix
    assert domain_matches(pattern, prefix + "." + suffix)
    assert not domain_matches(pattern, suffix)
    assert not domain_matches(pattern, glued + suffix)
    assert domain_matches(suffix, suffix)
    assert not domain_matches(suffix, prefix + "." + suffix)


@settings(max_examples=200, deadline=None)
@given(pattern=st.one_of(names_st, names_st.map(lambda n: "*." + n)), name=names_st)
def test_match_is_a_label_suffix(pattern: str, name: str) -> None:
    """Against a label-wise reference: a wildcard covers the names whose labels end with
    its suffix's labels and have more of them."""
    want_labels = pattern.removeprefix("*.").split(".")
    got = name.split(".")
    if pattern.startswith("*."):
        expected = len(got) > len(want_labels) and got[-len(want_labels):] == want_labels
    else:
        expected = got == want_labels
    assert domain_matches(pattern, name) == expected


# --- the table of answers --------------------------------------------------------------

A1, A2, A3 = pk("192.0.2.10"), pk("192.0.2.11"), pk("2001:db8::10")


def test_table_learn_expire_and_hold() -> None:
    table = NameTable(max_entries=10, ttl_min_s=10, ttl_max_s=100, grace_s=30)
    table.learn("a.example", [A1, A3], 0, now=1000.0)  # TTL 0 floored to 10 s
    assert table.names_for(A1, 1005.0) == ("a.example",)
    assert table.learned(A3, "a.example", 1009.9)
    assert not table.learned(A1, "b.example", 1005.0)
    assert table.names_for(A1, 1010.0) == ()
    table.learn("a.example", [A1], 10**6, now=2000.0)  # capped to 100 s
    assert table.learned(A1, "a.example", 2099.0)
    table.hold(A1, 2050.0)
    assert table.learned(A1, "a.example", 5000.0)  # held: valid however old
    table.hold(A1, 5000.0)
    table.release(A1, 5000.0)
    assert table.learned(A1, "a.example", 6000.0)  # one flow still open
    table.release(A1, 6000.0)
    assert table.learned(A1, "a.example", 6029.0)  # the grace
    assert not table.learned(A1, "a.example", 6030.0)
    table.release(A1, 7000.0)  # more releases than holds: ignored
    assert table.held(A1) == 0
    table.learn("a.example", [A1], 10, now=8000.0)
    table.hold(A1, 8010.0)  # a hold does not bring back an answer that ran out
    assert not table.learned(A1, "a.example", 8010.0)


def test_table_bounded_oldest_first() -> None:
    table = NameTable(max_entries=3, ttl_min_s=10, ttl_max_s=100, grace_s=0)
    for i in range(5):
        table.learn(f"n{i}.example", [bytes([192, 0, 2, i])], 60, now=0.0)
    assert len(table) == 3
    assert table.evicted == 2
    assert [e.name for e in table.entries(1.0)] == ["n2.example", "n3.example", "n4.example"]
    table.learn("n2.example", [bytes([192, 0, 2, 2])], 60, now=1.0)  # refreshed: youngest
    table.learn("n5.example", [bytes([192, 0, 2, 5])], 60, now=1.0)
    assert [e.name for e in table.entries(1.0)] == ["n4.example", "n2.example", "n5.example"]


# --- the policy -------------------------------------------------------------------------

def test_rule_file_form_roundtrip() -> None:
    policy = Policy.from_toml('''
        default = "deny"
        [[rule]]
        action = "allow"
        proto = "tcp"
        ports = "443"
        domains = ["PyPI.org.", "*.pythonhosted.org"]
        [[rule]]
        action = "allow"
        domains = "example.org"
        inspect_ports = []
    ''', CFG)
    assert policy.rules[0].domains == ("pypi.org", "*.pythonhosted.org")
    assert policy.rules[1].inspect_ports == ()
    assert Policy.from_dict(policy.to_dict(), CFG) == policy
    assert policy.filters_dns and policy.has_domains


@pytest.mark.parametrize(("rule", "says"), [
    ({"action": "allow", "domains": []}, "empty"),
    ({"action": "allow", "domains": ["a..b"]}, "empty label"),
    ({"action": "allow", "domains": ["a.*.b"]}, "first label"),
    ({"action": "allow", "domains": [3]}, "not a string"),
    ({"action": "allow", "inspect_ports": "443"}, "rules with domains"),
])
def test_rule_refusals(rule: dict[str, object], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        Policy([rule], "deny", CFG)


def test_decide_with_names() -> None:
    policy = Policy([
        Rule("deny", "any", ("metadata",)),
        Rule("allow", "tcp", (), ((443, 443),), "", ("*.example.org",)),
        Rule("allow", "udp", (), (), "", ("dns.example.net",)),
    ], "deny", CFG)
    dst = pk("192.0.2.10")
    assert policy.decide(IPPROTO_TCP, dst, 443) == (False, -1, False)
    assert policy.decide(IPPROTO_TCP, dst, 443, ["example.org"]).allow is False
    assert policy.decide(IPPROTO_TCP, dst, 443, ["evilexample.org"]).allow is False
    assert policy.decide(IPPROTO_TCP, dst, 443, ["x", "a.example.org"]) == (True, 1, True)
    assert policy.decide(IPPROTO_TCP, dst, 80, ["a.example.org"]).allow is False
    assert policy.decide(IPPROTO_UDP, dst, 53, ["dns.example.net"]) == (True, 2, False)
    # rebinding: a covered name resolving to the metadata address
    meta = pk("169.254.169.254")
    assert policy.decide(IPPROTO_TCP, meta, 443, ["a.example.org"]) == (False, 0, False)
    assert policy.covers(1, "b.example.org") and not policy.covers(1, "example.org")
    assert policy.allows_name("b.example.org") and not policy.allows_name("example.org")


def test_allow_domains_profile() -> None:
    policy = Policy.allow_domains(["pypi.org", "*.example.org"], CFG)
    assert policy.default == "deny" and policy.filters_dns
    public = pk("93.184.216.34")
    assert policy.decide(IPPROTO_TCP, public, 443, ["pypi.org"]) == (True, 5, True)
    assert policy.decide(IPPROTO_TCP, public, 80, ["a.example.org"]).inspect
    assert not policy.decide(IPPROTO_UDP, public, 443, ["pypi.org"]).allow
    assert not policy.decide(IPPROTO_TCP, public, 853, ["pypi.org"]).allow
    # DNS to a resolver of the guest's own choosing (any public address), not the relay's.
    assert not policy.decide(IPPROTO_UDP, public, 53).allow
    assert not policy.decide(IPPROTO_ICMP, public, 0, ["pypi.org"]).allow
    for private in ("10.1.2.3", "169.254.169.254", "10.0.2.2", "fe80::1", "fd00::2"):
        assert not policy.decide(IPPROTO_TCP, pk(private), 443, ["pypi.org"]).allow
    assert policy.decide(IPPROTO_UDP, CFG.dns_ipv4.packed, 53).allow
    with pytest.raises(ConfigError):
        Policy.allow_domains([], CFG)
    with pytest.raises(ConfigError):
        Policy.allow_domains(["bad..name"], CFG)


def test_gate_judge_name_ok_and_pins() -> None:
    stats: Counter[str] = Counter()
    denied: list[tuple[object, ...]] = []
    table = NameTable(ttl_min_s=10, ttl_max_s=60, grace_s=5)

    def on_deny(proto: int, dst: bytes, dport: int, rule: int, comment: str, *,
                names: tuple[str, ...] = ()) -> None:
        denied.append((proto, dst, dport, rule, comment, names))

    gate = EgressGate(Policy.allow_domains(["*.example.org"], CFG), DNS, stats, on_deny,
                      table)
    dst = pk("93.184.216.34")
    assert not gate.judge(IPPROTO_TCP, dst, 443, 0.0).allow  # never resolved
    assert denied[-1][3] == -1
    table.learn("www.example.org", [dst], 30, 0.0)
    verdict = gate.judge(IPPROTO_TCP, dst, 443, 1.0)
    assert verdict.allow and verdict.inspect and verdict.names == ("www.example.org",)
    assert verdict.comment == "allowed domains"
    assert gate.name_ok(verdict, dst, "WWW.example.org.", 2.0)
    assert not gate.name_ok(verdict, dst, "other.example.org", 2.0)  # not learned for it
    assert not gate.name_ok(verdict, dst, "evil.com", 2.0)
    assert not gate.name_ok(verdict, dst, None, 2.0)
    gate.flow_opened(dst, 1.0)
    assert gate.judge(IPPROTO_TCP, dst, 443, 100.0).allow  # held past the TTL
    assert not gate.denies(IPPROTO_TCP, dst, 443, 100.0)
    gate.flow_closed(dst, 100.0)
    assert gate.judge(IPPROTO_TCP, dst, 443, 104.0).allow  # the grace
    assert not gate.judge(IPPROTO_TCP, dst, 443, 105.0).allow
    assert gate.denies(IPPROTO_TCP, dst, 443, 105.0)
    assert gate.judge(IPPROTO_UDP, DNS[0], 53, 0.0).allow  # the relay's own DNS
    assert stats["policy_allowed"] == 3 and stats["policy_denied_default"] == 2
    assert denied[-1] == (IPPROTO_TCP, dst, 443, -1, "", ())  # the answer ran out
    table.learn("www.example.org", [pk("169.254.169.254")], 30, 200.0)
    assert not gate.judge(IPPROTO_TCP, pk("169.254.169.254"), 443, 200.0).allow
    assert denied[-1] == (IPPROTO_TCP, pk("169.254.169.254"), 443, 1,
                          "cloud instance metadata", ("www.example.org",))


# "A flow is allowed by a domain rule only if an answer for a covered name with that
# address preceded it and is still valid": a random history of answers, flows opening
# and closing and flow attempts, checked against a model that keeps every answer.

ADDRS = [bytes([192, 0, 2, i]) for i in range(4)]
NAMES = ["a.example.org", "b.example.org", "example.org", "evilexample.org", "x.other.net"]
TTL_MIN, TTL_MAX, GRACE = 5.0, 50.0, 7.0

steps = st.lists(st.one_of(
    st.tuples(st.just("learn"), st.sampled_from(NAMES), st.sampled_from(ADDRS),
              st.integers(0, 100)),
    st.tuples(st.just("open"), st.sampled_from(ADDRS)),
    st.tuples(st.just("close"), st.sampled_from(ADDRS)),
    st.tuples(st.just("flow"), st.sampled_from(ADDRS)),
    st.tuples(st.just("wait"), st.floats(0, 30)),
), max_size=60)


@settings(max_examples=400, deadline=None)
@given(history=steps)
def test_flow_allowed_only_after_a_valid_covered_answer(
        history: list[tuple[object, ...]]) -> None:
    table = NameTable(max_entries=1000, ttl_min_s=TTL_MIN, ttl_max_s=TTL_MAX, grace_s=GRACE)
    gate = EgressGate(Policy([Rule("allow", "tcp", (), (), "", ("*.example.org",))],
                             "deny", CFG), DNS, Counter(), None, table)
    now = 0.0
    heard: list[tuple[str, bytes]] = []  # every answer, in order
    # The model: (name, addr) -> until when it is valid, and the open flows per address.
    valid_until: dict[tuple[str, bytes], float] = {}
    open_flows: Counter[bytes] = Counter()
    for step in history:
        kind, arg = step[0], step[1]
        if kind == "learn":
            name, addr, ttl = step[1], step[2], step[3]
            assert isinstance(name, str) and isinstance(addr, bytes) and isinstance(ttl, int)
            table.learn(name, [addr], ttl, now)
            heard.append((name, addr))
            until = now + min(max(ttl, TTL_MIN), TTL_MAX)
            valid_until[(name, addr)] = max(valid_until.get((name, addr), until), until)
        elif kind == "wait":
            assert isinstance(arg, float)
            now += arg
        else:
            assert isinstance(arg, bytes)
            mine = [key for key in valid_until if key[1] == arg]
            if kind == "open":
                if not open_flows[arg]:  # a flow keeps what is valid when it opens
                    for key in mine:
                        if valid_until[key] <= now:
                            del valid_until[key]
                gate.flow_opened(arg, now)
                open_flows[arg] += 1
            elif kind == "close":
                if open_flows[arg]:
                    gate.flow_closed(arg, now)
                    open_flows[arg] -= 1
                    if not open_flows[arg]:
                        for key in mine:
                            valid_until[key] = max(valid_until[key], now + GRACE)
            else:
                allowed = gate.judge(IPPROTO_TCP, arg, 443, now).allow
                covered = [key for key in mine if domain_matches("*.example.org", key[0])]
                expected = any(valid_until[key] > now or open_flows[arg] for key in covered)
                assert allowed == expected, (arg, now, valid_until, open_flows)
                if allowed:  # never without an answer for a covered name before it
                    assert any(a == arg and domain_matches("*.example.org", n)
                               for n, a in heard)


def test_allow_domain_option_and_keyword() -> None:
    from relaynat import Guests, Relay
    from relaynat.cli.options import build_parser, config_from_args, policy_from_args

    args = build_parser().parse_args(["run", "--allow-domain", "PyPI.org", "--allow-domain",
                                      "*.pythonhosted.org", "--", "true"])
    config = config_from_args(args)
    policy = policy_from_args(args, config)
    assert policy == Policy.allow_domains(["pypi.org", "*.pythonhosted.org"], config)
    with pytest.raises(SystemExit):  # one policy at a time
        build_parser().parse_args(["run", "--allow-domain", "a.test", "--sandbox", "--",
                                   "true"])
    with pytest.raises(ConfigError):
        policy_from_args(build_parser().parse_args(
            ["run", "--allow-domain", "a..test", "--", "true"]), config)
    relay = Relay(CFG, allow_domains=["a.test"])
    assert relay.policy == Policy.allow_domains(["a.test"], CFG)
    with pytest.raises(ConfigError, match="not both"):
        Relay(CFG, Policy.sandbox(CFG), allow_domains=["a.test"])
    guest = Guests().add("g", CFG, allow_domains=["*.a.test"])
    assert guest.policy is not None and guest.policy.allows_name("b.a.test")


@settings(max_examples=200, deadline=None)
@given(pairs=st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(ADDRS)), max_size=40),
       bound=st.integers(1, 6))
def test_table_keeps_the_newest_pairs_within_its_bound(pairs: list[tuple[str, bytes]],
                                                       bound: int) -> None:
    table = NameTable(max_entries=bound, ttl_min_s=100, ttl_max_s=100)
    kept: list[tuple[str, bytes]] = []  # the reference: most recently learned last
    evicted = 0
    for name, addr in pairs:
        table.learn(name, [addr], 100, 0.0)
        if (name, addr) in kept:
            kept.remove((name, addr))
        kept.append((name, addr))
        if len(kept) > bound:
            del kept[0]
            evicted += 1
    assert [(e.name, e.addr) for e in table.entries(1.0)] == kept
    assert len(table) == len(kept) and table.evicted == evicted
    for addr in ADDRS:
        assert table.names_for(addr, 1.0) == tuple(sorted(n for n, a in kept if a == addr))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet="abcxyz019-_éüßΣσςА", min_size=1, max_size=8),
                min_size=1, max_size=4).map(".".join))
def test_a_normalised_name_is_a_fixed_point_that_the_wire_form_keeps(name: str) -> None:
    """Normalising twice changes nothing, and the normalised (ASCII) name is what a
    guest's resolver would send, which `wire_name` leaves as it is."""
    try:
        once = normalize_domain(name)
    except ConfigError:
        return
    assert once.isascii() and once == once.lower()
    assert normalize_domain(once) == once
    assert wire_name(once) == once
