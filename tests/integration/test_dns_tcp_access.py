"""The DNS-over-TCP responder serves the guest and no one else.

With static records the relay points the guest's DNS-over-TCP connections at a small
server on the host's 127.0.0.1 (host/dns_tcp.py). Any local process can connect to that port;
it must get no answer, whatever its uid (another user's, nobody's, even root's: only
connections the relay itself made for its guest are served), while `dig +tcp` in a
namespace guest behind `relaynat run` still gets its answer before and after.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.faultkit import LiveRun

pytestmark = pytest.mark.integration

NAME, ADDR = "static.test", "192.0.2.77"


def listening_loopback_ports(pid: int) -> list[int]:
    """TCP ports process `pid` listens on at 127.0.0.1 (proc(5): /proc/PID/net/tcp,
    matched to its descriptors by socket inode)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = []
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if state == "0A" and inode in inodes and local.startswith("0100007F:"):
            ports.append(int(local.split(":")[1], 16))
    return ports


def local_client(port: int, user: int | None) -> tuple[int, str]:
    """`dig +tcp` on the host, as `user` (None: as this test, root), straight at the
    responder's port: its exit status (0 answered, 9 no reply) and output."""
    done = subprocess.run(["dig", "@127.0.0.1", "-p", str(port), "+tcp", "+short",
                           "+tries=1", "+time=3", NAME, "A"],
                          user=user, capture_output=True, text=True, timeout=30)
    return done.returncode, done.stdout + done.stderr


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the guest command may write whatever uid it runs as on the host
    (`relaynat run` may map its root to `nobody`; pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="rn-dns-tcp-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path)


def test_dns_over_tcp_answers_the_guest_and_no_local_user(shared_dir: Path) -> None:
    ready, go, first = shared_dir / "ready", shared_dir / "go", shared_dir / "first"
    dig = f"dig @10.0.2.3 +tcp +short +tries=1 +time=3 {NAME} A"
    script = (f"{dig} > {first}; touch {ready}; i=0; "
              f"while [ ! -e {go} ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done; "
              f"{dig}")
    run = LiveRun(["sh", "-c", script],
                  options=("--dns-upstream", "127.0.0.1", "--dns-record", f"{NAME}={ADDR}"))
    try:
        run.wait_file(ready)
        ports = listening_loopback_ports(run.pid)
        assert len(ports) == 1, ports  # the responder; no forwards were asked for
        nobody = local_client(ports[0], 65534)
        root = local_client(ports[0], None)
        go.touch()
        status, stats = run.finish()
    finally:
        run.kill()
    assert status == 0, run.stderr
    assert first.read_text().strip() == ADDR
    assert run.stdout.strip() == ADDR
    for status_out in (nobody, root):
        assert status_out[0] == 9 and ADDR not in status_out[1], status_out
    assert stats["dns_tcp_not_guest"] == 2
    assert stats["dns_tcp_static"] == 2
