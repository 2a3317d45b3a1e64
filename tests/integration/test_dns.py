"""DNS at the guest's DNS address: forwarded to a resolver on host loopback (one this test
starts, tests/support/dns_peer.py, on 127.0.0.53:53 of the test's private network namespace),
static records answered by the relay, and a namespace guest that resolves through
the relay out of the box (its /etc/resolv.conf is bind-mounted to name 10.0.2.3).
The pure parts of link/dns.py are checked against dpkt.dns with hypothesis.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import SUPPORT
from support.relaynat_cli import parse_stats, relaynat_run

from relaynat.link.dns import answer_static, static_table, upstream_from_resolv_conf

UPSTREAM = "127.0.0.53"
UPSTREAM_NAME, UPSTREAM_ADDR = "upstream.test", "192.0.2.10"
STATIC_NAME, STATIC_ADDR = "static.test", "192.0.2.77"
DNS_OPTS = ("--dns-upstream", UPSTREAM, "--dns-record", f"{STATIC_NAME}={STATIC_ADDR}")


@pytest.fixture
def resolver(tmp_path: Path) -> Iterator[Path]:
    """The host's resolver; yields the path of its query log ("udp|tcp NAME TYPE")."""
    ready = tmp_path / "dns-ready"
    proc = subprocess.Popen([sys.executable, str(SUPPORT / "dns_peer.py"), "--addr", UPSTREAM,
                             "--record", f"{UPSTREAM_NAME}={UPSTREAM_ADDR}",
                             "--ready-file", str(ready)])
    deadline = time.monotonic() + 10
    while not ready.exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError("dns_peer did not start")
        time.sleep(0.02)
    log = Path(str(ready) + ".log")
    log.touch()
    yield log
    proc.kill()
    proc.wait()


@pytest.mark.integration
@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_dig_through_the_forwarder(resolver: Path, proto: str) -> None:
    flags = ["+tcp"] if proto == "tcp" else []
    done = relaynat_run("dig", "@10.0.2.3", "+short", "+tries=1", "+time=3", *flags,
                        UPSTREAM_NAME, "A", options=DNS_OPTS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == UPSTREAM_ADDR
    assert f"{proto} {UPSTREAM_NAME} 1" in resolver.read_text().splitlines()
    stats = parse_stats(done.stderr)
    if proto == "udp":
        assert stats["dns_forwarded_udp"] >= 1
    else:
        assert stats["tcp_flows_opened"] == 1


@pytest.mark.integration
@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_dig_over_ipv6_to_the_forwarder_reaches_the_ipv4_resolver(resolver: Path,
                                                                  proto: str) -> None:
    flags = ["+tcp"] if proto == "tcp" else []
    done = relaynat_run("dig", "@fd00::3", "+short", "+tries=1", "+time=3", *flags,
                        UPSTREAM_NAME, "A", options=DNS_OPTS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == UPSTREAM_ADDR
    assert f"{proto} {UPSTREAM_NAME} 1" in resolver.read_text().splitlines()


@pytest.mark.integration
def test_static_records_over_tcp_with_several_queries_on_one_connection(
        resolver: Path) -> None:
    # dig +keepopen sends its queries over one TCP connection (RFC 7766 §6.2.1): a
    # static one answered by the relay, a forwarded one, then the static one again.
    done = relaynat_run("dig", "@10.0.2.3", "+tcp", "+keepopen", "+short", "+tries=1",
                        STATIC_NAME, "A", UPSTREAM_NAME, "A", STATIC_NAME, "A",
                        options=DNS_OPTS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.split() == [STATIC_ADDR, UPSTREAM_ADDR, STATIC_ADDR]
    assert resolver.read_text().splitlines() == [f"tcp {UPSTREAM_NAME} 1"]
    stats = parse_stats(done.stderr)
    assert stats["dns_tcp_static"] == 2 and stats["dns_tcp_forwarded"] == 1
    assert stats["tcp_flows_opened"] == 1


@pytest.mark.integration
def test_static_aaaa_record_over_ipv6(resolver: Path) -> None:
    options = (*DNS_OPTS, "--dns-record", f"{STATIC_NAME}=fd00::77")
    done = relaynat_run("sh", "-c", f"dig @fd00::3 +short +tries=1 {STATIC_NAME} AAAA; "
                                    f"getent ahostsv6 {STATIC_NAME} | head -1",
                        options=options)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "fd00::77"
    assert lines[1].split()[0] == "fd00::77"
    assert resolver.read_text() == ""


@pytest.mark.integration
def test_static_record_is_answered_by_the_relay(resolver: Path) -> None:
    done = relaynat_run("sh", "-c", f"dig @10.0.2.3 +short +tries=1 {STATIC_NAME} A; "
                                    f"dig @10.0.2.3 +tries=1 {STATIC_NAME} AAAA",
                        options=DNS_OPTS)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == STATIC_ADDR
    # AAAA of a static name: NOERROR without answers (NODATA), not NXDOMAIN.
    assert "status: NOERROR" in done.stdout and "ANSWER: 0" in done.stdout
    assert resolver.read_text() == ""  # never went upstream
    assert parse_stats(done.stderr)["dns_static_answers"] == 2


@pytest.mark.integration
def test_getent_in_the_namespace_resolves_through_the_relay(resolver: Path) -> None:
    done = relaynat_run("sh", "-c", "grep nameserver /etc/resolv.conf; "
                                    f"getent hosts {UPSTREAM_NAME}; getent hosts {STATIC_NAME}",
                        options=DNS_OPTS)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line.split() for line in done.stdout.splitlines()]
    assert lines[0] == ["nameserver", "10.0.2.3"]
    assert lines[1] == ["nameserver", "fd00::3"]
    assert lines[2] == [UPSTREAM_ADDR, UPSTREAM_NAME]
    assert lines[3] == [STATIC_ADDR, STATIC_NAME]
    assert any(line.startswith(f"udp {UPSTREAM_NAME}") for line in
               resolver.read_text().splitlines())
    # The bind mount lives only in the guest's mount namespace.
    assert "10.0.2.3" not in Path("/etc/resolv.conf").read_text()


# -- the pure parts ------------------------------------------------------------------------

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


@pytest.mark.integration
def test_forwarded_query_flows_expire_fast(resolver: Path) -> None:
    import asyncio

    from relaynat.config import RelayConfig
    from relaynat.netns.guest import run_command

    holder: list = []
    config = RelayConfig(dns_upstream=IPv4Address(UPSTREAM), dns_udp_timeout_s=0.5)
    script = f"dig @10.0.2.3 +short +tries=1 {UPSTREAM_NAME} && sleep 2"
    code = asyncio.run(run_command(config, ["sh", "-c", script], relay_ready=holder.append))
    assert code == 0
    stats = holder[0].stats()
    assert stats["udp_flows_opened"] == 1 and stats["udp_flows_expired"] == 1
