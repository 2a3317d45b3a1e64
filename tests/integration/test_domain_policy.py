"""Domain rules end to end: a real dnsmasq as the relay's upstream resolver, HTTP servers
on the addresses it gives out, and `relaynat run` guests that resolve and connect with
curl, dig and Python. The pure parts (name matching, the table of answers, the policy
and the gate): tests/unit/test_domains.py; DNS screening and answers:
tests/unit/test_dns_filter.py.

The world lives in this test's private network namespace: a veth pair whose near end
holds the addresses (11.1.0.0/24, public as far as the policy knows, and the metadata
address), dnsmasq listening on one of them and answering only the names given here
(--no-resolv --no-hosts: it never asks anyone), and one HTTP server on all of them.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import string
import subprocess
import sys
import time
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path

import pytest
from support import GUESTS, SUPPORT
from support.relaynat_cli import guest_python, parse_stats, relaynat_run

from relaynat import Policy, RelayConfig
from relaynat.policy import Rule

DNSMASQ = "/usr/sbin/dnsmasq"
RESOLVER = "11.1.0.53"
WWW, DENIED, NEVER, OTHER = "11.1.0.2", "11.1.0.3", "11.1.0.4", "11.1.0.5"
METADATA = "169.254.169.254"
WWW6 = "2a00:1::2"  # global unicast: public to the policy
#: name -> address, as dnsmasq answers them (TTL 0: dnsmasq's default for its own names).
RECORDS = {
    "www.allowed.test": WWW,
    "never.allowed.test": NEVER,  # never resolved through the relay in the tests
    "rebind.allowed.test": METADATA,  # DNS rebinding to the metadata service
    "www.other.test": OTHER,
    "resolver.allowed.test": RESOLVER,
    "www6.allowed.test": WWW6,
}
ALLOW = ("--allow-domain", "*.allowed.test", "--dns-upstream", RESOLVER)

pytest_plugins = ["support.guest_fs"]


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=20)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The addresses, the HTTP server (port 80, every address) and dnsmasq; yields the
    path of dnsmasq's query log."""
    root = tmp_path_factory.mktemp("domain-world")
    (root / "hello").write_text("hello\n")
    subprocess.run(["ip", "link", "del", "rndns0"], capture_output=True)
    _sh("ip", "link", "add", "rndns0", "type", "veth", "peer", "name", "rndns1")
    _sh("ip", "addr", "add", "11.1.0.1/24", "dev", "rndns0")
    for addr in (WWW, DENIED, NEVER, OTHER, RESOLVER, METADATA):
        _sh("ip", "addr", "add", f"{addr}/32", "dev", "rndns0")
    _sh("ip", "-6", "addr", "add", f"{WWW6}/128", "dev", "rndns0", "nodad")
    _sh("ip", "link", "set", "rndns0", "up")
    _sh("ip", "link", "set", "rndns1", "up")
    port_file, port_file6 = root / "port", root / "port6"
    server = subprocess.Popen([sys.executable, str(SUPPORT / "host_peers.py"), "http",
                               "--root", str(root), "--bind", "0.0.0.0", "--port", "80",
                               "--port-file", str(port_file)])
    server6 = subprocess.Popen([sys.executable, str(SUPPORT / "host_peers.py"), "http",
                                "--root", str(root), "--bind", WWW6, "--port", "80",
                                "--port-file", str(port_file6)])
    log = root / "dnsmasq.log"
    dnsmasq = subprocess.Popen([
        DNSMASQ, "-k", "--no-resolv", "--no-hosts", f"--listen-address={RESOLVER}",
        "--bind-interfaces", "--port=53", "--user=root", "--pid-file=", "--log-queries",
        f"--log-facility={log}", "--address=/denied.test/" + DENIED,
        *(f"--host-record={name},{addr}" for name, addr in RECORDS.items()),
        "--cname=alias.allowed.test,www.other.test"])
    try:
        deadline = time.monotonic() + 10
        while not (port_file.exists() and port_file6.exists() and log.exists()
                   and "started" in log.read_text()):
            assert time.monotonic() < deadline, "HTTP servers or dnsmasq did not start"
            assert server.poll() is None and server6.poll() is None and dnsmasq.poll() is None
            time.sleep(0.05)
        yield log
    finally:
        for proc in (server, server6, dnsmasq):
            proc.kill()
            proc.wait()
        subprocess.run(["ip", "link", "del", "rndns0"], capture_output=True)


def _queries(log: Path, name: str) -> int:
    """How many queries for `name` (or names below it) dnsmasq logged."""
    pattern = re.compile(rf"query\[\w+\] (\S+\.)?{re.escape(name)} from")
    return sum(1 for line in log.read_text().splitlines() if pattern.search(line))


def _curl(url: str, *extra: str) -> str:
    """A guest shell line printing the HTTP code, or "failed" and curl's exit code."""
    return (f"code=$(curl -sS -m 5 -o /dev/null -w '%{{http_code}}' {' '.join(extra)} {url})"
            f" && echo \"$code\" || echo \"failed $?\"")


def test_allowed_name_is_reached_and_a_denied_one_refused_and_reset(world: Path) -> None:
    before = _queries(world, "denied.test")
    start = time.monotonic()
    done = relaynat_run("sh", "-c", "; ".join([
        _curl("http://www.allowed.test/hello"),
        "dig @10.0.2.3 +tries=1 +time=2 denied.test A | grep -o 'status: [A-Z]*'",
        # curl exit 7: could not connect (the relay's RST: ECONNREFUSED)
        _curl(f"http://{DENIED}/hello"),
        _curl("http://denied.test/hello", "--resolve", f"denied.test:80:{DENIED}"),
    ]), options=ALLOW)
    assert done.stdout.splitlines() == ["200", "status: REFUSED", "failed 7", "failed 7"], (
        done.stdout + done.stderr)
    assert time.monotonic() - start < 20  # refused at once, nothing waited for a timeout
    assert _queries(world, "denied.test") == before  # never forwarded
    assert _queries(world, "www.allowed.test") >= 1
    stats = parse_stats(done.stderr)
    assert stats["dns_refused"] >= 1
    assert stats["policy_denied_default"] == 2
    assert stats["dns_addresses_learned"] >= 1


def test_a_covered_name_resolving_to_the_metadata_address_is_denied(world: Path) -> None:
    done = relaynat_run("sh", "-c", "; ".join([
        "dig @10.0.2.3 +short +tries=1 rebind.allowed.test A",
        _curl("http://rebind.allowed.test/hello"),
    ]), options=ALLOW)
    # The name is allowed and answered; the deny metadata rule (rule 1) comes first.
    assert done.stdout.splitlines() == [METADATA, "failed 7"], done.stdout + done.stderr
    stats = parse_stats(done.stderr)
    assert stats["policy_denied_rule1"] == 1


def test_an_allowed_names_address_never_resolved_through_the_relay_is_reset(
        world: Path) -> None:
    resolve = ("--resolve", f"never.allowed.test:80:{NEVER}")
    done = relaynat_run("sh", "-c", "; ".join([
        _curl("http://never.allowed.test/hello", *resolve),
        # Resolved through the relay now: the same connect is allowed.
        "getent hosts never.allowed.test | cut -d' ' -f1",
        _curl("http://never.allowed.test/hello", *resolve),
    ]), options=ALLOW)
    assert done.stdout.splitlines() == ["failed 7", NEVER, "200"], done.stdout + done.stderr


def test_aaaa_answers_admit_ipv6_flows(world: Path) -> None:
    done = relaynat_run("sh", "-c", "; ".join([
        _curl(f"http://[{WWW6}]/hello", "-g"),  # never resolved: reset
        "getent ahostsv6 www6.allowed.test | head -1 | cut -d' ' -f1",
        _curl("http://www6.allowed.test/hello"),
    ]), options=ALLOW)
    assert done.stdout.splitlines() == ["failed 7", WWW6, "200"], done.stdout + done.stderr


def test_a_thousand_random_labels_under_a_denied_zone_never_reach_the_resolver(
        world: Path) -> None:
    rng = random.Random(21)
    names = ["".join(rng.choices(string.ascii_lowercase + string.digits, k=30))
             + ".exfil.denied.test" for _ in range(1000)]
    before = _queries(world, "denied.test")
    done = relaynat_run("sh", "-c", "dig @10.0.2.3 +tries=1 +time=2 \"$@\" "
                                    "| grep -c 'status: REFUSED'; "
                        "dig @10.0.2.3 +short +tries=1 www.allowed.test A", "sh", *names,
                        options=ALLOW)
    assert done.stdout.splitlines() == ["1000", WWW], done.stdout + done.stderr[-2000:]
    assert _queries(world, "denied.test") == before
    stats = parse_stats(done.stderr)
    assert stats["dns_refused"] == 1000
    assert stats["dns_forwarded_udp"] == 1


def test_https_records_of_allowed_names_are_empty_and_other_types_forwarded(
        world: Path) -> None:
    done = relaynat_run("sh", "-c", "; ".join([
        "dig @10.0.2.3 +tries=1 www.allowed.test HTTPS | grep -oE 'status: [A-Z]+|ANSWER: [0-9]+'",
        "dig @10.0.2.3 +tcp +tries=1 denied.test A | grep -o 'status: [A-Z]*'",
        "dig @10.0.2.3 +tcp +short +tries=1 alias.allowed.test A",
    ]), options=ALLOW)
    # HTTPS: NOERROR, no answer (dnsmasq itself would say REFUSED); over TCP the same
    # screening; a CNAME out of the allowed zone is passed on unchanged.
    assert done.stdout.splitlines() == ["status: NOERROR", "ANSWER: 0", "status: REFUSED",
                                        "www.other.test.", OTHER], done.stdout + done.stderr
    stats = parse_stats(done.stderr)
    assert stats["dns_empty"] == 1 and stats["dns_refused"] == 1
    assert stats["dns_tcp_forwarded"] == 1


def test_an_alias_is_learned_for_the_name_asked(world: Path) -> None:
    done = relaynat_run("sh", "-c", _curl("http://alias.allowed.test/hello"), options=ALLOW)
    # alias.allowed.test is a CNAME for www.other.test: its address is learned for the
    # name the guest asked, which the rule covers.
    assert done.stdout.splitlines() == ["200"], done.stdout + done.stderr


async def test_a_policy_replaced_with_cut_ends_flows_whose_name_it_denies(
        world: Path, guest_dir: Path) -> None:
    from relaynat.netns.guest import run_command
    from relaynat.relay import Relay

    ready, cut_file, out = guest_dir / "ready", guest_dir / "cut", guest_dir / "out"
    relays: list[Relay] = []
    config = RelayConfig(dns_upstream=ip_address(RESOLVER))

    def allowing(*names: str) -> Policy:
        # Port 80 without the first flight's name checked (inspect_ports empty): the
        # guest holds its connection without sending a request.
        return Policy([Rule("allow", "udp", ("dns",), ((53, 53),)),
                       Rule("allow", "tcp", (), ((80, 80),), "", names, ())], "deny", config)

    guest = asyncio.ensure_future(run_command(
        config, ["sh", "-c", f"exec {guest_python()} {GUESTS / 'tcp_hold_until_cut.py'} "
                             f"www.allowed.test 80 {ready} {cut_file} > {out}"],
        policy=allowing("*.allowed.test"), relay_ready=relays.append))
    try:
        for _ in range(400):
            if ready.exists():
                break
            assert not guest.done(), guest
            await asyncio.sleep(0.05)
        relay = relays[0]
        names = relay.learned_names()
        assert {(n["name"], n["addr"], n["flows"]) for n in names} >= {
            ("www.allowed.test", WWW, 1)}
        # Still covered: nothing ends.
        assert relay.set_policy(allowing("www.allowed.test", "x.test"), cut=True) == 0
        assert relay.set_policy(allowing("*.other.test"), cut=True) == 1
        assert relay.stats()["policy_cut_tcp"] == 1
        cut_file.touch()
        assert await asyncio.wait_for(guest, 30) == 0
    finally:
        guest.cancel()
    lines = out.read_text().splitlines()
    assert lines[0] == "open: reset"
    assert lines[1].startswith("new: ") and lines[1] != "new: ok", lines


def test_ctl_names_lists_what_the_guest_resolved(world: Path, tmp_path: Path) -> None:
    ctl_sock = tmp_path / "ctl.sock"
    proc = subprocess.Popen([sys.executable, "-m", "relaynat", "run", *ALLOW,
                             "--control-socket", str(ctl_sock), "--", "sh", "-c",
                             "getent hosts www.allowed.test; exec sleep 5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().split() == [WWW, "www.allowed.test"]
        listed = subprocess.run([sys.executable, "-m", "relaynat", "ctl", "--socket",
                                 str(ctl_sock), "names"], capture_output=True, text=True,
                                timeout=30)
    finally:
        proc.kill()
        proc.communicate()
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["NAME", "ADDRESS", "TTL", "LEFT", "s", "FLOWS"]
    # dnsmasq's TTL 0, raised to the 10 s floor; no flow open to it.
    name, addr, ttl, flows = lines[1].split()
    assert (name, addr, flows) == ("www.allowed.test", WWW, "0") and 0 < float(ttl) <= 10
    assert len(lines) == 2


def test_udp_and_icmp_flows_match_domain_rules_too(world: Path, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('default = "deny"\n'
                      '[[rule]]\naction = "allow"\nproto = "icmp"\n'
                      'domains = "www.allowed.test"\n'
                      '[[rule]]\naction = "allow"\nproto = "udp"\nports = "53"\n'
                      'domains = "resolver.allowed.test"\n')
    done = relaynat_run("sh", "-c", "; ".join([
        # Before any answer for them, the addresses match no rule.
        f"ping -c 1 -W 2 {WWW} >/dev/null && echo ping ok || echo ping failed",
        f"dig @{RESOLVER} +short +tries=1 +time=2 www.other.test A >/dev/null 2>&1 "
        "&& echo dig ok || echo dig failed",
        "getent hosts www.allowed.test resolver.allowed.test >/dev/null",
        f"ping -c 1 -W 2 {WWW} >/dev/null && echo ping ok || echo ping failed",
        f"dig @{RESOLVER} +short +tries=1 +time=2 www.other.test A",
        # Another name's address stays refused.
        f"ping -c 1 -W 2 {OTHER} >/dev/null && echo ping ok || echo ping failed",
    ]), options=("--policy", str(policy), "--dns-upstream", RESOLVER,
                 "--audit", str(tmp_path / "audit.jsonl")))
    assert done.stdout.splitlines() == ["ping failed", "dig failed", "ping ok", OTHER,
                                        "ping failed"], done.stdout + done.stderr
    stats = parse_stats(done.stderr)
    assert stats["policy_denied_default"] == 3
    # The audit trail's decision records name the rule and the names, for UDP and ICMP
    # as for TCP.
    records = [json.loads(line) for line in
               (tmp_path / "audit.jsonl").read_text().splitlines()]
    opened = {(r["protocol"], r["far"][0], tuple(r["names"]), r["rule"]) for r in records
              if r["kind"] == "flow_opened" and r["far"][0] in (WWW, RESOLVER)}
    assert opened == {("icmp", WWW, ("www.allowed.test",), 0),
                      ("udp", RESOLVER, ("resolver.allowed.test",), 1)}, records


async def test_each_query_is_a_dns_query_event(world: Path) -> None:
    from relaynat.events import DnsQuery, Event
    from relaynat.netns.guest import run_command
    from relaynat.relay import Relay

    events: list[Event] = []

    def ready(relay: Relay) -> None:
        relay.subscribe(events.append)

    config = RelayConfig(dns_upstream=ip_address(RESOLVER))
    status = await run_command(config, ["sh", "-c", "; ".join([
        "dig @10.0.2.3 +short +tries=1 alias.allowed.test A",
        "dig @10.0.2.3 +short +tries=1 denied.test A",
        "dig @10.0.2.3 +short +tries=1 +tcp www.allowed.test HTTPS",
        "dig @10.0.2.3 +short +tries=1 +tcp www.allowed.test AAAA",
    ])], policy=Policy.allow_domains(["*.allowed.test"], config), relay_ready=ready,
        stdout=subprocess.DEVNULL)
    assert status == 0
    queries = [(e.name, e.qtype, e.answers, e.action) for e in events
               if isinstance(e, DnsQuery)]
    assert queries == [("alias.allowed.test", "A", (OTHER,), "forwarded"),
                       ("denied.test", "A", (), "refused"),
                       ("www.allowed.test", "HTTPS", (), "empty"),
                       ("www.allowed.test", "AAAA", (), "forwarded")]
