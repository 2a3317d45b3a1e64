"""DNS at the guest's DNS address: forwarded to a resolver on host loopback (one this test
starts, tests/support/dns_peer.py, on 127.0.0.53:53 of the test's private network namespace),
static records answered by the relay, and a namespace guest that resolves through
the relay out of the box (its /etc/resolv.conf is bind-mounted to name 10.0.2.3).
The pure parts of link/dns.py: tests/unit/test_dns_answers.py.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from support import SUPPORT
from support.relaynat_cli import parse_stats, relaynat_run

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
