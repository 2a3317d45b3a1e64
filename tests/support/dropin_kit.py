"""What the drop-in front ends' tests and benchmarks share: relaynat-slirp4netns and
relaynat-pasta run by the real rootlesskit and podman, or with their argv by hand.

Shell fragments for scenario.py's `run_scenario` (bash under `unshare -n -m`) or an
`unshare -m` shell, in the order a scenario uses them:

- `SCRATCH`: `set -eu`; `$dev`, a tmpfs only this mount namespace sees, and `cleanup`
  (the EXIT trap; a scenario that sets its own trap calls it);
- `TUN_0666`: /dev/net/tun mode 0666, as Debian ships it (0600 on this machine);
- `SUBIDS_NOBODY`: a subordinate id range for nobody (newuidmap/newgidmap);
- `RESOLV_LOOPBACK`: a resolv.conf naming 127.0.0.1, the front end's upstream;
- `SLIRP4NETNS_BINARY`: `$s4n`, the binary rootlesskit runs: `$BINARY`, or for
  `BINARY=relaynat` a wrapper running the tree's sources with nobody's Python
  (`$RELAYNAT_PATH`, `$GUEST_PYTHON`: `nobody_env`);
- `DNSMASQ`: a dnsmasq on 127.0.0.1 answering probe.test with 198.18.0.7, its queries
  logged to $dev/dns.log (`$dns` its PID);
- `http_peer(bind)`: host_peers.py's web server on $dev/www (`$PEERS`, `$http`), and
  `WAIT_PORT`, once the scenario's trap names `$http`: its port as `$port`;
- `NOBODY_NETNS`: `$as_nobody`, and `$target`, a process in a user namespace of nobody's
  owning a network namespace (rootlesskit's shape), killed on exit.

From Python: `free_port`, `netns_sleeper` (a process in a network namespace of its own),
`greeting_through` (a client in a namespace reaching a host listener), `relaynat_path`
and `nobody_env` (what nobody needs to run the tree's relaynat), `run_digest_scenario`
(a scenario reporting the digest of the bulk file it moves first).
"""

from __future__ import annotations

import os
import site
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from support import SUPPORT
from support.scenario import run_scenario

#: The tree's sources.
SRC = SUPPORT.parents[1] / "src"

SCRATCH = r"""
set -eu
dev=$(mktemp -d)
# The directory is a mount point only in this mount namespace: left behind, empty.
cleanup() { cd /; umount -l "$dev" 2>/dev/null || true; rmdir "$dev" 2>/dev/null || true; }
trap cleanup EXIT
mount -t tmpfs -o mode=755 tmpfs "$dev"
"""

TUN_0666 = r"""
# /dev/net/tun open to all, as Debian ships it, in this mount namespace only.
mknod -m 666 "$dev/tun" c 10 200
mount --bind "$dev/tun" /dev/net/tun
"""

SUBIDS_NOBODY = r"""
echo "nobody:200000:65536" > "$dev/subuid"
cp "$dev/subuid" "$dev/subgid"
mount --bind "$dev/subuid" /etc/subuid
mount --bind "$dev/subgid" /etc/subgid
"""

RESOLV_LOOPBACK = r"""
echo "nameserver 127.0.0.1" > "$dev/resolv.conf"
mount --bind "$dev/resolv.conf" /etc/resolv.conf
"""

SLIRP4NETNS_BINARY = r"""
if [ "$BINARY" = relaynat ]; then
    # nobody runs the system python with the tree's sources and the venv's packages.
    printf '#!/bin/sh\nexec env PYTHONPATH=%s %s -m relaynat.cli.slirp4netns "$@"\n' \
        "$RELAYNAT_PATH" "$GUEST_PYTHON" > "$dev/relaynat-slirp4netns"
    chmod 755 "$dev/relaynat-slirp4netns"
    s4n="$dev/relaynat-slirp4netns"
else
    s4n=$BINARY
fi
"""

DNSMASQ = r"""
dnsmasq --keep-in-foreground --no-resolv --no-hosts --listen-address=127.0.0.1 \
    --bind-interfaces --address=/probe.test/198.18.0.7 --log-queries \
    --log-facility="$dev/dns.log" --user=root --pid-file="$dev/dnsmasq.pid" &
dns=$!
"""

WAIT_PORT = r"""
for _ in $(seq 200); do [ -s "$dev/port" ] && break; sleep 0.05; done
port=$(cat "$dev/port")
"""

NOBODY_NETNS = r"""
as_nobody="setpriv --reuid=65534 --regid=65534 --clear-groups"
# A user namespace owned by nobody, owning a network namespace: rootlesskit's shape.
$as_nobody unshare -Urn sleep 60 &
target=$!
trap 'kill $target 2>/dev/null; cleanup' EXIT
while [ "$(readlink /proc/$target/ns/net)" = "$(readlink /proc/self/ns/net)" ]; do
    sleep 0.01
done
"""


def http_peer(bind: str = "") -> str:
    """host_peers.py's web server on $dev/www, bound to `bind` (its default: 127.0.0.1)."""
    where = f" --bind {bind}" if bind else ""
    return (f'\npython3 "$PEERS" http --root "$dev/www"{where} --port-file "$dev/port" &\n'
            "http=$!\n")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def netns_sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A process in a network namespace of its own (`unshare -n` executes `sleep`, so
    the PID is the sleep's), killed on leaving."""
    proc = subprocess.Popen(["unshare", "-n", "sleep", "120"])
    try:
        deadline = time.monotonic() + 5
        while os.readlink(f"/proc/{proc.pid}/ns/net") == os.readlink("/proc/self/ns/net"):
            assert time.monotonic() < deadline, "unshare -n did not make a namespace"
            time.sleep(0.01)
        yield proc
    finally:
        proc.kill()
        proc.wait()


def relaynat_path() -> str:
    """A PYTHONPATH with the tree's sources and this environment's packages."""
    return os.pathsep.join([str(SRC), *site.getsitepackages()])


def nobody_env() -> dict[str, str]:
    """RELAYNAT_PATH, GUEST_PYTHON and PEERS, for a scenario in which nobody runs the
    tree's relaynat; the test is skipped when nobody cannot import it here."""
    import pytest

    from support.relaynat_cli import guest_python

    path = relaynat_path()
    probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            "env", f"PYTHONPATH={path}", guest_python(), "-c",
                            "import relaynat.relay"], capture_output=True, cwd="/")
    if probe.returncode:
        pytest.skip("nobody cannot import relaynat and its dependencies here: "
                    + probe.stderr.decode()[-300:])
    return {"RELAYNAT_PATH": path, "GUEST_PYTHON": guest_python(),
            "PEERS": str(SUPPORT / "host_peers.py")}



def greeting_through(enter: Sequence[str], address: str, listener: socket.socket,
                     greeting: bytes) -> str:
    """What a client in a namespace prints after connecting to `address` at `listener`'s
    port: the greeting the host accepts it with. `enter` runs a command in the namespace
    (`nsenter -t PID -n`, `ip netns exec NAME`)."""
    port = listener.getsockname()[1]
    inside = subprocess.Popen(
        [*enter, sys.executable, "-c",
         f"import socket\ns=socket.create_connection(({address!r},{port}),timeout=5)\n"
         "print(s.recv(100).decode())\n"], stdout=subprocess.PIPE, text=True)
    conn, _ = listener.accept()
    with conn:
        conn.sendall(greeting)
    out, _ = inside.communicate(timeout=15)
    return out.strip()


def run_digest_scenario(script: str, env: Mapping[str, str], timeout: float,
                        ) -> tuple[str, list[str], str]:
    """`run_scenario` for a scenario whose first line is `big SHA256`, the digest of the
    bulk file it moves: that digest, the lines after it, and the whole output (for
    assertion messages). The scenario must succeed."""
    done = run_scenario(script, env=env, timeout=timeout)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    out = done.stdout.splitlines()
    digest = out[0].removeprefix("big ")
    assert len(digest) == 64, report
    return digest, out[1:], report
