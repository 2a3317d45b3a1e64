"""Names on the wire: TCP flows a domain rule allows on its inspected ports (80, 443)
must carry, in their first flight, a TLS SNI or HTTP Host the rule covers and that the
destination was learned for; the audit trail records each decision. Real clients
(curl, openssl s_client, bash's /dev/tcp) in `relaynat run` guests, real servers
(openssl s_server with one certificate for several names on one address: a shared
CDN; an HTTP server), dnsmasq as the relay's upstream resolver. The parsing and the
decision's pure part: tests/unit/test_first_flight.py.

The world lives in this test's private network namespace: a veth end holding the
addresses (11.2.0.0/24, public as far as the policy knows), dnsmasq on one of them
answering only the names given here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import GUESTS, SUPPORT
from support.relaynat_cli import guest_python, parse_stats, relaynat_run
from unit.test_first_flight import ext, hello_message, records

DNSMASQ = "/usr/sbin/dnsmasq"
RESOLVER = "11.2.0.53"
CDN = "11.2.0.2"  # one address, several names: www and cdn allowed, www.other not
RECORDS = {"www.allowed.test": CDN, "cdn.allowed.test": CDN, "www.other.test": CDN}
OPTIONS = ("--allow-domain", "*.allowed.test", "--dns-upstream", RESOLVER,
           "--first-flight-timeout", "2")


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=20)


@pytest.fixture(scope="module")
def world() -> Iterator[Path]:
    """The address, an HTTPS server (openssl s_server, port 443) with a certificate for
    every name of `RECORDS`, an HTTP server (port 80) and dnsmasq; yields a directory the
    guest can read (the certificate is `cert.pem` there)."""
    root = Path(tempfile.mkdtemp(prefix="relaynat-wire-"))
    root.chmod(0o755)  # the guest's command runs as nobody
    (root / "hello").write_text("hello\n")
    _sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", str(root / "key.pem"), "-out", str(root / "cert.pem"), "-days", "1",
        "-subj", "/CN=www.allowed.test",
        "-addext", "subjectAltName=" + ",".join(f"DNS:{n}" for n in RECORDS))
    (root / "cert.pem").chmod(0o644)
    subprocess.run(["ip", "link", "del", "rnwire0"], capture_output=True)
    _sh("ip", "link", "add", "rnwire0", "type", "veth", "peer", "name", "rnwire1")
    _sh("ip", "addr", "add", "11.2.0.1/24", "dev", "rnwire0")
    for addr in (CDN, RESOLVER):
        _sh("ip", "addr", "add", f"{addr}/32", "dev", "rnwire0")
    _sh("ip", "link", "set", "rnwire0", "up")
    _sh("ip", "link", "set", "rnwire1", "up")
    port_file = root / "port"
    http = subprocess.Popen([sys.executable, str(SUPPORT / "host_peers.py"), "http",
                             "--root", str(root), "--bind", CDN, "--port", "80",
                             "--port-file", str(port_file)])
    https = subprocess.Popen(["openssl", "s_server", "-quiet", "-accept", f"{CDN}:443",
                              "-cert", str(root / "cert.pem"), "-key", str(root / "key.pem"),
                              "-www"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    log = root / "dnsmasq.log"
    dnsmasq = subprocess.Popen([
        DNSMASQ, "-k", "--no-resolv", "--no-hosts", f"--listen-address={RESOLVER}",
        "--bind-interfaces", "--port=53", "--user=root", "--pid-file=", "--log-queries",
        f"--log-facility={log}", *(f"--host-record={n},{a}" for n, a in RECORDS.items())])
    try:
        deadline = time.monotonic() + 10
        while not (port_file.exists() and log.exists() and "started" in log.read_text()):
            assert time.monotonic() < deadline, "a server or dnsmasq did not start"
            assert http.poll() is None and https.poll() is None and dnsmasq.poll() is None
            time.sleep(0.05)
        yield root
    finally:
        for proc in (http, https, dnsmasq):
            proc.kill()
            proc.wait()
        subprocess.run(["ip", "link", "del", "rnwire0"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _curl(url: str, *extra: str) -> str:
    """A guest shell line printing the HTTP code, or "failed" and curl's exit code."""
    return (f"code=$(curl -sS -m 5 -o /dev/null -w '%{{http_code}}' {' '.join(extra)} {url})"
            f" && echo \"$code\" || echo \"failed $?\"")


def _s_client(*extra: str) -> str:
    """A guest shell line: a TLS handshake with the CDN address; "handshake" if it
    completed, else "reset"."""
    return (f"echo | openssl s_client -connect {CDN}:443 {' '.join(extra)} 2>&1 "
            "| grep -q 'BEGIN CERTIFICATE' && echo handshake || echo reset")


def _records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_names_on_the_wire_are_checked_and_audited(world: Path) -> None:
    audit = world / "audit.jsonl"
    cacert = f"--cacert {world / 'cert.pem'}"
    done = relaynat_run("bash", "-c", "; ".join([
        _curl("https://www.allowed.test/", cacert),
        _curl("https://cdn.allowed.test/", cacert),  # a second name for the same address
        "getent hosts www.allowed.test > /dev/null",
        # The address was learned for allowed names; the name on the wire is not one.
        _s_client("-servername", "www.other.test"),
        # Covered by the rule, but never resolved: not learned for it.
        _s_client("-servername", "never.allowed.test"),
        _s_client("-noservername"),  # no SNI (no ECH either)
        _s_client("-servername", "www.allowed.test"),
        _curl("http://www.allowed.test/hello"),
        _curl("http://www.allowed.test/hello", "-H", "'Host: www.other.test'"),
        # A guest that sends nothing: reset after --first-flight-timeout (2 s).
        "start=$(date +%s.%N); exec 3<>/dev/tcp/www.allowed.test/443; "
        "timeout 8 cat <&3 > /dev/null 2>&1; "
        "echo \"silent $(echo \"$(date +%s.%N) - $start\" | bc)\"",
    ]), options=(*OPTIONS, "--audit", str(audit)))
    lines = done.stdout.splitlines()
    assert lines[:8] == ["200", "200", "reset", "reset", "reset", "handshake", "200",
                         "failed 56"], done.stdout + done.stderr[-3000:]
    waited = float(lines[8].split()[1])
    assert 1.5 < waited < 6, lines[8]
    stats = parse_stats(done.stderr)
    assert stats["policy_denied_name_mismatch"] == 3, stats  # two SNIs, one Host
    assert stats["policy_denied_no_sni"] == 1
    assert stats["policy_denied_first_flight_timeout"] == 1
    assert stats["tcp_first_flights"] == 9
    assert stats["tcp_first_flights_denied"] == 5
    assert stats["tcp_first_flight_bytes"] == 0
    assert stats.get("audit_dropped", 0) == 0

    records = _records(audit)
    opened = [r for r in records if r["kind"] == "flow_opened"]
    denied = [r for r in records if r["kind"] == "flow_denied"]
    closed = [r for r in records if r["kind"] == "flow_closed"]
    wire_opened = [r for r in opened if r["wire_name"] is not None]
    assert sorted(str(r["wire_name"]) for r in wire_opened) == [
        "cdn.allowed.test", "www.allowed.test", "www.allowed.test", "www.allowed.test"]
    for r in wire_opened:
        assert r["far"] in ([CDN, 443], [CDN, 80])
        names = r["names"]
        assert isinstance(names, list) and r["wire_name"] in names
        assert set(names) <= {"www.allowed.test", "cdn.allowed.test"}
        assert r["rule"] == 5 and r["comment"], r
    assert sorted((str(r["reason"]), str(r["wire_name"])) for r in denied) == sorted([
        ("name_mismatch", "www.other.test"), ("name_mismatch", "never.allowed.test"),
        ("name_mismatch", "www.other.test"), ("no_sni", "None"),
        ("first_flight_timeout", "None")])
    # Every opened flow ended, with its bytes.
    assert len(closed) == len(opened)
    assert all(int(str(r["bytes_to_guest"])) > 0 for r in closed if r["far"][1] == 443)
    queries = [r for r in records if r["kind"] == "dns_query"]
    assert {"www.allowed.test", "cdn.allowed.test"} <= {str(r["name"]) for r in queries}
    assert os.stat(audit).st_size > 0


def test_split_hellos_fins_ech_and_oversized_first_flights(world: Path) -> None:
    """A ClientHello in four segments 0.2 s apart passes; a request followed at once by
    the guest's FIN gets its answer (the FIN reaches the server after the held bytes);
    a hello with Encrypted Client Hello and no outer SNI, and 16 KiB without a name,
    are reset."""
    client = f"{guest_python()} {GUESTS / 'first_flight_client.py'}"
    ech_hello = records(hello_message(ext(0xFE0D, b"\x00" + bytes(64)) + ext(10, b"\x00\x02"
                                                                          b"\x00\x1d")))
    request = b"GET /hello HTTP/1.0\r\nHost: www.allowed.test\r\n\r\n"
    too_big = b"GET /hello HTTP/1.1\r\nX-Pad: " + b"a" * (17 << 10)
    done = relaynat_run("sh", "-c", "; ".join([
        "getent hosts www.allowed.test > /dev/null",
        f"{client} tls www.allowed.test 443 www.allowed.test 4 0.2 {world / 'cert.pem'}",
        f"{client} tls www.allowed.test 443 www.other.test 4 0.2 {world / 'cert.pem'}",
        f"{client} raw-fin www.allowed.test 80 {request.hex()}",
        f"{client} raw www.allowed.test 443 {ech_hello.hex()}",
        f"{client} raw www.allowed.test 80 {too_big.hex()}",
    ]), options=OPTIONS)
    assert done.stdout.splitlines() == ["handshake", "reset", "answer", "reset", "reset"], (
        done.stdout + done.stderr[-3000:])
    stats = parse_stats(done.stderr)
    assert stats["policy_denied_name_mismatch"] == 1, stats
    assert stats["policy_denied_ech"] == 1
    assert stats["policy_denied_first_flight_too_big"] == 1
    assert stats["tcp_first_flight_bytes"] == 0


def test_ctl_watch_streams_the_decisions(world: Path, tmp_path: Path) -> None:
    """`relaynat ctl watch` prints each event as a JSON line while the relay runs: the
    DNS query, the flow opened with its SNI, the one denied for its name, the ends."""
    control = tmp_path / "control.sock"
    go = world / "go"
    go.unlink(missing_ok=True)
    relay = subprocess.Popen(
        [sys.executable, "-m", "relaynat", "run", *OPTIONS, "--control-socket", str(control),
         "--", "sh", "-c", "; ".join([
             f"while [ ! -e {go} ]; do sleep 0.05; done",
             _curl("https://www.allowed.test/", f"--cacert {world / 'cert.pem'}"),
             _s_client("-servername", "www.other.test")])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while not control.exists():
            assert time.monotonic() < deadline and relay.poll() is None, "no control socket"
            time.sleep(0.05)
        watch = subprocess.Popen([sys.executable, "-m", "relaynat", "ctl", "-s", str(control),
                                  "watch"], stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)  # the watch is set up before the guest goes on
        go.touch()
        out, err = relay.communicate(timeout=60)
        assert out.splitlines() == ["200", "reset"], out + err[-3000:]
        lines, _ = watch.communicate(timeout=10)  # ends when the relay does
    finally:
        for proc in (relay,):
            if proc.poll() is None:
                proc.kill()
        go.unlink(missing_ok=True)
    events = [json.loads(line) for line in lines.splitlines()]
    kinds = [(e["kind"], e.get("wire_name") or e.get("name")) for e in events]
    assert ("dns_query", "www.allowed.test") in kinds, kinds
    assert ("flow_opened", "www.allowed.test") in kinds, kinds
    assert ("flow_denied", "www.other.test") in kinds, kinds
    denied = next(e for e in events if e["kind"] == "flow_denied")
    assert denied["reason"] == "name_mismatch" and denied["far"] == [CDN, 443]
    assert any(e["kind"] == "flow_closed" and e["far"] == [CDN, 443] for e in events)
