"""The compared setups of the benchmark suite (benches/run.py), each kept up for a whole
series of workloads: a guest network namespace that lives as long as the context.

Every setup starts a guest that only sleeps (`... -- sleep infinity`) and each workload
enters its network namespace with `nsenter -n`. That is what lets one workload hold
10,000 idle connections open while another runs iperf3 through the same relay, and lets
us read the relay process's RSS between workloads.

pasta (passt 0.0~git20230309) needs three things here. It maps the gateway address to the
host's loopback by default, so the guest dials 10.0.2.2 through pasta's tap path (its
loopback "splice" path only serves ports forwarded with -T); automatic forwarding
(-t/-u/-T/-U, default auto) is turned off since nothing needs it. It refuses to start
without a host interface that has a default route, so `common.stub_uplink` adds a veth
pair with 192.0.2.1/24 (TEST-NET-1) and a default route to nowhere inside the private
namespace. And as root it needs `--runas 0:0`: as "nobody" it cannot set up the user
namespace it creates for the command.

Process and namespace helpers (spawned, guest_netns, stub_uplink, ...) are common.py's.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from common import (
    REPO_SRC,
    SETUP_TIMEOUT,
    VETH_GUEST,
    VETH_HOST,
    VETH_PREFIX,
    BenchError,
    Proc,
    guest_netns,
    in_netns,
    ip,
    require,
    run_cmd,
    spawned,
    stub_uplink,
)

RELAY_GUEST, RELAY_GATEWAY = "10.0.2.15", "10.0.2.2"


@dataclass(frozen=True)
class SetupOptions:
    mtu: int
    pasta_bin: str | None = None  # the "pasta-new" setup's binary


@dataclass
class Guest:
    """A running setup: how to run a command in its guest and what to measure."""

    name: str
    prefix: list[str]  # argv prefix running the rest inside the guest netns
    target: str  # address the guest dials to reach the host side's loopback servers
    server_bind: str  # address the host-side servers listen on
    relay_pid: int | None  # the process whose RSS is "the relay" (None: kernel veth)
    relay_cmd: list[str] = field(default_factory=list)


def _children() -> dict[int, list[int]]:
    """ppid -> child pids, from /proc (for finding a relay's guest `sleep`)."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            # comm may hold spaces or parentheses: the fields after the last ")" are safe.
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def _guest_sleep(root: int) -> int | None:
    """A `sleep` descendant of `root` living in another network namespace than ours."""
    ours = os.readlink("/proc/self/ns/net")
    tree = _children()
    todo = list(tree.get(root, []))
    while todo:
        pid = todo.pop()
        todo.extend(tree.get(pid, []))
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
            if comm == "sleep" and os.readlink(f"/proc/{pid}/ns/net") != ours:
                return pid
    return None


def _wait_guest(what: str, relay: Proc) -> int:
    deadline = time.monotonic() + SETUP_TIMEOUT
    while True:
        pid = _guest_sleep(relay.pid)
        if pid is not None:
            return pid
        if relay.popen.poll() is not None:
            raise BenchError(f"{what} exited with {relay.popen.returncode}: {relay.log_tail()}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: guest not up after {SETUP_TIMEOUT:.0f}s")
        time.sleep(0.05)


def _wait_link(pid: int, what: str) -> None:
    """Wait until the guest has its default route (the relay configured it)."""
    deadline = time.monotonic() + SETUP_TIMEOUT
    while time.monotonic() < deadline:
        res = subprocess.run([*in_netns(pid), "ip", "-4", "route", "show", "default"],
                             capture_output=True, timeout=10, check=False)
        if res.stdout.strip():
            return
        time.sleep(0.05)
    raise BenchError(f"{what}: guest has no default route after {SETUP_TIMEOUT:.0f}s")


def tune_guest(pid: int) -> None:
    """Per-netns sysctls every setup's guest gets alike: the connect-rate client opens
    thousands of short connections, which would otherwise run out of ephemeral ports
    in TIME_WAIT within a few seconds."""
    for knob in ("net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=1024 65000"):
        run_cmd([*in_netns(pid), "sysctl", "-q", "-w", knob])


@contextlib.contextmanager
def setup_relaynat(opts: SetupOptions) -> Iterator[Guest]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_SRC), env.get("PYTHONPATH")) if p)
    argv = [sys.executable, "-m", "relaynat", "run", "--mtu", str(opts.mtu), "--",
            "sleep", "infinity"]
    with spawned(argv, env=env) as relay:
        pid = _wait_guest("relaynat run", relay)
        _wait_link(pid, "relaynat")
        tune_guest(pid)
        yield Guest("relaynat", in_netns(pid), RELAY_GATEWAY, "127.0.0.1", relay.pid, argv)


@contextlib.contextmanager
def setup_slirp4netns(opts: SetupOptions) -> Iterator[Guest]:
    require("slirp4netns")
    with guest_netns() as pid:
        ready_r, ready_w = os.pipe()
        try:
            argv = (f"slirp4netns --configure --mtu={opts.mtu} --ready-fd={ready_w} {pid} tap0"
                    .split())
            with spawned(argv, pass_fds=(ready_w,)) as relay:
                os.close(ready_w)
                ready_w = -1
                readable, _, _ = select.select([ready_r], [], [], SETUP_TIMEOUT)
                if not readable or os.read(ready_r, 1) != b"1":
                    raise BenchError(f"slirp4netns not ready: {relay.log_tail() or 'timeout'}")
                tune_guest(pid)
                # slirp4netns's guest address is 10.0.2.100; 10.0.2.2 maps to host loopback.
                yield Guest("slirp4netns", in_netns(pid), RELAY_GATEWAY, "127.0.0.1",
                            relay.pid, argv)
        finally:
            os.close(ready_r)
            if ready_w >= 0:
                os.close(ready_w)


def _pasta(name: str, binary: str, opts: SetupOptions) -> contextlib.AbstractContextManager[Guest]:
    @contextlib.contextmanager
    def run() -> Iterator[Guest]:
        require(binary, "ip")
        # See the module docstring for why each option (--runas 0:0, the stub uplink,
        # -t/-u/-T/-U none; the gateway maps to host loopback by default).
        argv = [binary, *(
            "--config-net --foreground --quiet --runas 0:0 --ipv4-only"
            f" -a {RELAY_GUEST} -n 24 -g {RELAY_GATEWAY} -m {opts.mtu}"
            " -t none -u none -T none -U none -- sleep infinity"
        ).split()]
        with stub_uplink(), spawned(argv) as relay:
            pid = _wait_guest(name, relay)
            _wait_link(pid, name)
            tune_guest(pid)
            yield Guest(name, in_netns(pid), RELAY_GATEWAY, "127.0.0.1", relay.pid, argv)

    return run()


def setup_pasta(opts: SetupOptions) -> contextlib.AbstractContextManager[Guest]:
    return _pasta("pasta", "pasta", opts)


def setup_pasta_new(opts: SetupOptions) -> contextlib.AbstractContextManager[Guest]:
    if not opts.pasta_bin:
        raise BenchError("no --pasta-bin given")
    return _pasta("pasta-new", opts.pasta_bin, opts)


@contextlib.contextmanager
def setup_veth(opts: SetupOptions) -> Iterator[Guest]:
    with guest_netns() as pid:
        link_cmd = (f"ip link add rnbveth0 mtu {opts.mtu} type veth"
                    f" peer name eth0 mtu {opts.mtu} netns {pid}").split()
        run_cmd(link_cmd)
        try:
            ip(f"addr add {VETH_HOST}/{VETH_PREFIX} dev rnbveth0")
            ip("link set rnbveth0 up")
            ip(f"addr add {VETH_GUEST}/{VETH_PREFIX} dev eth0", pid)
            ip("link set eth0 up", pid)
            tune_guest(pid)
            yield Guest("veth", in_netns(pid), VETH_HOST, VETH_HOST, None, link_cmd)
        finally:
            with contextlib.suppress(BenchError):
                ip("link del rnbveth0")


Setup = Callable[[SetupOptions], contextlib.AbstractContextManager[Guest]]
SETUPS: dict[str, Setup] = {
    "relaynat": setup_relaynat,
    "slirp4netns": setup_slirp4netns,
    "pasta": setup_pasta,
    "pasta-new": setup_pasta_new,
    "veth": setup_veth,
}


def rss_bytes(pid: int) -> int:
    """Resident set size of one process (VmRSS; kernel socket buffers are not in it)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError as exc:
        raise BenchError(f"cannot read RSS of {pid}: {exc.strerror}") from exc
    raise BenchError(f"no VmRSS for {pid}")
