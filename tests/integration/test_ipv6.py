"""IPv6 through the relay, with a real Linux guest (a namespace behind `relaynat run`).

The guest kernel does neighbour discovery against the relay, autoconfigures an address
from its router advertisement (SLAAC), and reaches the host's ::1 through the gateway
fd00::2 (the host-loopback mapping). Real tools on both sides: curl, ping, rdisc6
(ndisc6), dhclient -6 (isc-dhcp-client), dig, python's sockets; the servers listen on
[::1] of the test's private network namespace (conftest.py).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import GUESTS, SUPPORT
from support.relaynat_cli import guest_python, parse_stats, relaynat_run
from support.sysctl import ALL_GROUPS, ping_group_range

pytestmark = pytest.mark.integration
pytest_plugins = ["support.guest_fs"]

GATEWAY6 = "fd00::2"
GUEST_TOOLS = str(SUPPORT / "guest_tools.py")


@pytest.fixture(scope="module", autouse=True)
def _ping_sockets_allowed() -> Iterator[None]:
    """The relay answers the guest's pings through host ping sockets (host/icmp_relay.py)."""
    with ping_group_range(ALL_GROUPS):
        yield


def test_router_advertisement_as_rdisc6_reads_it_and_slaac_address_appears() -> None:
    done = relaynat_run("sh", "-c", "rdisc6 -1 -w 2000 tap0; sleep 1; ip -6 -o addr show dev tap0;"
                        " ip -6 route show default; cat /proc/sys/net/ipv6/conf/tap0/mtu",
                        options=("--mtu", "9000"))
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "Stateful address conf.    :          Yes" in out
    assert "MTU                      :         9000 bytes (valid)" in out
    assert "Prefix                   : fd00::/64" in out
    assert "Recursive DNS server     : fd00::3" in out
    assert "from fe80::5055:aff:fe00:202" in out
    # The kernel's own SLAAC address (modified EUI-64 of the TAP's MAC, "dynamic"
    # because it carries the prefix's lifetimes) beside the static fd00::15.
    slaac = [line for line in out.splitlines() if "inet6 fd00::" in line and "dynamic" in line]
    assert len(slaac) == 1, out
    assert "fd00::15/64" in out
    assert "default via fe80::5055:aff:fe00:202 dev tap0 proto ra" in out
    assert out.split()[-1] == "9000"  # the RA's MTU option was applied
    stats = parse_stats(done.stderr)
    assert stats["ndp_rs"] >= 1 and stats["ndp_ra_sent"] >= 2


def test_download_and_upload_over_ipv6_hash_equal(start_peer: Callable[..., int],
                                                  big_file: tuple[Path, str],
                                                  guest_dir: Path) -> None:
    path, digest = big_file
    port = start_peer("http", "--root", str(path.parent), "--bind", "::1")
    url = f"http://[{GATEWAY6}]:{port}/{path.name}"
    down = relaynat_run("sh", "-c", f"curl -6 -sS --fail {url} | sha256sum")
    assert down.returncode == 0, down.stderr
    assert down.stdout.split()[0] == digest
    upload = guest_dir / path.name  # where the guest may read it
    os.link(path, upload)
    up = relaynat_run("curl", "-6", "-sS", "--fail", "-T", str(upload), url)
    assert up.returncode == 0, up.stderr
    assert up.stdout.strip() == digest
    stats = parse_stats(up.stderr)
    assert stats["tcp_flows_opened"] == 1 and stats.get("tcp_internal_errors", 0) == 0


def test_ipv6_at_mtu_1500_without_offload(start_peer: Callable[..., int],
                                          tmp_path: Path) -> None:
    data = os.urandom(8 << 20)
    (tmp_path / "f.bin").write_bytes(data)
    import hashlib

    port = start_peer("http", "--root", str(tmp_path), "--bind", "::1")
    done = relaynat_run("sh", "-c", f"curl -6 -sS --fail http://[{GATEWAY6}]:{port}/f.bin"
                        " | sha256sum", options=("--mtu", "1500", "--no-offload"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == hashlib.sha256(data).hexdigest()


def test_ping6_the_gateway_mapped_host() -> None:
    done = relaynat_run("ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", GATEWAY6)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 packets transmitted, 3 received" in done.stdout
    stats = parse_stats(done.stderr)
    assert stats["icmp_echo_replies"] == 3


@pytest.mark.parametrize(("mtu", "sizes"), [(65520, [1, 1452, 30000, 65472]),
                                            (1500, [1, 1452])])
def test_udp6_echo_small_and_mtu_sized(udp6_echo: int, mtu: int, sizes: list[int]) -> None:
    # 65472 = 65520 - 40 (IPv6) - 8 (UDP); 1452 = 1500 - 48: the largest that fit.
    done = relaynat_run(guest_python(), GUEST_TOOLS, "udp-echo", GATEWAY6, str(udp6_echo),
                        *map(str, sizes), options=("--mtu", str(mtu)))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:-1] == [f"ok {n}" for n in sizes]


def test_udp6_to_a_closed_port_gives_econnrefused() -> None:
    probe = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    probe.bind(("::1", 0))
    port = probe.getsockname()[1]
    probe.close()
    done = relaynat_run(guest_python(), str(GUESTS / "udp_send_error.py"), GATEWAY6, str(port),
                        "--timeout", "3", "--payload", "anyone?")
    assert done.stdout.strip() == "ConnectionRefusedError", done.stdout + done.stderr
    assert parse_stats(done.stderr)["udp_icmp_port_unreachable"] == 1


def test_tcp6_to_a_closed_port_is_reset() -> None:
    probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    probe.bind(("::1", 0))
    port = probe.getsockname()[1]
    probe.close()
    done = relaynat_run(guest_python(), str(GUESTS / "tcp_connect_error.py"), GATEWAY6,
                        str(port), "--timeout", "5")
    assert done.stdout.strip() == "ConnectionRefusedError", done.stdout + done.stderr


def test_dhclient6_gets_the_configured_address_and_dns(guest_dir: Path) -> None:
    lease = guest_dir / "dhclient6.leases"
    # -sf /bin/true: keep dhclient from reconfiguring the guest; the lease file is what
    # the server said. -d keeps it in the foreground (a daemon would hold the output
    # pipes open); it is stopped once the lease is written, or after 10 s.
    # dhclient binds the link-local address, so wait until its DAD is over (≈1 s).
    wait_dad = ("for i in $(seq 50); do [ -z \"$(ip -6 addr show dev tap0 tentative)\" ] && "
                "break; sleep 0.1; done; ")
    done = relaynat_run("sh", "-c", wait_dad + f"dhclient -6 -d -v -sf /bin/true -lf {lease} "
                        f"-pf {guest_dir / 'pid'} tap0 & pid=$!; for i in $(seq 100); do "
                        f"grep -q iaaddr {lease} 2>/dev/null && break; sleep 0.1; done; "
                        "kill $pid; wait $pid; true",
                        options=("--address6", "fd00::99"), timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    text = lease.read_text()
    assert "iaaddr fd00::99" in text
    assert "option dhcp6.name-servers fd00::3" in text
    stats = parse_stats(done.stderr)
    assert stats["dhcp6_replies"] >= 2  # advertise, reply


def test_ipv4_only_drops_ipv6_and_ipv6_only_drops_ipv4(start_peer: Callable[..., int],
                                                       tmp_path: Path) -> None:
    (tmp_path / "hello").write_bytes(b"hello\n")
    port = start_peer("http", "--root", str(tmp_path), "--bind", "::1")
    port4 = start_peer("http", "--root", str(tmp_path))
    v4_only = relaynat_run("sh", "-c", f"curl -sS http://10.0.2.2:{port4}/hello; "
                           "cat /proc/sys/net/ipv6/conf/tap0/disable_ipv6", options=("-4",))
    assert v4_only.returncode == 0, v4_only.stderr
    assert v4_only.stdout.split() == ["hello", "1"]
    v6_only = relaynat_run("sh", "-c", f"curl -sS http://[{GATEWAY6}]:{port}/hello; "
                           "ip -4 -o addr show dev tap0 | wc -l; grep nameserver "
                           "/etc/resolv.conf", options=("-6",))
    assert v6_only.returncode == 0, v6_only.stderr
    assert v6_only.stdout.split() == ["hello", "0", "nameserver", "fd00::3"]
