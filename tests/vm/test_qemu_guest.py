"""A real Linux guest under qemu (TCG) on `relaynat serve`'s sockets: the qemu-stream
socket (`--socket`, qemu `-netdev stream`) and the unix datagram socket (`--unixgram`,
qemu `-netdev dgram`, the wire format vfkit and libkrun also speak).

The guest (tests/support/vmguest.py) boots once per variant and, in that one boot (TCG boots
cost seconds each), checks everything a guest on the relay's socket uses:

- DHCP, then an HTTP download of a random file from a server on the host's 127.0.0.1
  via the gateway 10.0.2.2, which the relay maps to host loopback (sha256 checked);
- DNS: busybox nslookup of a static record (`--dns-record`, A and AAAA) at 10.0.2.3
  and, over IPv6, at fd00::3;
- UDP both ways with content checked: busybox tftp downloads a random file from, and
  uploads one to, a TFTP server on the host's 127.0.0.1 (busybox-static's nc has no
  -u, and tftp is the busybox client that moves checked data over UDP);
- IPv6: the kernel's SLAAC address from the relay's router advertisement, ping6 to
  fd00::2 (the relay's ICMPv6 echo, on ping sockets at the host's ::1), and an HTTP
  download from a server on ::1 via http://[fd00::2]:PORT/.

Each step's exit status comes back as an `RN-RC <step> <status>` console line, so a
failure names its step. All of it runs in the test session's private network
namespace (tests/conftest.py); DNS forwarding goes to 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import http.server
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.relaynat_cli import parse_stats
from support.sysctl import ALL_GROUPS, ping_group_range
from support.vmguest import boot_vm, build_vm_images, vm_unavailable_reason

pytestmark = [pytest.mark.vm, pytest.mark.integration]

FILE_SIZE = 8 * 1024 * 1024
TFTP_GET_SIZE = 1024 * 1024
TFTP_PUT_SIZE = 256 * 1024
BOOT_TIMEOUT = 70.0
STATIC_NAME, STATIC_A, STATIC_AAAA = "static.test", "192.0.2.77", "fd00::77"


@pytest.fixture(scope="module", autouse=True)
def _ping_sockets_allowed() -> Iterator[None]:
    """The relay answers the guest's pings through host ping sockets (host/icmp_relay.py)."""
    with ping_group_range(ALL_GROUPS):
        yield


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class _HTTPServer6(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


@dataclasses.dataclass(frozen=True)
class HttpFile:
    port: int  # on 127.0.0.1
    port6: int  # on ::1
    name: str
    sha256: str


@pytest.fixture
def http_file(tmp_path: Path) -> Iterator[HttpFile]:
    """A random 8 MiB file served on 127.0.0.1 and on ::1."""
    root = tmp_path / "www"
    root.mkdir()
    data = os.urandom(FILE_SIZE)
    (root / "blob.bin").write_bytes(data)
    handler = functools.partial(_QuietHandler, directory=str(root))
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler),
               _HTTPServer6(("::1", 0), handler)]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    try:
        yield HttpFile(servers[0].server_address[1], servers[1].server_address[1],
                       "blob.bin", hashlib.sha256(data).hexdigest())
    finally:
        for s, t in zip(servers, threads, strict=True):
            s.shutdown()
            s.server_close()
            t.join(5)


# TFTP opcodes (RFC 1350, OACK from RFC 2347)
_RRQ, _WRQ, _DATA, _ACK, _ERROR, _OACK = 1, 2, 3, 4, 5, 6


class TftpServer:
    """A minimal TFTP server on 127.0.0.1 (octet mode, blksize and tsize options), one
    transfer at a time, for the guest's busybox tftp.

    It answers from its listening port instead of a fresh one per transfer (RFC 1350's
    TID): the relay, like a NAT without a TFTP helper, relays the guest's flow through
    one host socket connected to the address the guest sent to, so replies from another
    port would never reach the guest. busybox tftp accepts either.
    """

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.uploads: dict[str, bytes] = {}
        self.events: list[str] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        # Lost packets are retransmitted after this long without an answer.
        self.sock.settimeout(0.5)
        self.port: int = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def _serve(self) -> None:
        last: tuple[bytes, tuple[str, int]] | None = None
        xfer: dict[str, object] = {}
        while not self._stop.is_set():
            try:
                pkt, peer = self.sock.recvfrom(70000)
            except TimeoutError:
                if last is not None:
                    self.sock.sendto(*last)
                continue
            except OSError:
                return
            if len(pkt) < 4:
                continue
            op = struct.unpack_from("!H", pkt)[0]
            reply: bytes | None = None
            if op in (_RRQ, _WRQ):
                reply, xfer = self._request(op, pkt, peer)
            elif op == _ACK and xfer.get("kind") == "read" and xfer["peer"] == peer:
                reply = self._ack(struct.unpack_from("!H", pkt, 2)[0], xfer)
            elif op == _DATA and xfer.get("kind") == "write" and xfer["peer"] == peer:
                reply = self._data(struct.unpack_from("!H", pkt, 2)[0], pkt[4:], xfer)
            elif op == _ERROR:
                self.events.append(f"client error {pkt[4:]!r}")
            if reply is not None:
                self.sock.sendto(reply, peer)
            # Retransmit only while a transfer is under way: after its end the client
            # repeats its last packet itself if our answer was lost.
            last = (reply, peer) if reply is not None and not xfer.get("done") else None

    def _request(self, op: int, pkt: bytes, peer: tuple[str, int],
                 ) -> tuple[bytes, dict[str, object]]:
        parts = pkt[2:].split(b"\0")
        name = parts[0].decode()
        opts = {parts[i].decode().lower(): parts[i + 1].decode()
                for i in range(2, len(parts) - 2, 2)}
        self.events.append(f"{'RRQ' if op == _RRQ else 'WRQ'} {name} {opts}")
        blksize = min(int(opts.get("blksize", 512)), 65464)
        xfer: dict[str, object] = {"peer": peer, "name": name, "blksize": blksize}
        answered = {}
        if "blksize" in opts:
            answered["blksize"] = str(blksize)
        if "tsize" in opts:  # RFC 2349: the size of the file read, or echoed for a write
            answered["tsize"] = str(len(self.files.get(name, b""))) if op == _RRQ else opts["tsize"]
        oack = b"".join(f"{k}\0{v}\0".encode() for k, v in answered.items())
        if op == _RRQ:
            if name not in self.files:
                return struct.pack("!HH", _ERROR, 1) + b"file not found\0", {}
            xfer.update(kind="read", data=self.files[name])
            if oack:
                return struct.pack("!H", _OACK) + oack, xfer  # the client ACKs block 0
            return self._ack(0, xfer) or b"", xfer
        xfer.update(kind="write", buf=bytearray(), expect=1)
        return (struct.pack("!H", _OACK) + oack if oack else struct.pack("!HH", _ACK, 0)), xfer

    def _ack(self, block: int, xfer: dict[str, object]) -> bytes | None:
        data, blksize = xfer["data"], xfer["blksize"]
        assert isinstance(data, bytes) and isinstance(blksize, int)
        if block * blksize > len(data):  # the last (short) block was acknowledged
            if not xfer.get("done"):
                xfer["done"] = True
                self.events.append(f"sent {xfer['name']} {len(data)}")
            return None
        chunk = data[block * blksize:(block + 1) * blksize]
        return struct.pack("!HH", _DATA, (block + 1) & 0xFFFF) + chunk

    def _data(self, block: int, payload: bytes, xfer: dict[str, object]) -> bytes | None:
        buf, expect, blksize = xfer["buf"], xfer["expect"], xfer["blksize"]
        assert isinstance(buf, bytearray) and isinstance(expect, int)
        if block == expect & 0xFFFF:
            buf += payload
            xfer["expect"] = expect + 1
            if len(payload) < blksize:
                xfer["done"] = True
                self.uploads[str(xfer["name"])] = bytes(buf)
                self.events.append(f"received {xfer['name']} {len(buf)}")
        return struct.pack("!HH", _ACK, block)  # duplicates are acknowledged again


@pytest.fixture
def tftp_server() -> Iterator[TftpServer]:
    server = TftpServer({"get.bin": os.urandom(TFTP_GET_SIZE)})
    yield server
    server.close()


# variant -> (qemu -netdev kind, guest MTU, relaynat serve options before the socket path)
VARIANTS = {
    "stream": ("stream", 65520, ["--socket"]),
    "dgram": ("dgram", 65520, ["--unixgram"]),
    # 1500-byte frames: ~6000 datagrams toward qemu, whose socket queues only 10.
    "dgram-mtu1500": ("dgram", 1500, ["--mtu", "1500", "--unixgram"]),
}
# Static records the guest looks up; upstream forwarding stays on loopback, where
# nothing answers, so no query can leave the test's namespace.
DNS_OPTIONS = ["--dns-upstream", "127.0.0.1",
               "--dns-record", f"{STATIC_NAME}={STATIC_A}",
               "--dns-record", f"{STATIC_NAME}={STATIC_AAAA}"]


@dataclasses.dataclass
class RelayServe:
    netdev: str
    mtu: int
    path: str
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> dict[str, int]:
        """SIGTERM the relay; its --stats counters."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return parse_stats(self.log.read_text(errors="replace"))


@pytest.fixture(params=list(VARIANTS))
def relay_socket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RelayServe]:
    """`relaynat serve --socket|--unixgram <tmp>/q.sock` running."""
    netdev, mtu, options = VARIANTS[request.param]
    sock = tmp_path / "q.sock"
    log = tmp_path / "relay.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relaynat", "serve", "--stats", "--log-level", "info",
             *DNS_OPTIONS, *options, str(sock)],
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    relay = RelayServe(netdev, mtu, str(sock), proc, log)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if proc.poll() is not None:
                pytest.fail(f"relaynat serve exited with {proc.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"relaynat serve did not create {sock}:\n{log.read_text()}")
            time.sleep(0.05)
        yield relay
    finally:
        relay.stop()
        print(f"--- relay log ---\n{log.read_text(errors='replace')}")


@pytest.fixture(scope="module")
def vm_images():
    reason = vm_unavailable_reason()
    if reason:
        # install.sh builds the images; a missing one is a broken install, not a skip.
        pytest.fail(f"qemu guest unavailable: {reason}")
    return build_vm_images(fetch=False)


# The guest's SLAAC address: fd00::/64 from the RA plus the EUI-64 of vmguest's MAC
# 52:54:00:12:34:56 (the kernel's default addr_gen_mode).
GUEST_SLAAC = "fd00::5054:ff:fe12:3456"


def guest_script(http: HttpFile, tftp_port: int, blksize: int) -> str:
    """The guest's checks, run in order; each ends with `RN-RC <step> <status>` (output
    between `RN-STEP <step>` and that line belongs to the step) and the script exits 1
    if any step failed, so one boot reports every failure."""
    name = http.name
    return f"""\
fail=0
step() {{ echo "RN-STEP $1"; }}
rc() {{ echo "RN-RC $1 $2"; [ "$2" = 0 ] || fail=1; }}
step addr4; ip -4 addr show dev eth0; rc addr4 $?
step wget4; wget -q -O /tmp/{name} http://10.0.2.2:{http.port}/{name}; rc wget4 $?
sha256sum /tmp/{name}; rm -f /tmp/{name}
step dns4; nslookup {STATIC_NAME} 10.0.2.3; rc dns4 $?
step tftp-get; tftp -g -b {blksize} -r get.bin -l /tmp/get.bin 10.0.2.2 {tftp_port}; rc tftp-get $?
sha256sum /tmp/get.bin
head -c {TFTP_PUT_SIZE} /dev/urandom > /tmp/put.bin
sha256sum /tmp/put.bin
step tftp-put; tftp -p -b {blksize} -l /tmp/put.bin -r put.bin 10.0.2.2 {tftp_port}; rc tftp-put $?
# The kernel configures the address from the relay's RA on its own; wait until it is
# there and past duplicate address detection (not "tentative"), at most 10 s.
step slaac; i=0
until ip -6 addr show dev eth0 | grep 'inet6 {GUEST_SLAAC}/64' | grep -qv tentative; do
    i=$((i + 1)); [ $i -gt 100 ] && break; sleep 0.1
done
read -r up _ </proc/uptime; echo "RN-TIME slaac $up"
ip -6 addr show dev eth0; ip -6 route show; [ $i -le 100 ]; rc slaac $?
step ping6; ping6 -c 3 -i 0.2 -W 5 fd00::2; rc ping6 $?
step dns6; nslookup {STATIC_NAME} fd00::3; rc dns6 $?
step wget6; wget -q -O /tmp/{name} http://[fd00::2]:{http.port6}/{name}; rc wget6 $?
sha256sum /tmp/{name}
exit $fail
"""


_STEP_RE = re.compile(r"^RN-STEP (\S+)\n(.*?)^RN-RC \1 (\d+)$", re.M | re.S)


def steps(output: str) -> dict[str, tuple[int, str]]:
    """step -> (exit status, its output) from the guest script's markers."""
    return {m.group(1): (int(m.group(3)), m.group(2)) for m in _STEP_RE.finditer(output)}


def test_guest_dhcp_dns_tcp_udp_ipv6_through_relay(
    vm_images, http_file: HttpFile, tftp_server: TftpServer, relay_socket: RelayServe,
) -> None:
    relay = relay_socket
    name, digest = http_file.name, http_file.sha256
    # The largest TFTP block (RFC 2348 allows up to 65464) whose datagram fits the MTU
    # unfragmented: 20 bytes IPv4, 8 UDP, 4 TFTP header.
    blksize = min(65464, relay.mtu - 32)
    command = guest_script(http_file, tftp_server.port, blksize)
    result = boot_vm(relay.path, command, timeout=BOOT_TIMEOUT, images=vm_images,
                     netdev=relay.netdev)
    print(f"--- guest console ({result.duration:.1f}s, times {result.times}) ---")
    print(result.console)
    print(f"--- tftp server: {tftp_server.events}")

    assert not result.timed_out, f"guest timed out after {BOOT_TIMEOUT}s:\n{result.console}"
    assert result.dhcp_ok, f"no DHCP lease:\n{result.console}"
    assert result.lease.get("ip") == "10.0.2.15", result.lease
    assert result.lease.get("router") == "10.0.2.2", result.lease
    addrs = re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/(\d+)", result.output)
    assert addrs == [("10.0.2.15", "24")], result.output
    done = steps(result.output)
    expected = ["addr4", "wget4", "dns4", "tftp-get", "tftp-put", "slaac", "ping6", "dns6",
                "wget6"]
    assert list(done) == expected, f"steps missing from the guest's report:\n{result.output}"
    failed = {step: out for step, (status, out) in done.items() if status != 0}
    assert not failed, f"guest steps failed: {failed}\n{result.console}"
    assert result.exit_status == 0, result.console

    # TCP over IPv4: the file arrived intact.
    assert f"{digest}  /tmp/{name}" in result.output, result.output
    # DNS: both static records at the IPv4 and at the IPv6 DNS address.
    for step in ("dns4", "dns6"):
        # (the "Address:" right after "Server:" is the server's own)
        answers = re.findall(rf"^Name:\s+{re.escape(STATIC_NAME)}\nAddress:\s+(\S+)$",
                             done[step][1], re.M)
        assert sorted(answers) == sorted([STATIC_A, STATIC_AAAA]), done[step][1]
    # UDP host -> guest: the guest's sha256 of the downloaded file matches.
    get_digest = hashlib.sha256(tftp_server.files["get.bin"]).hexdigest()
    assert f"{get_digest}  /tmp/get.bin" in result.output, result.output
    # UDP guest -> host: what the server received matches the guest's sha256.
    m = re.search(r"^([0-9a-f]{64})  /tmp/put.bin$", result.output, re.M)
    assert m, result.output
    put = tftp_server.uploads.get("put.bin")
    assert put is not None, f"no upload completed: {tftp_server.events}"
    assert len(put) == TFTP_PUT_SIZE and hashlib.sha256(put).hexdigest() == m.group(1)
    # IPv6: the SLAAC address, every echo answered, the file intact over TCP/IPv6.
    assert re.search(rf"inet6 {GUEST_SLAAC}/64 scope global", done["slaac"][1]), done["slaac"]
    assert "3 packets transmitted, 3 packets received" in done["ping6"][1], done["ping6"][1]
    assert result.output.count(f"{digest}  /tmp/{name}") == 2, result.output

    stats = relay.stop()
    print(f"--- relay stats: {stats}")
    # The relay itself did the work (not, say, a leftover route in the guest).
    assert stats.get("dns_static_answers", 0) >= 4, stats
    assert stats.get("ndp_ra_sent", 0) >= 1, stats
    assert stats.get("icmp_echo_replies", 0) >= 3, stats
    assert stats.get("udp_to_guest_bytes", 0) >= TFTP_GET_SIZE, stats
    assert stats.get("udp_to_host_bytes", 0) >= TFTP_PUT_SIZE, stats
    if relay.netdev == "dgram":
        assert stats.get("unixgram_peers") == 1, stats
        assert stats.get("unixgram_drop_send_full", 0) == 0, stats
