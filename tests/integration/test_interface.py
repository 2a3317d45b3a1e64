"""`relaynat serve --interface NAME`: a guest behind a host-side interface.

A veth pair plays the VM's NIC as Firecracker's or cloud-hypervisor's TAP does: the
far end sits in a guest namespace the test creates (a real kernel with busybox
udhcpc and curl), the near end stays in the test's namespace, and the relay (a real
process) attaches to the near end with a packet socket. The host side must stay
untouched: no address, route or lasting flag appears on the near end.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import SUPPORT
from support.netshim import _UDHCPC_SCRIPT
from support.relaynat_cli import parse_stats, stop_and_stats

pytestmark = pytest.mark.integration

GATEWAY = "10.0.2.2"
SIZE = 32 << 20


def sh(*args: str, timeout: float = 20) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args}: {done.stderr}"
    return done.stdout


def host_view(near: str) -> str:
    """What the host's own network configuration looks like (addresses, routes, the
    near end's link flags); the relay must leave it exactly as it found it."""
    return "\n".join([sh("ip", "-o", "addr", "show"), sh("ip", "route", "show", "table", "all"),
                      sh("ip", "-6", "route", "show", "table", "all"),
                      sh("ip", "-d", "-o", "link", "show", near)])


class VethGuest:
    """Guest namespace `ns` with `eth0`, the far end of a veth whose near end `near`
    stays here (addrgenmode none: no IPv6 link-local, so the host kernel says nothing
    on it)."""

    def __init__(self, workdir: Path, mtu: int) -> None:
        tag = f"{os.getpid() % 100000}{int(time.monotonic() * 1000) % 1000}"
        self.ns, self.near, self.workdir = f"rnif{tag}", f"rnv{tag}", workdir
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", self.near, "mtu", str(mtu), "type", "veth", "peer", "name",
           "eth0", "mtu", str(mtu), "netns", self.ns)
        sh("ip", "link", "set", self.near, "addrgenmode", "none")
        sh("ip", "link", "set", self.near, "up")
        sh("ip", "-n", self.ns, "link", "set", "lo", "up")
        sh("ip", "-n", self.ns, "link", "set", "eth0", "up")

    @classmethod
    def adopt(cls, workdir: Path, ns: str, near: str) -> VethGuest:
        """A guest namespace and veth that something else wired up (the example recipe
        examples/container_netns.sh); close() removes them all the same."""
        guest = cls.__new__(cls)
        guest.ns, guest.near, guest.workdir = ns, near, workdir
        return guest

    def run(self, *args: str, timeout: float = 60,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.ns, *args], capture_output=True,
                              text=True, timeout=timeout, env={**os.environ, **(env or {})})

    def dhcp(self) -> dict[str, str]:
        """busybox udhcpc (a real DHCP client); retries cover the relay's start-up."""
        script, lease = self.workdir / "udhcpc.script", self.workdir / "lease"
        script.write_text(_UDHCPC_SCRIPT)
        script.chmod(0o755)
        done = self.run("busybox", "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "10",
                        "-T", "1", "-A", "1", "-O", "mtu", "-s", str(script),
                        timeout=30, env={"LEASE_FILE": str(lease)})
        assert done.returncode == 0, done.stderr
        return dict(w.split("=", 1) for w in lease.read_text().split() if "=" in w)

    def close(self) -> None:
        subprocess.run(["ip", "link", "del", self.near], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=10)


@pytest.fixture
def veth_guest(tmp_path: Path) -> Iterator[Callable[[int], VethGuest]]:
    guests: list[VethGuest] = []

    def make(mtu: int = 1500) -> VethGuest:
        guests.append(VethGuest(tmp_path, mtu))
        return guests[-1]

    yield make
    for guest in guests:
        guest.close()


def serve(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "relaynat", "serve", "--stats",
                             "--log-level", "info", *args], stderr=subprocess.PIPE, text=True)


def wait_serving(proc: subprocess.Popen[str]) -> str:
    """Read the relay's stderr up to its 'serving interface' line (bounded)."""
    seen = ""
    for _ in range(50):
        line = proc.stderr.readline()  # type: ignore[union-attr]
        seen += line
        if "serving interface" in line or not line:
            break
    assert "serving interface" in seen, seen
    return seen


@pytest.fixture
def http_peer(tmp_path: Path) -> Iterator[tuple[int, str]]:
    """An HTTP server on host 127.0.0.1 serving `big.bin`; (port, sha256)."""
    data = os.urandom(SIZE)
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "big.bin").write_bytes(data)
    port_file = tmp_path / "port"
    proc = subprocess.Popen([sys.executable, str(SUPPORT / "host_peers.py"), "http", "--root",
                             str(tmp_path / "www"), "--port-file", str(port_file)])
    try:
        deadline = time.monotonic() + 10
        while not port_file.exists():
            assert time.monotonic() < deadline and proc.poll() is None, "HTTP peer failed"
            time.sleep(0.02)
        yield int(port_file.read_text()), hashlib.sha256(data).hexdigest()
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("mtu", [1500, 65520])
@pytest.mark.parametrize("vnet", [True, False], ids=["vnet-hdr", "plain"])
def test_dhcp_and_download_through_interface_leave_host_untouched(
        veth_guest, http_peer, mtu: int, vnet: bool) -> None:
    guest = veth_guest(mtu)
    before = host_view(guest.near)
    relay = serve("--interface", guest.near, *(() if vnet else ("--no-vnet-hdr",)))
    try:
        wait_serving(relay)
        lease = guest.dhcp()
        assert lease["ip"] == "10.0.2.15" and lease["router"] == GATEWAY
        assert lease["mtu"] == str(mtu)  # the interface's MTU, since --mtu was not given
        port, digest = http_peer
        done = guest.run("sh", "-c", f"curl -sS --fail http://{GATEWAY}:{port}/big.bin "
                                     "| sha256sum")
        assert done.returncode == 0, done.stderr
        assert done.stdout.split()[0] == digest
        # The socket's promiscuous membership, which the kernel drops when it closes.
        assert "promiscuity 1 " in sh("ip", "-d", "-o", "link", "show", guest.near)
    finally:
        stats, err = stop_and_stats(relay)
    assert host_view(guest.near) == before, err
    assert stats["dhcp_replies"] >= 2 and stats["tcp_flows_opened"] == 1, err
    # --stats prints the counters that are not zero (and the gauges): absent is 0.
    assert stats.get("interface_frames_truncated", 0) == 0, err
    assert stats.get("transport_lost", 0) == 0, err
    if vnet and mtu == 1500:  # GSO super-frames toward the guest, not MSS segments
        assert stats["frames_out"] < SIZE // (mtu - 40), stats


@pytest.mark.parametrize("how", ["delete", "down"])
def test_interface_removed_or_down_ends_the_transport(veth_guest, how: str) -> None:
    guest = veth_guest()
    relay = serve("--interface", guest.near)
    try:
        wait_serving(relay)
        guest.dhcp()
        if how == "delete":
            sh("ip", "link", "del", guest.near)
        else:
            sh("ip", "link", "set", guest.near, "down")
        _, err = relay.communicate(timeout=10)
    finally:
        if relay.poll() is None:
            relay.kill()
            relay.wait()
    assert relay.returncode == 0, err
    assert f"interface {guest.near}" in err and "down or removed" in err, err
    assert parse_stats(err)["transport_lost"] == 1, err


def test_missing_interface_is_named_and_exit_status_1() -> None:
    done = subprocess.run([sys.executable, "-m", "relaynat", "serve", "--interface",
                           "rnnosuch0"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "'rnnosuch0' does not exist" in done.stderr, done.stderr


@pytest.mark.parametrize(("name", "problem"), [
    ("a" * 16, "longer than 15"), ("eth/0", "contains '/'"), ("", "empty")])
def test_bad_interface_name_is_refused_with_usage_error(name: str, problem: str) -> None:
    done = subprocess.run([sys.executable, "-m", "relaynat", "serve", "--interface", name],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert problem in done.stderr, done.stderr


def test_mtu_above_the_interfaces_is_refused(veth_guest) -> None:
    guest = veth_guest(1500)
    done = subprocess.run([sys.executable, "-m", "relaynat", "serve", "--interface",
                           guest.near, "--mtu", "9000"], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 2
    assert f"larger than the MTU of interface {guest.near} (1500)" in done.stderr, done.stderr


def test_interface_that_is_down_is_refused(veth_guest) -> None:
    guest = veth_guest()
    sh("ip", "link", "set", guest.near, "down")
    done = subprocess.run([sys.executable, "-m", "relaynat", "serve", "--interface",
                           guest.near], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert f"'{guest.near}' is down" in done.stderr, done.stderr
