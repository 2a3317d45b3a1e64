"""UDP through the relay: a real guest kernel (namespace guest) against real host sockets.

The echo server is a thread of the pytest process, on 127.0.0.1 of the test's private
network namespace (conftest.py); the guest reaches it as the gateway, 10.0.2.2. The
flow table and the relay without a guest kernel: tests/unit/test_udp_flows.py.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
from support import GUESTS, SUPPORT
from support.relaynat_cli import guest_python, parse_stats, relaynat_run

from relaynat.config import RelayConfig
from relaynat.netns.guest import run_command

GATEWAY = "10.0.2.2"
GUEST_TOOLS = str(SUPPORT / "guest_tools.py")


@pytest.mark.integration
@pytest.mark.parametrize(("mtu", "offload", "sizes"), [
    (65520, True, [1, 100, 1472, 8000, 65000, 65492]),
    (65520, False, [1, 65000]),
    (1500, True, [1, 512, 1472]),
], ids=["vnet-65520", "plain-65520", "vnet-1500"])
def test_udp_echo_small_and_mtu_sized(udp_echo: int, mtu: int, offload: bool,
                                      sizes: list[int]) -> None:
    options = ("--mtu", str(mtu)) + (() if offload else ("--no-offload",))
    done = relaynat_run(guest_python(), GUEST_TOOLS, "udp-echo", GATEWAY, str(udp_echo),
                        *map(str, sizes), options=options,
                        timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:-1] == [f"ok {n}" for n in sizes], done.stdout
    stats = parse_stats(done.stderr)
    assert stats["udp_flows_opened"] == 1
    assert stats["udp_to_guest_bytes"] >= sum(sizes)


@pytest.mark.integration
def test_host_datagram_larger_than_guest_mtu_is_dropped_and_counted(udp_echo: int) -> None:
    done = relaynat_run(guest_python(), str(GUESTS / "udp_too_big_for_mtu.py"), GATEWAY,
                        str(udp_echo), options=("--mtu", "1500"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:-1] == ["nothing", "got 1472"]
    assert parse_stats(done.stderr)["udp_drop_too_big_for_mtu"] == 1


@pytest.mark.integration
def test_closed_port_gives_the_guest_econnrefused(udp_echo: int) -> None:
    # A port that is surely closed: bind one, note it, close it.
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    closed = probe.getsockname()[1]
    probe.close()
    done = relaynat_run(guest_python(), str(GUESTS / "udp_send_error.py"), GATEWAY, str(closed),
                        "--payload", "anyone?")
    assert done.returncode == 0, done.stderr
    # Only an ICMP port unreachable that the guest kernel matched to this connected
    # socket (RFC 792 quote: our IP header + UDP ports) turns into ECONNREFUSED.
    assert done.stdout.strip() == "ConnectionRefusedError", done.stdout + done.stderr
    assert parse_stats(done.stderr)["udp_icmp_port_unreachable"] == 1


def _run_in_process(config: RelayConfig, *program: str) -> tuple[int, dict[str, int]]:
    """Run `program` (a file of tests/guests/ and its arguments) as the guest of a relay in
    this process; its exit status and the relay's counters."""
    holder: list = []
    code = asyncio.run(run_command(config, [guest_python(), *program],
                                   relay_ready=holder.append))
    return code, holder[0].stats()


@pytest.mark.integration
def test_flow_table_limit_drops_and_counts_and_keeps_existing_flows(
        udp_echo: int, capfd: pytest.CaptureFixture[str]) -> None:
    # The first datagram waits in the guest kernel's ARP queue until the gateway's MAC
    # is known, and the queue's flush can race a later send past it (seen once in CI:
    # the second socket's datagram came third and was the one refused). So the later
    # sockets send once the neighbour entry is complete (ATF_COM, 0x2 in /proc/net/arp).
    code, stats = _run_in_process(RelayConfig(max_udp_flows=2),
                                  str(GUESTS / "udp_three_flows.py"), GATEWAY, str(udp_echo))
    assert code == 0
    assert stats["udp_flows_opened"] == 2
    assert stats["udp_drop_flow_limit"] == 2  # the third socket's two datagrams
    assert stats["udp_to_host"] == 6  # hello + 2 x again on each of the first two
    out = capfd.readouterr().out.split("\n")[:-1]
    assert out == ["hello 0", "hello 1", "timeout", "again", "again"]


@pytest.mark.integration
def test_idle_flows_expire_and_a_new_datagram_reopens(udp_echo: int) -> None:
    config = RelayConfig(udp_idle_timeout_s=0.5, udp_stream_timeout_s=1.0)
    code, stats = _run_in_process(config, str(GUESTS / "udp_idle_gap.py"), GATEWAY,
                                  str(udp_echo))
    assert code == 0
    assert stats["udp_flows_opened"] == 2
    assert stats["udp_flows_expired"] == 1


@pytest.mark.integration
def test_no_route_gives_a_recverr_guest_net_unreachable() -> None:
    # The test namespace has only `lo`: 192.0.2.1 (TEST-NET-1) has no route, so the
    # relay's connect() fails with ENETUNREACH and the guest gets ICMP net unreachable.
    # Linux reports that to a UDP socket only with IP_RECVERR (udp(7)).
    done = relaynat_run(guest_python(), str(GUESTS / "udp_send_error.py"), "192.0.2.1", "9",
                        "--payload", "hello?", "--recverr", "--show", "is-enetunreach")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True", done.stdout + done.stderr
    stats = parse_stats(done.stderr)
    assert stats["udp_icmp_no_route"] == 1 and stats["udp_connect_failed"] == 1


@pytest.mark.integration
def test_gateway_without_the_loopback_mapping_refuses_udp(udp_echo: int) -> None:
    done = relaynat_run(guest_python(), str(GUESTS / "udp_send_error.py"), GATEWAY,
                        str(udp_echo), options=("--map-host-loopback", "none"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ConnectionRefusedError"
    stats = parse_stats(done.stderr)
    assert stats["udp_refused_unmapped"] == 1 and stats.get("udp_flows_opened", 0) == 0
