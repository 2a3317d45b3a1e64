"""A real Linux guest (a network namespace behind `relaynat run`) against real servers.

The pytest process runs in a private network namespace (conftest.py); the servers
listen on its 127.0.0.1, and `relaynat run` puts each guest command in a further
namespace whose only link is the relay's TAP. Guest traffic to 10.0.2.2 reaches the
servers through the relay's host-loopback mapping. Nothing here is simulated.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import GUESTS, SUPPORT
from support.guest_tools import malformed_frames
from support.relaynat_cli import guest_python, parse_stats, relaynat_run

pytestmark = pytest.mark.integration
pytest_plugins = ["support.guest_fs"]

GUEST_TOOLS = str(SUPPORT / "guest_tools.py")
GATEWAY = "10.0.2.2"
BIG = 256 << 20


def test_download_and_upload_256mib_hash_equal(start_peer, big_file, guest_dir) -> None:
    path, digest = big_file
    port = start_peer("http", "--root", str(path.parent))
    url = f"http://{GATEWAY}:{port}/{path.name}"
    down = relaynat_run("sh", "-c", f"curl -sS --fail {url} | sha256sum")
    assert down.returncode == 0, down.stderr
    assert down.stdout.split()[0] == digest
    upload = guest_dir / path.name  # where the guest may read it
    os.link(path, upload)
    up = relaynat_run("curl", "-sS", "--fail", "-T", str(upload), url)
    assert up.returncode == 0, up.stderr
    assert up.stdout.strip() == digest


def _iperf_gbits(result: dict) -> tuple[float, list[float]]:
    intervals = [i["sum"]["bits_per_second"] / 1e9 for i in result["intervals"]]
    return result["end"]["sum_received"]["bits_per_second"] / 1e9, intervals


@pytest.mark.parametrize("reverse", [False, True], ids=["guest-to-host", "host-to-guest"])
def test_iperf3_5s_completes_without_stall(reverse: bool, tmp_path: Path) -> None:
    server = subprocess.Popen(["iperf3", "-s", "-1", "-B", "127.0.0.1", "-p", "5299"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        args = ["iperf3", "-c", GATEWAY, "-p", "5299", "-t", "5", "-J"]
        if reverse:
            args.append("-R")
        done = relaynat_run(*args, timeout=60)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        total, intervals = _iperf_gbits(json.loads(done.stdout))
    finally:
        server.kill()
        server.wait()
    print(f"iperf3 {'host->guest' if reverse else 'guest->host'}: {total:.2f} Gbit/s, "
          f"intervals {[round(x, 2) for x in intervals]}")
    assert len(intervals) >= 5
    # A one-second interval at zero throughput is a stall (a bug, not a figure).
    assert min(intervals) > 0.05, intervals
    assert total > 0.5


def test_connect_to_closed_port_is_refused_fast(start_peer) -> None:
    port = start_peer("echo")  # a live port; the closed one is the next one up
    closed = port + 1 if port < 65535 else port - 1
    done = relaynat_run(guest_python(), str(GUESTS / "tcp_connect_error.py"), GATEWAY,
                        str(closed), "--timeout", "10", "--elapsed")
    name, elapsed = done.stdout.split()
    assert name == "ConnectionRefusedError", done.stdout + done.stderr
    # The relay answers the SYN with RST as soon as the host connect() fails.
    assert float(elapsed) < 1.0, elapsed
    assert parse_stats(done.stderr).get("tcp_connect_failed", 0) >= 1


def test_half_close_guest_shut_wr_then_reads_reply(start_peer) -> None:
    port = start_peer("drain-then-reply")
    done = relaynat_run(guest_python(), GUEST_TOOLS, "half-close", GATEWAY, str(port),
                        "--size", str(3 << 20))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith(str(3 << 20))


def test_half_close_with_socat(start_peer) -> None:
    port = start_peer("drain-then-reply")
    payload = b"hello through the relay\n" * 1000
    done = subprocess.run(
        [sys.executable, "-m", "relaynat", "run", "--", "socat", "-t", "10", "-",
         f"TCP:{GATEWAY}:{port}"], input=payload, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().strip() == f"{hashlib.sha256(payload).hexdigest()} {len(payload)}"


def test_200_concurrent_connections_echo_1mib_each(start_peer) -> None:
    port = start_peer("echo")
    done = relaynat_run(guest_python(), GUEST_TOOLS, "echo-many", GATEWAY, str(port),
                        "--conns", "200", "--size", str(1 << 20), timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert done.stdout.strip() == "ok 200"
    stats = parse_stats(done.stderr)
    assert stats["tcp_flows_opened"] == 200
    # Flows still finishing their FIN exchange when the command exits are closed by
    # the relay's teardown; every other close was graceful (no reset toward the host).
    at_exit = stats.get("tcp_flows_closed_on_detach", 0)
    assert stats.get("tcp_flows_closed", 0) + at_exit == 200
    assert stats.get("tcp_host_resets", 0) == at_exit


def test_host_loopback_unreachable_when_mapping_is_off(start_peer) -> None:
    port = start_peer("echo")
    done = relaynat_run("curl", "-sS", "--max-time", "5", f"http://{GATEWAY}:{port}/",
                        options=("--map-host-loopback", "none"))
    assert done.returncode == 7, (done.returncode, done.stderr)
    assert parse_stats(done.stderr).get("tcp_refused_unmapped", 0) >= 1


def test_malformed_frames_are_counted_and_a_transfer_beside_them_is_intact(
        start_peer, big_file) -> None:
    path, digest = big_file
    port = start_peer("http", "--root", str(path.parent))
    url = f"http://{GATEWAY}:{port}/{path.name}"
    script = (f"{guest_python()} {GUEST_TOOLS} inject tap0 --rounds 200 --pause 0.002 >/dev/null & "
              f"curl -sS --fail {url} | sha256sum; wait")
    done = relaynat_run("sh", "-c", script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == digest
    stats = parse_stats(done.stderr)
    # Every injected kind is counted under its reason. The guest kernel's TAP queue may
    # drop a few injected frames while the download keeps the relay busy, so each count
    # must reach most of the 200 rounds rather than exactly 200. One kind is random
    # garbage, which lands under whichever reason its bytes hit (up to 200 more there),
    # so the upper bound is on the sum: no frame is counted twice.
    for reason in ("drop_ip_header_len", "drop_ip_total_len", "drop_tcp_header_len",
                   "drop_tcp_short", "drop_ip_checksum", "drop_ip_fragment",
                   "drop_ip_spoofed_source", "drop_arp_short", "drop_ethertype_unsupported"):
        assert 100 <= stats.get(reason, 0) <= 400, (reason, stats)
    kinds = len(malformed_frames(bytes(6), "10.0.2.15", "10.0.2.2"))
    assert sum(v for k, v in stats.items() if k.startswith("drop_")) <= 200 * kinds, stats
    assert stats.get("drop_internal_error", 0) == 0


def test_exit_status_is_the_commands() -> None:
    assert relaynat_run("sh", "-c", "exit 7").returncode == 7
    missing = relaynat_run("/nonexistent/cmd")
    assert missing.returncode == 127
    assert "cannot execute" in missing.stderr


def test_flow_table_bound_refuses_with_rst_and_keeps_existing_flows(start_peer) -> None:
    port = start_peer("echo")
    done = relaynat_run(guest_python(), str(GUESTS / "tcp_third_connection.py"), GATEWAY,
                        str(port), options=("--max-flows", "2"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["third: ConnectionRefusedError", "still here",
                                        "still here"]
    assert parse_stats(done.stderr)["tcp_refused_flow_limit"] == 1


def test_host_peer_that_stops_reading_holds_the_guest_back_then_resumes(start_peer) -> None:
    # The peer reads nothing for 2 s: its receive window, then the relay's socket send
    # buffer fill, our advertised window must close, and then reopen by itself (window
    # update) once the peer reads: the upload finishes intact soon after.
    port = start_peer("drain-then-reply", "--delay", "2")
    size = 32 << 20
    t0 = time.monotonic()
    done = relaynat_run(guest_python(), GUEST_TOOLS, "half-close", GATEWAY, str(port),
                        "--size", str(size), timeout=60)
    elapsed = time.monotonic() - t0
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith(f" {size}")
    assert elapsed < 10, elapsed


def test_guest_that_stops_reading_gets_probed_then_resumes(start_peer, tmp_path) -> None:
    # The guest application reads nothing for 2 s: the guest kernel's window closes
    # to zero, the relay must stop sending (and probe), then deliver the rest intact.
    data = os.urandom(48 << 20)
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "f.bin").write_bytes(data)
    port = start_peer("http", "--root", str(tmp_path / "www"))
    t0 = time.monotonic()
    done = relaynat_run(guest_python(), str(GUESTS / "stalled_http_get.py"), GATEWAY,
                        str(port), "2", timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [hashlib.sha256(data).hexdigest(), str(len(data))]
    assert time.monotonic() - t0 < 15


@pytest.mark.parametrize(("offload", "mtu"), [(False, 65520), (True, 1500), (False, 1500)],
                         ids=["plain-tap-65520", "vnet-gso-1500", "plain-tap-1500"])
def test_link_formats_carry_32mib_both_ways_intact(start_peer, tmp_path, guest_dir, offload,
                                                   mtu) -> None:
    # Without the vnet header every checksum is ours and the guest kernel verifies it;
    # at MTU 1500 with offload we send 64 KiB GSO frames that the guest kernel splits.
    data = os.urandom(32 << 20)
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "f.bin").write_bytes(data)
    (guest_dir / "up.bin").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    port = start_peer("http", "--root", str(tmp_path / "www"))
    options = ("--mtu", str(mtu)) + (() if offload else ("--no-offload",))
    script = (f"ip link show tap0 | grep -o 'mtu [0-9]*'; "
              f"curl -sS --fail http://{GATEWAY}:{port}/f.bin | sha256sum; "
              f"curl -sS --fail -T {guest_dir / 'up.bin'} http://{GATEWAY}:{port}/up")
    done = relaynat_run("sh", "-c", script, options=options)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split("\n")
    assert lines[0] == f"mtu {mtu}"
    assert lines[1].split()[0] == digest
    assert lines[2] == digest


def test_pcap_records_both_directions_of_the_guest_link(start_peer, tmp_path) -> None:
    import dpkt

    port = start_peer("drain-then-reply")
    pcap = tmp_path / "guest.pcap"
    done = relaynat_run(guest_python(), GUEST_TOOLS, "half-close", GATEWAY, str(port),
                        "--size", "100000", options=("--pcap", str(pcap)))
    assert done.returncode == 0, done.stderr
    syn = syn_ack = data_to_host = 0
    with open(pcap, "rb") as f:
        for _, raw in dpkt.pcap.Reader(f):
            eth = dpkt.ethernet.Ethernet(raw)
            tcp = getattr(eth.data, "data", None)
            if not isinstance(tcp, dpkt.tcp.TCP):
                continue
            if tcp.dport == port and tcp.flags & dpkt.tcp.TH_SYN:
                syn += 1
            elif tcp.sport == port and tcp.flags & dpkt.tcp.TH_SYN:
                syn_ack += 1
            elif tcp.dport == port:
                data_to_host += len(tcp.data)
    assert (syn, syn_ack) == (1, 1)
    assert data_to_host == 100000
