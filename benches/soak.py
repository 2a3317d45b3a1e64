#!/usr/bin/env python3
"""A bounded soak: mixed traffic through `relaynat run` for N minutes, then a verdict on
whether the relay's memory and descriptors stayed flat.

    sudo .venv/bin/python benches/soak.py [--minutes 10]

The guest (a namespace behind `relaynat run`, running this script with --guest-loop)
repeats rounds until the time is up: a 4 MiB download and a 4 MiB upload (sha256
checked), 20 short echo connections, 10 UDP echoes, two pings, and a DNS query through
the relay's DNS address to a stub resolver (tests/support/dns_peer.py on 127.0.0.53). After
each round it writes the round number to a file; the host side then samples the
relay's RSS (VmRSS), its open descriptors, and (over the control socket) its live
flows: UDP flows and ping sessions stay open for their idle timeouts (up to 120 s), so
the descriptors that must stay flat are those not held by a live flow. Printed: rounds,
failures by kind, the samples after the first and the last round, and whether RSS
(within 4 MiB or 5%) and the descriptors beside the flows (equal) are flat. Exit status
1 on any failure or growth. Self-stopping; runs in a private network namespace.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"
GATEWAY, DNS = "10.0.2.2", "10.0.2.3"
DNS_NAME, DNS_ADDR = "soak.test", "192.0.2.7"
SIZE = 4 << 20


# -- inside the guest ----------------------------------------------------------------


def _dns_query(name: str) -> bytes:
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", 0x5A5A, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 1, 1)


def _round(a: argparse.Namespace, opener: urllib.request.OpenerDirector) -> list[str]:
    """One round of every kind of traffic; the kinds that failed."""
    failed = []
    base = f"http://{GATEWAY}:{a.http_port}"
    try:
        with opener.open(f"{base}/soak.bin", timeout=30) as r:
            if hashlib.sha256(r.read()).hexdigest() != a.sha256:
                failed.append("download")
        body = os.urandom(SIZE)
        req = urllib.request.Request(f"{base}/up", data=body, method="PUT")
        with opener.open(req, timeout=30) as r:
            if r.read().decode().strip() != hashlib.sha256(body).hexdigest():
                failed.append("upload")
    except OSError:
        failed.append("http")
    try:
        for _ in range(20):
            with socket.create_connection((GATEWAY, a.echo_port), timeout=10) as s:
                msg = os.urandom(1024)
                s.sendall(msg)
                s.shutdown(socket.SHUT_WR)
                got = b""
                while chunk := s.recv(4096):
                    got += chunk
                if got != msg:
                    failed.append("echo")
    except OSError:
        failed.append("echo")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(1)
        u.connect((GATEWAY, a.udp_port))
        for i in range(10):
            u.send(b"soak %d" % i)
            try:
                if u.recv(100) != b"soak %d" % i:
                    failed.append("udp")
            except OSError:
                failed.append("udp")
    ping = subprocess.run(["ping", "-c", "2", "-i", "0.2", "-W", "2", GATEWAY],
                          capture_output=True, timeout=20)
    if ping.returncode != 0:
        failed.append("ping")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as d:
        d.settimeout(2)
        d.connect((DNS, 53))
        d.send(_dns_query(DNS_NAME))
        try:
            reply = d.recv(512)
            if reply[3] & 0xF or reply[-4:] != socket.inet_aton(DNS_ADDR):
                failed.append("dns")
        except OSError:
            failed.append("dns")
    return failed


def guest_loop(a: argparse.Namespace) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + a.seconds
    rounds, failures = 0, Counter[str]()
    while time.monotonic() < deadline:
        failures.update(_round(a, opener))
        rounds += 1
        tmp = f"{a.marker}.tmp"
        Path(tmp).write_text(str(rounds))
        os.replace(tmp, a.marker)
        time.sleep(0.3)  # the round's flows finish closing before the host samples
    print(json.dumps({"rounds": rounds, "failures": dict(failures)}))
    return 0


# -- the host side -------------------------------------------------------------------


def _udp_echo() -> tuple[socket.socket, int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))

    def loop() -> None:
        while True:
            try:
                data, peer = sock.recvfrom(2048)
                sock.sendto(data, peer)
            except OSError:
                return

    threading.Thread(target=loop, daemon=True).start()
    return sock, sock.getsockname()[1]


def host(minutes: float) -> int:
    sys.path[:0] = [str(HERE.parent / "src"), str(TESTS)]
    from support.faultkit import LiveRun, fd_count, rss_kib
    from support.lossy_harness import host_peer, http_peer, stop_proc, wait_for

    from relaynat.control.client import call
    from relaynat.netns.guest import command_ids, python_for_command
    from relaynat.netns.syscalls import isolate_network

    isolate_network()  # before any thread or child: nothing below leaves the machine
    with open("/proc/sys/net/ipv4/ping_group_range", "w") as f:
        f.write("0 2147483647")  # this namespace only: the relay may open ping sockets
    with tempfile.TemporaryDirectory(prefix="relaynat-soak-") as tmp:
        work = Path(tmp)
        (work / "www").mkdir()
        data = os.urandom(SIZE)
        (work / "www" / "soak.bin").write_bytes(data)
        udp, udp_port = _udp_echo()
        ready = work / "dns.ready"
        dns = subprocess.Popen([sys.executable, str(TESTS / "support" / "dns_peer.py"), "--addr",
                                "127.0.0.53", "--record", f"{DNS_NAME}={DNS_ADDR}",
                                "--ready-file", str(ready)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        # The guest writes its round marker as its unprivileged id outside (netns/guest.py),
        # in a directory of its own: not beside the control socket, which it could unlink.
        work.chmod(0o711)  # searchable, so that the guest reaches its own directory
        (work / "guest").mkdir()
        os.chown(work / "guest", *command_ids())
        marker, control = work / "guest" / "round", str(work / "control.sock")
        samples: list[tuple[int, int, int, int]] = []

        def sample(pid: int, done: int) -> None:
            """(round, RSS KiB, descriptors, descriptors beside live flows)."""
            before = fd_count(pid)
            live = call(control, {"execute": "stats"})["return"]
            if fd_count(pid) != before:  # a flow opened or closed meanwhile: next time
                return
            flows = live["tcp_flows"] + live["udp_flows"] + live["icmp_sockets"]
            samples.append((done, rss_kib(pid), before, before - flows))

        try:
            wait_for(ready.exists, 10, "dns stub")
            with http_peer(work / "www", work) as http_port, \
                    host_peer("echo", work) as echo_port:
                run = LiveRun([python_for_command(), str(Path(__file__).resolve()),
                               "--guest-loop",
                               "--seconds", str(minutes * 60), "--marker", str(marker),
                               "--http-port", str(http_port), "--echo-port", str(echo_port),
                               "--udp-port", str(udp_port),
                               "--sha256", hashlib.sha256(data).hexdigest()],
                              options=("--dns-upstream", "127.0.0.53",
                                       "--control-socket", control))
                try:
                    seen = ""
                    while run.proc.poll() is None:
                        now = marker.read_text() if marker.exists() else ""
                        if now != seen:
                            seen = now
                            sample(run.pid, int(now))
                        time.sleep(0.05)
                    status, stats = run.finish(timeout_s=120)
                finally:
                    run.kill()
        finally:
            stop_proc(dns)
            udp.close()
    lines = run.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    if status != 0 or not result or len(samples) < 2:
        print(f"FAILED: status {status}, {run.stdout[-1000:]}\n{run.stderr[-3000:]}",
              file=sys.stderr)
        return 1
    (r0, rss0, fd0, base0), (r1, rss1, fd1, base1) = samples[0], samples[-1]
    rss_flat = rss1 <= rss0 + max(4096, rss0 // 20)
    fds_flat = base1 <= base0
    print(f"soak {minutes} min: {result['rounds']} rounds, failures {result['failures']}")
    print(f"relay after round {r0}: RSS {rss0 / 1024:.1f} MiB, {fd0} fds ({base0} beside "
          f"live flows); after round {r1}: RSS {rss1 / 1024:.1f} MiB, {fd1} fds ({base1} "
          f"beside live flows); peak RSS {max(s[1] for s in samples) / 1024:.1f} MiB")
    print(f"RSS flat: {rss_flat}; descriptors flat: {fds_flat}")
    print("counters: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.items()) if k.startswith(
        ("tcp_flows_", "udp_flows_", "icmp_echo_", "dns", "tcp_internal", "drop_internal"))))
    ok = rss_flat and fds_flat and not result["failures"] and "Traceback" not in run.stderr
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--guest-loop", action="store_true", help=argparse.SUPPRESS)
    for name in ("--http-port", "--echo-port", "--udp-port"):
        p.add_argument(name, type=int, help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    p.add_argument("--marker", help=argparse.SUPPRESS)
    p.add_argument("--sha256", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.guest_loop:
        return guest_loop(args)
    if os.geteuid() != 0:
        print("needs root (network namespaces, TAP)", file=sys.stderr)
        return 2
    return host(args.minutes)


if __name__ == "__main__":
    sys.exit(main())
