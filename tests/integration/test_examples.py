"""The launcher recipes in examples/, run as they are (the files themselves, with
`RELAYNAT` pointing at this checkout), each against the real launcher where this
machine has it:

- qemu_launcher.py (relay in-process, qemu on a socketpair) and qemu_dgram.sh boot the
  TCG guest of vmguest.py (one boot each, the only two boots here), which downloads a
  file from a server on the host's 127.0.0.1 via the gateway 10.0.2.2 and hashes it;
- qemu_stream.sh starts a real qemu paused (`-S`): its `-netdev stream` line is accepted
  and connects to the relay (the stream data path is the launcher's boot);
- vfkit_unixgram.sh (no vfkit/krunkit/libkrun on Linux) is driven by the wire-format
  client of test_unixgram.py: VFKT handshake, then DHCP;
- firecracker_tap.sh (no KVM for Firecracker here) serves a veth whose far end is a guest
  namespace, as in test_interface.py, and creates a TAP when the name is missing;
- container_netns.sh runs curl in a `relaynat run` namespace with a port forwarded back,
  and attaches to an existing `ip netns` namespace through a veth pair.

Everything runs in the test session's private network namespace; traffic goes to
loopback and to namespaces the tests create.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dpkt
import pytest
from support import SUPPORT
from support.relaynat_cli import guest_python, parse_stats, stop_and_stats
from support.vmguest import VmResult, guest_boot_args
from vm.test_qemu_guest import vm_images  # noqa: F401  (a fixture)

from integration.test_interface import GATEWAY, VethGuest, host_view, http_peer, veth_guest  # noqa: F401
from integration.test_stream_transport import discover
from integration.test_unixgram import offer_for, unixgram_client
from relaynat.transports.tap import open_tap

pytestmark = pytest.mark.integration
pytest_plugins = ["support.guest_fs"]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BOOT_TIMEOUT = 90.0
#: The recipes run relaynat as "$RELAYNAT" (split on spaces): this interpreter, so the
#: checkout under test (PYTHONPATH) is what they run.
ENV = {**os.environ, "RELAYNAT": f"{sys.executable} -m relaynat"}


def _kill_group(proc: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    """The recipe and everything it started (relay, qemu), if still there."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def recipe(*argv: str | Path, text: bool = True,
           env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """An example running in a session of its own (output piped), killed with its
    children if the test leaves it running."""
    proc = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=text,
                            env={**ENV, **(env or {})}, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            _kill_group(proc)


def wait_for(what: str, check, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Poll `check()` until true; fail naming `what` if the recipe exits or time runs out."""
    deadline = time.monotonic() + timeout
    while not check():
        if proc.poll() is not None:
            pytest.fail(f"{what}: the recipe exited with {proc.returncode}:\n"
                        f"{proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {timeout} s")
        time.sleep(0.05)


def read_until(proc: subprocess.Popen[str], pattern: str) -> re.Match[str]:
    """The first stderr line of the recipe matching `pattern` (bounded: 200 lines)."""
    seen = ""
    for _ in range(200):
        line = proc.stderr.readline()  # type: ignore[union-attr]
        seen += line
        if m := re.search(pattern, line):
            return m
        if not line:
            break
    pytest.fail(f"no line matching {pattern!r} on the recipe's stderr:\n{seen}")


# --------------------------------------------------------------------------- qemu


@pytest.fixture
def blob(start_peer, tmp_path: Path) -> tuple[int, str]:
    """A random 4 MiB file on an HTTP server on the host's 127.0.0.1: (port, sha256)."""
    data = os.urandom(4 << 20)
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "blob.bin").write_bytes(data)
    return start_peer("http", "--root", str(tmp_path / "www")), hashlib.sha256(data).hexdigest()


@pytest.mark.vm
@pytest.mark.parametrize("example", ["qemu_launcher.py", "qemu_dgram.sh"])
def test_qemu_recipe_boots_a_guest_that_downloads_through_the_relay(
        vm_images, blob: tuple[int, str], tmp_path: Path, example: str) -> None:  # noqa: F811
    port, digest = blob
    command = (f"wget -q -O /tmp/blob.bin http://{GATEWAY}:{port}/blob.bin && "
               "sha256sum /tmp/blob.bin")
    append, initrd = guest_boot_args(vm_images, command, tmp_path)
    kernel, cmdline = str(vm_images.kernel), " ".join(append)
    if example == "qemu_launcher.py":
        argv: list[str | Path] = [sys.executable, EXAMPLES / example, "--kernel", kernel,
                                  "--initrd", initrd, "--append", cmdline, "--accel", "tcg"]
        env = {}
    else:  # no KVM here: TCG, as vmguest.py boots it
        argv, env = [EXAMPLES / example, kernel, initrd, cmdline], {"QEMU_ACCEL": "tcg"}
    start = time.monotonic()
    with recipe(*argv, text=False, env=env) as proc:
        try:
            out, err = proc.communicate(timeout=BOOT_TIMEOUT)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, err = proc.communicate()
    result = VmResult.from_console(out, timed_out=proc.returncode is None,
                                   returncode=proc.returncode,
                                   duration=time.monotonic() - start,
                                   command_line=[str(a) for a in argv])
    log = f"{result.console}\n--- stderr ---\n{err.decode(errors='replace')}"
    assert result.dhcp_ok and result.lease.get("ip") == "10.0.2.15", log
    assert result.exit_status == 0, log
    assert f"{digest}  /tmp/blob.bin" in result.output, log
    assert proc.returncode == 0, log  # qemu's status, passed on by the recipe
    stats = parse_stats(err.decode(errors="replace"))
    assert stats.get("dhcp_replies", 0) >= 2 and stats.get("tcp_flows_opened") == 1, log
    if example == "qemu_dgram.sh":
        assert stats.get("unixgram_peers") == 1, log
    else:  # the launcher reports its guest's lease from the relay's events
        assert b"relaynat: guest ready at 10.0.2.15" in err, log


def _unix_connected(path: Path) -> bool:
    """A connected (state 03) socket bound at `path`: the relay's accepted end of
    qemu's connection (/proc/net/unix lists the server side under the path)."""
    with open("/proc/net/unix") as f:
        return any(line.split()[5] == "03" and line.rstrip().endswith(" " + str(path))
                   for line in f.readlines()[1:] if len(line.split()) >= 8)


def test_qemu_stream_recipe_connects_a_real_qemu(vm_images, tmp_path: Path) -> None:  # noqa: F811
    sock = tmp_path / "relay.sock"
    # -S: qemu sets up its devices (the netdev connects) but never runs the guest.
    env = {"RELAYNAT_SOCK": str(sock), "QEMU_ACCEL": "tcg", "QEMU_EXTRA": "-S"}
    with recipe(EXAMPLES / "qemu_stream.sh", vm_images.kernel, vm_images.initrd,
                env=env) as proc:
        wait_for("qemu connected to the relay's stream socket",
                 lambda: _unix_connected(sock), proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 143, err  # stopped by the signal, after cleaning up
    stats = parse_stats(err)
    assert stats.get("stream_clients") == 1, err
    assert not sock.exists(), "the relay removes its socket when it stops"


# --------------------------------------------------------------------------- vfkit


def test_vfkit_recipe_answers_dhcp_after_the_vfkt_handshake(tmp_path: Path) -> None:
    sock = tmp_path / "relay.dgram"
    with recipe(EXAMPLES / "vfkit_unixgram.sh", sock) as proc:
        device = read_until(proc, r"vfkit:\s+--device (\S+)").group(1)
        assert device == f"virtio-net,unixSocketPath={sock},mac=52:54:00:12:34:56"
        wait_for("the relay's datagram socket", sock.exists, proc)
        client = unixgram_client(tmp_path / "vm.dgram", str(sock))  # sends VFKT first
        with client:
            offer = offer_for(client, str(sock), 0x5EED)
        assert socket.inet_ntoa(offer.yiaddr.to_bytes(4, "big")) == "10.0.2.15"
        stats, err = stop_and_stats(proc)
    assert stats["unixgram_peers"] == 1 and stats["dhcp_offer"] == 1, err


# --------------------------------------------------------------------------- TAP


def test_firecracker_recipe_serves_a_veth_guest(veth_guest, http_peer) -> None:  # noqa: F811
    guest = veth_guest(1500)
    before = host_view(guest.near)
    port, digest = http_peer
    with recipe(EXAMPLES / "firecracker_tap.sh", guest.near, "--log-level", "info") as proc:
        read_until(proc, "serving interface " + guest.near)
        lease = guest.dhcp()
        assert lease["ip"] == "10.0.2.15" and lease["router"] == GATEWAY, lease
        done = guest.run("sh", "-c", f"curl -sS --fail http://{GATEWAY}:{port}/big.bin "
                                     "| sha256sum")
        assert done.returncode == 0, done.stderr
        assert done.stdout.split()[0] == digest
        stats, err = stop_and_stats(proc)
    assert stats["tcp_flows_opened"] == 1 and stats["dhcp_replies"] >= 2, err
    # The near end existed: the recipe created nothing and changed no address or route.
    assert host_view(guest.near) == before


def dhcp_offer_on_tap(fd: int, xid: int, timeout: float = 10.0) -> dpkt.dhcp.DHCP:
    """Send a DHCP discover into a TAP as a VM's NIC would, again each second until an
    offer comes as a client retransmits (RFC 2131 §4.1); the relay's offer."""
    deadline = time.monotonic() + timeout
    resend = 0.0
    while (left := deadline - time.monotonic()) > 0:
        if time.monotonic() >= resend:
            os.write(fd, discover(xid))
            resend = time.monotonic() + 1.0
        if not select.select([fd], [], [], min(left, 1.0))[0]:
            continue
        ip = dpkt.ethernet.Ethernet(os.read(fd, 70000)).data
        if isinstance(ip, dpkt.ip.IP) and isinstance(ip.data, dpkt.udp.UDP) \
                and ip.data.sport == 67 and (reply := dpkt.dhcp.DHCP(ip.data.data)).xid == xid:
            return reply
    pytest.fail("no DHCP offer on the TAP")


def test_firecracker_recipe_creates_a_missing_tap() -> None:
    name = f"rnfc{os.getpid() % 100000}"
    try:
        with recipe(EXAMPLES / "firecracker_tap.sh", name, "--log-level", "info") as proc:
            read_until(proc, "serving interface " + name)
            link = subprocess.run(["ip", "-d", "link", "show", name], capture_output=True,
                                  text=True, check=True).stdout
            assert "tun type tap" in link and "addrgenmode none" in link, link
            fd, _, _ = open_tap(name, want_vnet_hdr=False)  # the VMM's end of the TAP
            try:
                offer = dhcp_offer_on_tap(fd, 0x7A9)
            finally:
                os.close(fd)
            assert socket.inet_ntoa(offer.yiaddr.to_bytes(4, "big")) == "10.0.2.15"
            stats, err = stop_and_stats(proc)
        assert stats["dhcp_offer"] == 1, err
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True)


# --------------------------------------------------------------------------- netns


@pytest.mark.parametrize(("options", "seen_from"), [
    # A client on the host's loopback is spliced to the guest's loopback, as pasta does
    # (test_splice_forward.py); through the guest's link it comes from the gateway.
    ((), "127.0.0.1"),
    (("--no-splice",), GATEWAY),
])
def test_container_run_recipe_reaches_the_host_and_is_reached_through_a_forward(
        http_peer, guest_dir: Path, options: tuple[str, ...],  # noqa: F811
        seen_from: str) -> None:
    port, digest = http_peer
    ready = guest_dir / "ready"
    guest = (f"curl -sS --fail http://{GATEWAY}:{port}/big.bin | sha256sum && "
             f"exec {guest_python()} {SUPPORT / 'guest_tools.py'} peer-echo 80 --events 1 "
             f"--ready {ready}")
    payload = os.urandom(1 << 20)
    with recipe(EXAMPLES / "container_netns.sh", "run", *options, "-t", "0:80", "--",
                "sh", "-c", guest) as proc:
        host_port = int(read_until(proc, r"forwarding tcp \S+ port (\d+) to guest port 80")
                        .group(1))
        wait_for("the guest's server on port 80", ready.exists, proc, timeout=60)
        with socket.create_connection(("127.0.0.1", host_port), timeout=20) as conn:
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
            reply = b"".join(iter(lambda: conn.recv(4096), b"")).decode()
        out, err = proc.communicate(timeout=20)
    peer, sha, length = reply.split()
    assert (sha, int(length)) == (hashlib.sha256(payload).hexdigest(), len(payload)), reply
    assert peer.endswith(seen_from), reply
    assert proc.returncode == 0, err
    assert out.split()[0] == digest, out


def test_container_attach_recipe_serves_an_existing_namespace(
        http_peer, tmp_path: Path) -> None:  # noqa: F811
    tag = f"{os.getpid() % 100000}"
    ns, near = f"rnct{tag}", f"rnh{tag}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    guest = VethGuest.adopt(tmp_path, ns, near)
    try:
        with recipe(EXAMPLES / "container_netns.sh", "attach", ns, "eth0",
                    "--log-level", "info", env={"HOST_IF": near, "MTU": "1500"}) as proc:
            read_until(proc, "serving interface " + near)
            lease = guest.dhcp()
            assert lease["ip"] == "10.0.2.15" and lease["mtu"] == "1500", lease
            port, digest = http_peer
            done = guest.run("sh", "-c", f"curl -sS --fail http://{GATEWAY}:{port}/big.bin "
                                         "| sha256sum")
            assert done.returncode == 0, done.stderr
            assert done.stdout.split()[0] == digest
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=20)
        assert proc.returncode == 143, err
        assert parse_stats(err)["tcp_flows_opened"] == 1, err
        gone = subprocess.run(["ip", "link", "show", near], capture_output=True)
        assert gone.returncode != 0, "the recipe deletes its veth pair on exit"
    finally:
        guest.close()


# --------------------------------------------------------------------- sandbox runtime


def test_sandbox_runtime_gives_each_sandbox_its_policy_and_audits_it(
        http_peer, tmp_path: Path) -> None:  # noqa: F811
    """examples/sandbox_runtime.py: two commands, one loop, one relay each. Each
    downloads from the allowed host port and is refused the other one by its policy
    (the listener there accepts nothing); the audit file holds each sandbox's events."""
    port, digest = http_peer
    other = socket.create_server(("127.0.0.1", 0))
    other.setblocking(False)
    other_port = other.getsockname()[1]
    audit = tmp_path / "audit.jsonl"
    guest = (f"curl -sS --fail http://{GATEWAY}:{port}/big.bin | sha256sum; "
             f"curl -s --max-time 10 http://{GATEWAY}:{other_port}/; "
             "echo denied-exit=$?")
    with other:
        done = subprocess.run(
            [sys.executable, str(EXAMPLES / "sandbox_runtime.py"), "--sandboxes", "2",
             "--allow-host-port", str(port), "--audit", str(audit), "--", "sh", "-c", guest],
            capture_output=True, text=True, timeout=120, env=ENV)
        with pytest.raises(BlockingIOError):
            other.accept()
    assert done.returncode == 0, done.stderr
    assert done.stdout.split().count(digest) == 2, done.stdout
    assert done.stdout.count("denied-exit=7") == 2, done.stdout  # curl: could not connect
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    for name in ("sandbox-0", "sandbox-1"):
        mine = [e for e in events if e["guest"] == name]
        opened = [e for e in mine if e["kind"] == "flow_opened" and e["protocol"] == "tcp"]
        assert [e["far"] for e in opened] == [[GATEWAY, port]], mine
        denied = [e for e in mine if e["kind"] == "flow_denied"]
        assert [(e["far"], e["comment"]) for e in denied] == [
            ([GATEWAY, other_port], "host loopback")], mine
        closed = [e for e in mine if e["kind"] == "flow_closed" and e["protocol"] == "tcp"]
        assert len(closed) == 1 and closed[0]["bytes_to_guest"] > 1 << 20, closed
    assert "sandbox-0: exit 0, flows opened" in done.stderr, done.stderr
