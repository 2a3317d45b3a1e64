"""link/dns_filter.py: a guest's DNS queries screened under a policy with domain rules,
and the upstream's answers read for the addresses they give (dpkt builds the messages
here; dnsmasq answers them in tests/integration/test_domain_policy.py)."""

from __future__ import annotations

import struct

import dpkt
from hypothesis import given, settings
from hypothesis import strategies as st

from relaynat.config import RelayConfig
from relaynat.link.dns_filter import (
    MEMO_SIZE,
    RCODE_REFUSED,
    DnsFilter,
    read_answer,
    screen_query,
    type_name,
)
from relaynat.policy import Policy, Rule

CFG = RelayConfig()
POLICY = Policy([Rule("allow", "tcp", (), (), "", ("*.allowed.test", "pypi.org"))],
                "deny", CFG)


def query(name: str, qtype: int = 1, ident: int = 0x1234, rd: bool = True) -> bytes:
    msg = dpkt.dns.DNS(id=ident, op=0x0100 if rd else 0, qd=[dpkt.dns.DNS.Q(
        name=name, type=qtype, cls=1)])
    msg.an, msg.ns, msg.ar = [], [], []
    return bytes(msg)


def answer(name: str, qtype: int, records: list[tuple[str, int, int, object]],
           rcode: int = 0) -> bytes:
    """A response to `name`: records (owner, type, ttl, value: bytes for A/AAAA, str for
    CNAME)."""
    msg = dpkt.dns.DNS(id=7, op=0x8180 | rcode, qd=[dpkt.dns.DNS.Q(name=name, type=qtype,
                                                                   cls=1)])
    msg.an = []
    for owner, rtype, ttl, value in records:
        rr = dpkt.dns.DNS.RR(name=owner, type=rtype, cls=1, ttl=ttl)
        if rtype == 1:
            rr.ip = value
        elif rtype == 28:
            rr.ip6 = value
        else:
            rr.cname = value
        msg.an.append(rr)
    msg.ns, msg.ar = [], []
    return bytes(msg)


def test_covered_names_are_forwarded() -> None:
    for name in ("www.allowed.test", "WWW.Allowed.TEST", "a.b.allowed.test", "pypi.org"):
        screened = screen_query(query(name), POLICY)
        assert (screened.action, screened.reply) == ("forwarded", None), name
        assert screened.name == name.lower()


def test_uncovered_names_are_refused_with_their_question() -> None:
    for name in ("allowed.test", "evilallowed.test", "x.pypi.org", "exfil.denied.test"):
        msg = query(name, ident=0xBEEF)
        screened = screen_query(msg, POLICY)
        assert screened.action == "refused"
        assert screened.reply is not None
        reply = dpkt.dns.DNS(screened.reply)
        assert reply.id == 0xBEEF and reply.qr == 1 and reply.rcode == RCODE_REFUSED
        assert reply.rd == 1 and reply.ra == 1
        assert [q.name for q in reply.qd] == [name] and reply.an == []


def test_https_and_svcb_of_covered_names_are_empty() -> None:
    for qtype in (64, 65):
        screened = screen_query(query("www.allowed.test", qtype), POLICY)
        assert screened.action == "empty"
        assert screened.reply is not None
        reply = dpkt.dns.DNS(screened.reply)
        assert reply.rcode == 0 and reply.an == [] and reply.qd[0].type == qtype
    # Not covered: refused like any other type.
    assert screen_query(query("denied.test", 65), POLICY).action == "refused"


def test_unreadable_queries_are_refused_or_dropped() -> None:
    one = query("www.allowed.test")
    header = struct.unpack("!HHHHHH", one[:12])
    two_questions = struct.pack("!HHHHHH", header[0], header[1], 2, 0, 0, 0) + one[12:] * 1
    dotted = one[:12] + b"\x10www.allowed.test\x00\x00\x01\x00\x01"  # one label with dots
    for msg in (two_questions, dotted, one[:20], one[:12] + b"\xc0\x0c\x00\x01\x00\x01"):
        screened = screen_query(msg, POLICY)
        assert screened.action == "refused", msg
        assert screened.reply is not None and dpkt.dns.DNS(screened.reply).rcode == 5
    assert screen_query(b"\x12\x34\x01", POLICY).action == "dropped"


def test_read_answer_follows_the_cname_chain_with_the_smallest_ttl() -> None:
    msg = answer("Alias.Allowed.test", 1, [
        ("alias.allowed.test", 5, 300, "cdn.example.net"),
        ("cdn.example.net", 5, 120, "edge.example.net"),
        ("edge.example.net", 1, 600, bytes([192, 0, 2, 1])),
        ("edge.example.net", 1, 600, bytes([192, 0, 2, 2])),
        ("unrelated.example", 1, 600, bytes([192, 0, 2, 9])),  # not on the chain
    ])
    got = read_answer(msg)
    assert got is not None
    assert got.name == "alias.allowed.test" and got.qtype == 1 and got.rcode == 0
    assert got.addrs == (bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2]))
    assert got.ttl == 120
    assert got.addr_texts() == ("192.0.2.1", "192.0.2.2")


def test_read_answer_aaaa_nodata_and_refusals() -> None:
    v6 = bytes.fromhex("20010db8000000000000000000000010")
    got = read_answer(answer("www.allowed.test", 28, [("www.allowed.test", 28, 0, v6)]))
    assert got is not None and got.addrs == (v6,) and got.ttl == 0
    empty = read_answer(answer("www.allowed.test", 28, []))
    assert empty is not None and empty.addrs == () and empty.ttl == 0
    refused = read_answer(answer("x.test", 1, [], rcode=5))
    assert refused is not None and refused.rcode == 5 and refused.addrs == ()


def test_read_answer_refuses_what_it_cannot_name() -> None:
    good = answer("www.allowed.test", 1, [("www.allowed.test", 1, 5, bytes(4))])
    assert read_answer(query("www.allowed.test")) is None  # a query, not an answer
    assert read_answer(good[:11]) is None
    # A question whose one label holds dots: dpkt would read it as www.allowed.test.
    dotted = good[:12] + b"\x10www.allowed.test\x00" + good[12 + 18:]
    assert read_answer(dotted) is None
    # A label that is no UTF-8 in the answer: dpkt raises UnicodeDecodeError.
    bad_owner = good[:34] + b"\x02\xff\xfe\x00" + good[36:]
    assert read_answer(bad_owner) is None


def test_a_cname_loop_ends() -> None:
    msg = answer("a.allowed.test", 1, [("a.allowed.test", 5, 60, "b.allowed.test"),
                                       ("b.allowed.test", 5, 60, "a.allowed.test")])
    got = read_answer(msg)
    assert got is not None and got.addrs == ()


def test_type_names() -> None:
    assert [type_name(t) for t in (1, 28, 65, 64, 99)] == ["A", "AAAA", "HTTPS", "SVCB", "99"]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_are_screened_and_read_without_raising(data: bytes) -> None:
    screened = screen_query(data, POLICY)
    assert screened.action in ("forwarded", "refused", "empty", "dropped")
    if screened.action == "forwarded":
        assert POLICY.allows_name(screened.name)
    read_answer(data)


def test_the_memo_answers_each_query_with_its_own_id() -> None:
    dns_filter = DnsFilter(POLICY)
    for ident in (1, 2, 0xFFFF):
        for name, action in (("denied.test", "refused"), ("www.allowed.test", "forwarded")):
            screened = dns_filter.screen(query(name, ident=ident))
            assert screened.action == action
            if screened.reply is not None:
                assert dpkt.dns.DNS(screened.reply).id == ident
        empty = dns_filter.screen(query("www.allowed.test", 65, ident=ident))
        assert empty.reply is not None and dpkt.dns.DNS(empty.reply).id == ident
    msg = answer("www.allowed.test", 1, [("www.allowed.test", 1, 5, bytes([192, 0, 2, 1]))])
    assert dns_filter.read(msg) == dns_filter.read(b"\xaa\xbb" + msg[2:]) == read_answer(msg)
    for i in range(MEMO_SIZE + 5):  # bounded: it starts over
        dns_filter.screen(query(f"n{i}.allowed.test"))
    assert dns_filter.screen(query("denied.test", ident=9)).action == "refused"
