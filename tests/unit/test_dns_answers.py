"""link/dns.py's pure parts: static answers checked against dpkt.dns (hypothesis feeds
mutated queries, which must never raise and whose answers must parse), and the upstream
read from a resolv.conf.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import dpkt
from hypothesis import given, settings
from hypothesis import strategies as st

from relaynat.link.dns import answer_static, static_table, upstream_from_resolv_conf

TABLE = static_table([("static.test", "192.0.2.77"), ("Mixed.Case.Test.", "198.51.100.1")])


def _query(name: str, qtype: int = dpkt.dns.DNS_A, ident: int = 0x1234) -> bytes:
    q = dpkt.dns.DNS(id=ident, rd=1)
    q.qd = [dpkt.dns.DNS.Q(name=name, type=qtype, cls=dpkt.dns.DNS_IN)]
    return bytes(q)


def test_static_a_answer_parses_and_echoes_id_and_question() -> None:
    answer = answer_static(_query("mixed.case.TEST", ident=777), TABLE)
    assert answer is not None
    msg = dpkt.dns.DNS(answer)
    assert msg.id == 777 and msg.qr == dpkt.dns.DNS_R and msg.rcode == 0 and msg.aa and msg.rd
    assert [q.name for q in msg.qd] == ["mixed.case.TEST"]
    assert [(rr.type, IPv4Address(rr.rdata)) for rr in msg.an] == [
        (dpkt.dns.DNS_A, IPv4Address("198.51.100.1"))]


def test_static_aaaa_answers_every_address_of_the_name_and_a_only_the_ipv4_ones() -> None:
    table = static_table([("dual.test", "192.0.2.1"), ("dual.test", "fd00::99"),
                          ("dual.test", "2001:db8::7"), ("v6only.test", "fd00::5")])
    msg = dpkt.dns.DNS(answer_static(_query("dual.test", dpkt.dns.DNS_AAAA), table))
    assert [(rr.type, IPv6Address(rr.rdata)) for rr in msg.an] == [
        (dpkt.dns.DNS_AAAA, IPv6Address("fd00::99")),
        (dpkt.dns.DNS_AAAA, IPv6Address("2001:db8::7"))]
    msg = dpkt.dns.DNS(answer_static(_query("dual.test"), table))
    assert [IPv4Address(rr.rdata) for rr in msg.an] == [IPv4Address("192.0.2.1")]
    msg = dpkt.dns.DNS(answer_static(_query("v6only.test"), table))
    assert msg.rcode == 0 and msg.an == []


def test_other_types_of_a_static_name_get_nodata_and_other_names_are_forwarded() -> None:
    answer = answer_static(_query("static.test", dpkt.dns.DNS_AAAA), TABLE)
    assert answer is not None
    msg = dpkt.dns.DNS(answer)
    assert msg.rcode == 0 and msg.an == [] and msg.qd[0].type == dpkt.dns.DNS_AAAA
    assert answer_static(_query("other.test"), TABLE) is None
    assert answer_static(_query("test"), TABLE) is None


def test_malformed_queries_are_not_answered() -> None:
    good = _query("static.test")
    assert answer_static(good[:20], TABLE) is None  # truncated name
    assert answer_static(good[:-1], TABLE) is None  # truncated class
    response = bytearray(good)
    response[2] |= 0x80
    assert answer_static(bytes(response), TABLE) is None  # QR set: not a query
    two = bytearray(good)
    struct.pack_into("!H", two, 4, 2)
    assert answer_static(bytes(two), TABLE) is None  # QDCOUNT 2
    dotted = good[:12] + b"\x0bstatic.test\x00" + good[-4:]  # one label holding a dot
    assert answer_static(dotted, TABLE) is None


@st.composite
def _mutated_queries(draw: st.DrawFn) -> bytes:
    base = bytearray(_query(draw(st.sampled_from(["static.test", "mixed.case.test", "x.y"])),
                            draw(st.sampled_from([1, 28, 15, 255])),
                            draw(st.integers(0, 0xFFFF))))
    for _ in range(draw(st.integers(0, 3))):
        pos = draw(st.integers(0, len(base) - 1))
        base[pos] = draw(st.integers(0, 255))
    return bytes(base[:draw(st.integers(0, len(base) + 4))]) + draw(st.binary(max_size=8))


@settings(max_examples=1500, deadline=None)
@given(st.one_of(st.binary(max_size=300), _mutated_queries()))
def test_answer_static_never_raises_and_answers_parse(data: bytes) -> None:
    answer = answer_static(data, TABLE)
    if answer is None:
        return
    msg = dpkt.dns.DNS(answer)
    # The oracle reads only the query's header and question: the rest of a mutated
    # query (answer/authority/additional counts and records) may be garbage to dpkt.
    query = dpkt.dns.DNS(data[:4] + b"\x00\x01" + bytes(6) + data[12:])
    assert msg.id == query.id
    assert msg.qr == dpkt.dns.DNS_R
    assert [(q.name.lower(), q.type, q.cls) for q in msg.qd] == [
        (q.name.lower(), q.type, q.cls) for q in query.qd]
    assert len(msg.an) <= 1


def test_resolv_conf_first_nameserver_of_either_family(tmp_path: Path) -> None:
    text = ("# generated\nsearch example\nnameserver not-an-address\n"
            "nameserver 127.0.0.53\nnameserver 10.1.1.1\noptions edns0\n")
    assert upstream_from_resolv_conf(text) == IPv4Address("127.0.0.53")
    assert upstream_from_resolv_conf("nameserver ::1\nnameserver 127.0.0.53\n") == \
        IPv6Address("::1")
    assert upstream_from_resolv_conf("search x\n") is None
    path = tmp_path / "resolv.conf"
    path.write_text(text)
    from relaynat.link.dns import host_upstream

    assert host_upstream(str(path)) == IPv4Address("127.0.0.53")
    assert host_upstream(str(tmp_path / "missing")) is None
