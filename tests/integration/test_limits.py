"""Flow limits and the new-flow rate, through a real namespace guest (`relaynat run`).

The guest's own kernel reports the outcome: a SYN over the rate must come back as
ECONNREFUSED (the relay's RST), not a timeout; UDP and ping over a limit get nothing.
The relay's `--stats` must count each refusal under its reason. Servers listen on the
suite's private 127.0.0.1, which the guest reaches as 10.0.2.2 (fd00::2 for IPv6).
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from pathlib import Path

import pytest
from support import SUPPORT
from support.relaynat_cli import guest_python, parse_stats, relaynat_run
from support.sysctl import ALL_GROUPS, ping_group_range

pytest_plugins = ["support.guest_fs"]
GUEST = str(SUPPORT / "guest_tools.py")
GUEST_TOOLS = str(SUPPORT / "guest_tools.py")
GATEWAY = "10.0.2.2"
GATEWAY6 = "fd00::2"


def _guest_json(done: subprocess.CompletedProcess[str]) -> dict:  # type: ignore[type-arg]
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.integration
def test_syns_over_the_rate_get_rst_and_are_counted(start_peer) -> None:
    rate, burst, count, after = 20, 5, 100, 5
    port = start_peer("echo")
    done = relaynat_run(guest_python(), GUEST, "connect-burst", GATEWAY, str(port),
                        "--count", str(count), "--pause", "0.3", "--after", str(after),
                        options=("--new-flow-rate", f"{rate}/s",
                                 "--new-flow-burst", str(burst)))
    out = _guest_json(done)
    stats = parse_stats(done.stderr)
    first, elapsed = out["first"], out["elapsed"]
    ok, refused = first.count("ok"), first.count("refused")
    # Every attempt either connected or was refused by RST: none timed out.
    assert ok + refused == count, first
    # The bucket starts full, and the relay saw every SYN between the guest's first
    # connect() and its last one's return (one CLOCK_MONOTONIC for both), so no more
    # than burst + rate * elapsed of them can have found a token. uvloop's loop.time()
    # is libuv's millisecond-truncated uv_now(): up to 1 ms of slack at each end.
    assert burst <= ok <= burst + rate * (elapsed + 0.002), (ok, elapsed)
    assert refused >= 1
    assert stats["tcp_refused_rate_limit"] == refused
    # 0.3 s idle refills 6 tokens, capped at the burst: the next `burst` connect.
    assert out["second"] == ["ok"] * after
    assert stats["tcp_flows_opened"] == ok + after


@pytest.mark.integration
def test_the_rate_is_one_bucket_for_tcp_udp_and_ping(start_peer, udp_echo: int) -> None:
    """Burst 2 at 0.01/s (one token per 100 s, so none comes back during the test):
    a TCP connection and a UDP flow take the two tokens; then a second UDP flow, a
    second TCP connection and a ping are all over the rate."""
    port = start_peer("echo")
    python = guest_python()
    script = (f"{python} {GUEST} connect-burst {GATEWAY} {port} --count 1; "
              f"{python} {GUEST} udp-flows {GATEWAY} {udp_echo} --flows 2 --tries 2; "
              f"{python} {GUEST} connect-burst {GATEWAY} {port} --count 1; "
              f"ping -c 1 -W 1 {GATEWAY}; true")
    with ping_group_range(ALL_GROUPS):
        done = relaynat_run("sh", "-c", script,
                            options=("--new-flow-rate", "0.01", "--new-flow-burst", "2"))
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines[0]["first"] == ["ok"]
    assert lines[1] == {"first": [True, False], "again": [True, False]}
    assert lines[2]["first"] == ["refused"]
    assert "1 packets transmitted, 0 received" in done.stdout
    stats = parse_stats(done.stderr)
    assert stats["udp_drop_rate_limit"] == 4  # flow 2: two tries, twice
    assert stats["tcp_refused_rate_limit"] == 1
    assert stats["drop_icmp_rate_limit"] == 1


def _wait_file(path: Path) -> None:
    deadline = time.monotonic() + 20
    while not path.exists():
        assert time.monotonic() < deadline, "guest server did not start"
        time.sleep(0.05)


def _inbound_tcp(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), 10) as s:
        s.sendall(b"hello")
        s.shutdown(socket.SHUT_WR)
        return s.recv(4096)


def _inbound_udp(port: int) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        for _ in range(3):
            s.sendto(b"hi", ("127.0.0.1", port))
            try:
                return s.recv(4096)
            except TimeoutError:
                continue
    return b""


@pytest.mark.integration
async def test_inbound_flows_do_not_spend_the_guests_rate(start_peer, guest_dir: Path) -> None:
    """Burst 1 at 0.01/s: two forwarded TCP clients and two UDP clients reach the guest,
    and afterwards the guest's own token is still there (its first connect succeeds,
    its second is refused): the rate bounds the guest's egress, not who calls it."""
    from relaynat.config import RelayConfig
    from relaynat.netns.guest import run_command

    host_port = start_peer("echo")
    ready, out = guest_dir / "ready", guest_dir / "out.json"
    forwards: dict[str, int] = {}
    relays: list = []  # type: ignore[type-arg]

    def relay_ready(relay) -> None:  # type: ignore[no-untyped-def]
        forwards["tcp"] = relay.add_forward("tcp", "127.0.0.1", 0, 5353).host_port
        forwards["udp"] = relay.add_forward("udp", "127.0.0.1", 0, 5353).host_port
        relays.append(relay)

    python = guest_python()
    script = (f"{python} {GUEST_TOOLS} peer-echo 5353 --events 4 --ready {ready} && "
              f"{python} {GUEST} connect-burst {GATEWAY} {host_port} --count 2 > {out}")
    config = RelayConfig(new_flow_rate=0.01, new_flow_burst=1).validate()
    guest = asyncio.ensure_future(run_command(config, ["sh", "-c", script],
                                              relay_ready=relay_ready))
    try:
        await asyncio.to_thread(_wait_file, ready)
        for _ in range(2):
            assert (await asyncio.to_thread(_inbound_tcp, forwards["tcp"])).endswith(b" 5")
            assert (await asyncio.to_thread(_inbound_udp, forwards["udp"])).endswith(b" hi")
        assert await asyncio.wait_for(guest, 30) == 0
    finally:
        guest.cancel()
    assert json.loads(out.read_text())["first"] == ["ok", "refused"]
    stats = relays[0].stats()
    assert stats["tcp_inbound_opened"] == 2 and stats["udp_inbound_opened"] == 2
    assert stats["tcp_refused_rate_limit"] == 1


@pytest.mark.integration
def test_fourth_udp_flow_is_dropped_and_counted_first_three_still_echo(udp_echo: int) -> None:
    tries = 3
    done = relaynat_run(guest_python(), GUEST, "udp-flows", GATEWAY, str(udp_echo),
                        "--flows", "4", "--tries", str(tries),
                        options=("--max-udp-flows", "3"))
    out = _guest_json(done)
    assert out == {"first": [True, True, True, False], "again": [True, True, True, False]}
    stats = parse_stats(done.stderr)
    assert stats["udp_drop_flow_limit"] == 2 * tries
    assert stats["udp_flows_opened"] == 3


@pytest.mark.integration
@pytest.mark.parametrize("limit", [1, 2])
def test_max_icmp_flows_drops_a_second_ping_session(limit: int) -> None:
    """Two ping sessions, 10.0.2.2 and then fd00::2 (host 127.0.0.1 and ::1, both
    answering): with room for one, the second gets no reply and is counted; with room
    for two (the control), both are answered."""
    script = (f"ping -c 2 -i 0.2 -W 2 {GATEWAY}; echo rc4=$?; "
              f"ping -6 -c 2 -i 0.2 -W 1 {GATEWAY6}; echo rc6=$?")
    with ping_group_range(ALL_GROUPS):
        done = relaynat_run("sh", "-c", script, options=("--max-icmp-flows", str(limit)))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rc4=0" in done.stdout, done.stdout
    stats = parse_stats(done.stderr)
    if limit == 1:
        assert "rc6=1" in done.stdout, done.stdout
        assert "2 packets transmitted, 0 received" in done.stdout
        assert stats["drop_icmp_table_full"] == 2
        assert stats["icmp_sockets_opened"] == 1
    else:
        assert "rc6=0" in done.stdout, done.stdout
        assert stats.get("drop_icmp_table_full", 0) == 0
        assert stats["icmp_sockets_opened"] == 2


