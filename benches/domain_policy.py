#!/usr/bin/env python3
"""What allowing by domain name costs: connect-request-response through a name the
policy allows (its Host checked on the wire) and DNS queries a second through the
relay, with the domain policy on and off, in the same run.

    sudo .venv/bin/python benches/domain_policy.py [--duration 3] [--repeats 2]
    python3 domain_policy.py crr NAME PORT SECONDS      (the guest's side, run by it)
    python3 domain_policy.py dns NAME SERVER SECONDS    (the guest's side, run by it)

The world lives in a private network namespace (relaynat.netns.syscalls.isolate_network):
a veth end holding 11.3.0.2 (a connect-request-response server, benches/loadtools.py,
port 80) and 11.3.0.53 (dnsmasq, answering bench.allowed.test with 11.3.0.2 and nothing
else). Each case is one `relaynat run` guest: "off" with no policy, "on" with
`--allow-domain *.allowed.test`, alternated for --repeats rounds.

- crr: the guest resolves the name once, then for SECONDS opens a connection to it,
  sends a 64-byte HTTP/1 request with its Host (what the relay reads before it
  connects, when the policy is on), reads the 64-byte answer and closes, one after
  the other. Connections a second and the median latency.
- dns: the guest sends A queries for the name to the relay's DNS address over UDP, one
  at a time, for SECONDS (the relay forwards each, learns the answer's address when
  the policy is on). Answers a second.

Prints one line per case and the on/off ratio of the medians, of the rates and of the
CPU time the relay and its guest spent per operation (the guest's client is the same
either way, so the difference is the relay's; on a machine shared with other work the
rates swing, the CPU time much less); `--json FILE` writes the figures. Bounded: 2 x
repeats x 2 cases of `duration` seconds, plus start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAME = "bench.allowed.test"
SERVER, RESOLVER = "11.3.0.2", "11.3.0.53"
DNS_ADDRESS = "10.0.2.3"  # the relay's DNS address for the guest (RelayConfig default)
#: Exactly 64 bytes, the request size loadtools.py's server answers.
REQUEST = (b"GET / HTTP/1.1\r\nHost: " + NAME.encode() + b"\r\nX: ").ljust(60, b"a") + (
    b"\r\n\r\n")
RESPONSE = 64


# -- the guest's side ---------------------------------------------------------------------

def guest_crr(name: str, port: int, seconds: float) -> dict[str, object]:
    addr = socket.getaddrinfo(name, port, socket.AF_INET, socket.SOCK_STREAM)[0][4]
    lat: list[float] = []
    errors = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        try:
            with socket.create_connection(addr, timeout=2) as sock:
                sock.sendall(REQUEST)
                got = 0
                while got < RESPONSE:
                    chunk = sock.recv(RESPONSE - got)
                    if not chunk:
                        raise ConnectionError("closed early")
                    got += len(chunk)
        except OSError:
            errors += 1
            continue
        lat.append(time.perf_counter() - t0)
    return {"per_s": len(lat) / seconds, "p50_us": statistics.median(lat) * 1e6 if lat else 0,
            "errors": errors}


def _query(name: str, qid: int) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + struct.pack("!HH", 1, 1)


def guest_dns(name: str, server: str, seconds: float) -> dict[str, object]:
    answered = lost = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((server, 53))
        sock.settimeout(1)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            qid = random.getrandbits(16)
            sock.send(_query(name, qid))
            try:
                while struct.unpack("!H", sock.recv(512)[:2])[0] != qid:
                    pass
                answered += 1
            except TimeoutError:
                lost += 1
    return {"per_s": answered / seconds, "lost": lost}


# -- the host's side ----------------------------------------------------------------------

def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=20)


def _world(work: Path, seconds: float) -> list[subprocess.Popen[bytes]]:
    _sh("ip", "link", "add", "rnbench0", "type", "veth", "peer", "name", "rnbench1")
    _sh("ip", "addr", "add", "11.3.0.1/24", "dev", "rnbench0")
    for addr in (SERVER, RESOLVER):
        _sh("ip", "addr", "add", f"{addr}/32", "dev", "rnbench0")
    _sh("ip", "link", "set", "rnbench0", "up")
    _sh("ip", "link", "set", "rnbench1", "up")
    log = work / "dnsmasq.log"
    procs = [
        subprocess.Popen([sys.executable, str(HERE / "loadtools.py"), "crr-server", "--bind",
                          SERVER, "--port", "80", "--seconds", str(seconds)]),
        subprocess.Popen(["/usr/sbin/dnsmasq", "-k", "--no-resolv", "--no-hosts",
                          f"--listen-address={RESOLVER}", "--bind-interfaces", "--port=53",
                          "--user=root", "--pid-file=", f"--log-facility={log}",
                          f"--host-record={NAME},{SERVER}"])]
    deadline = time.monotonic() + 10
    while not (log.exists() and "started" in log.read_text()):
        if time.monotonic() > deadline:
            raise RuntimeError("dnsmasq did not start")
        time.sleep(0.05)
    time.sleep(0.3)  # the CRR server's listen
    return procs


def _case(kind: str, policy: bool, seconds: float, python: str) -> dict[str, object]:
    options = ["--dns-upstream", RESOLVER]
    if policy:
        options += ["--allow-domain", "*.allowed.test"]
    if kind == "crr":
        guest = [python, str(HERE / "domain_policy.py"), "crr", NAME, "80", str(seconds)]
    else:
        guest = [python, str(HERE / "domain_policy.py"), "dns", NAME, DNS_ADDRESS,
                 str(seconds)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([sys.executable, "-m", "relaynat", "run", "--stats", *options,
                           "--", *guest], capture_output=True, text=True,
                          timeout=seconds + 60, env={**os.environ,
                                                     "PYTHONPATH": str(HERE.parent / "src")})
    if done.returncode != 0:
        raise RuntimeError(f"{kind} policy={policy}: {done.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    # CPU time of the relay and its guest (the same client either way), per operation:
    # what the policy adds, far less at the mercy of a loaded machine than the rates.
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    ops = float(str(result["per_s"])) * seconds
    result["cpu_us_per_op"] = round(cpu / ops * 1e6, 1) if ops else 0.0
    return result


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in ("crr", "dns"):
        name, target, seconds = sys.argv[2], sys.argv[3], float(sys.argv[4])
        out = (guest_crr(name, int(target), seconds) if sys.argv[1] == "crr"
               else guest_dns(name, target, seconds))
        print(json.dumps(out), flush=True)
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    sys.path[:0] = [str(HERE.parent / "src")]
    from relaynat.netns.guest import python_for_command
    from relaynat.netns.syscalls import isolate_network

    isolate_network()
    # The relay's host sockets close first, so each connection leaves one in TIME_WAIT
    # toward the one server address: tens of thousands over a run, and a connect()
    # that searches past them for a free port costs more with every case (measured:
    # the same case at 540 and at 2,500 µs of CPU per connection). Reusing them for
    # new connects (tcp(7)) keeps the cases alike; the namespace is this run's own.
    Path("/proc/sys/net/ipv4/tcp_tw_reuse").write_text("1\n")
    python = python_for_command()
    cases = 2 * 2 * a.repeats
    work = Path(tempfile.mkdtemp(prefix="relaynat-domain-bench-"))
    work.chmod(0o755)
    procs = _world(work, cases * (a.duration + 15) + 30)
    figures: dict[str, list[float]] = {}
    try:
        for _ in range(a.repeats):
            for kind in ("crr", "dns"):
                for policy in (False, True):
                    result = _case(kind, policy, a.duration, python)
                    key = f"{kind}_{'on' if policy else 'off'}"
                    figures.setdefault(key, []).append(float(str(result["per_s"])))
                    figures.setdefault(f"{key}_cpu", []).append(
                        float(str(result["cpu_us_per_op"])))
                    print(f"{key:8} {result}", flush=True)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    medians = {key: statistics.median(values) for key, values in figures.items()}
    for kind, unit in (("crr", "connections/s"), ("dns", "queries/s")):
        off, on = medians[f"{kind}_off"], medians[f"{kind}_on"]
        cpu_off, cpu_on = medians[f"{kind}_off_cpu"], medians[f"{kind}_on_cpu"]
        print(f"{kind}: policy off {off:.0f} {unit}, on {on:.0f} {unit}, "
              f"on/off {on / off if off else float('nan'):.3f}; CPU per operation "
              f"(relay and guest) off {cpu_off:.0f} µs, on {cpu_on:.0f} µs, "
              f"on/off {cpu_on / cpu_off if cpu_off else float('nan'):.3f}")
    if a.json is not None:
        a.json.write_text(json.dumps({"figures": figures, "medians": medians}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
