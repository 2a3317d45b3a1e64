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

Forwarded ports (the fwd workloads, at run.py's request through SetupOptions.forwards): a
client on the host's loopback reaches a service in the guest through the setup's own
port forwarding: `relaynat run -t HOST:GUEST`, slirp4netns' `add_hostfwd` on its API
socket, pasta's `-t HOST:GUEST`. Two setups exist only for them: "loopback", client and
server both in the benchmark's namespace (the ceiling), and "veth-dnat", the kernel's own
path: a veth pair from a namespace of its own into the guest and an nftables DNAT rule
from a loopback port there. That path needs conntrack and `route_localnet`, so it gets a
namespace of its own rather than the benchmark's, whose loopback every other setup's
traffic crosses and which must stay untracked.

Process and namespace helpers (spawned, guest_netns, stub_uplink, ...) are common.py's.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from common import (
    CMD_TIMEOUT,
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
FWD_HOST_ADDR = "127.0.0.1"  # where the host-side client of a forwarded port dials
#: Setups measured only through forwarded ports, and the one that has no forwarding.
FWD_ONLY = frozenset({"loopback", "veth-dnat"})
NO_FORWARDS = frozenset({"veth"})


@dataclass(frozen=True)
class SetupOptions:
    mtu: int
    pasta_bin: str | None = None  # the "pasta-new" setup's binary
    #: (host port, guest port) pairs to forward from the host's loopback into the guest.
    forwards: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Forwards:
    """How a client on the host side reaches the guest's services through forwarded ports."""

    client_prefix: list[str]  # argv prefix running the client on the host side
    host_port: dict[int, int]  # guest port -> host loopback port forwarded to it
    how: list[str] = field(default_factory=list)  # API requests, rules: for the record


@dataclass
class Guest:
    """A running setup: how to run a command in its guest and what to measure."""

    name: str
    prefix: list[str]  # argv prefix running the rest inside the guest netns
    target: str  # address the guest dials to reach the host side's loopback servers
    server_bind: str  # address the host-side servers listen on
    relay_pid: int | None  # the process whose RSS is "the relay" (None: kernel veth)
    relay_cmd: list[str] = field(default_factory=list)
    forwards: Forwards | None = None  # set when SetupOptions.forwards asked for some


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
    fwd_args = [a for h, g in opts.forwards for a in ("-t", f"{h}:{g}")]
    # Confined, as run is by default, named so in the recorded command (benches/
    # confinement.py compares it with --no-confine).
    argv = [sys.executable, "-m", "relaynat", "run", "--confine", "--mtu", str(opts.mtu),
            *fwd_args, "--", "sleep", "infinity"]
    with spawned(argv, env=env) as relay:
        pid = _wait_guest("relaynat run", relay)
        _wait_link(pid, "relaynat")
        tune_guest(pid)
        yield Guest("relaynat", in_netns(pid), RELAY_GATEWAY, "127.0.0.1", relay.pid, argv,
                    _host_forwards(opts, fwd_args))


@contextlib.contextmanager
def setup_slirp4netns(opts: SetupOptions) -> Iterator[Guest]:
    require("slirp4netns")
    with guest_netns() as pid, tempfile.TemporaryDirectory(prefix="rnb-slirp-") as tmp:
        api = os.path.join(tmp, "api.sock")
        ready_r, ready_w = os.pipe()
        try:
            argv = (f"slirp4netns --configure --mtu={opts.mtu} --ready-fd={ready_w}"
                    f"{f' --api-socket={api}' if opts.forwards else ''} {pid} tap0").split()
            with spawned(argv, pass_fds=(ready_w,)) as relay:
                os.close(ready_w)
                ready_w = -1
                readable, _, _ = select.select([ready_r], [], [], SETUP_TIMEOUT)
                if not readable or os.read(ready_r, 1) != b"1":
                    raise BenchError(f"slirp4netns not ready: {relay.log_tail() or 'timeout'}")
                tune_guest(pid)
                how = [_slirp_add_hostfwd(api, h, g) for h, g in opts.forwards]
                # slirp4netns's guest address is 10.0.2.100; 10.0.2.2 maps to host loopback.
                yield Guest("slirp4netns", in_netns(pid), RELAY_GATEWAY, "127.0.0.1",
                            relay.pid, argv, _host_forwards(opts, how))
        finally:
            os.close(ready_r)
            if ready_w >= 0:
                os.close(ready_w)


def _host_forwards(opts: SetupOptions, how: list[str]) -> Forwards | None:
    """Forwards whose client runs in the benchmark's own namespace (the relay's host side)."""
    if not opts.forwards:
        return None
    return Forwards([], {g: h for h, g in opts.forwards}, how)


def _slirp_add_hostfwd(api: str, host_port: int, guest_port: int) -> str:
    """Forward FWD_HOST_ADDR:host_port to the guest (its default 10.0.2.100) through
    slirp4netns' API socket: one JSON request per connection, answered with
    {"return": {"id": N}} or {"error": {"desc": ...}}, then the socket is shut down."""
    request = json.dumps({"execute": "add_hostfwd", "arguments": {
        "proto": "tcp", "host_addr": FWD_HOST_ADDR, "host_port": host_port,
        "guest_port": guest_port}})
    deadline = time.monotonic() + SETUP_TIMEOUT
    while True:  # nothing says slirp4netns binds it before it writes the ready byte
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(CMD_TIMEOUT)
            sock.connect(api)
            break
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            if time.monotonic() > deadline:
                raise BenchError(f"slirp4netns API socket: {exc.strerror}") from exc
            time.sleep(0.05)
    with sock:
        try:
            sock.sendall(request.encode())
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
        except OSError as exc:
            raise BenchError(f"slirp4netns API: {exc}") from exc
    try:
        answer = json.loads(reply)
    except json.JSONDecodeError as exc:
        raise BenchError(f"slirp4netns API: unparsable reply {reply[:100]!r}") from exc
    if not isinstance(answer, dict) or "return" not in answer:
        raise BenchError(f"slirp4netns add_hostfwd: {answer}"[:300])
    return f"{request} -> {reply.decode(errors='replace')}"


def _pasta(name: str, binary: str, opts: SetupOptions) -> contextlib.AbstractContextManager[Guest]:
    @contextlib.contextmanager
    def run() -> Iterator[Guest]:
        require(binary, "ip")
        # See the module docstring for why each option (--runas 0:0, the stub uplink,
        # -t/-u/-T/-U none; the gateway maps to host loopback by default).
        tcp = ",".join(f"{h}:{g}" for h, g in opts.forwards) or "none"
        argv = [binary, *(
            "--config-net --foreground --quiet --runas 0:0 --ipv4-only"
            f" -a {RELAY_GUEST} -n 24 -g {RELAY_GATEWAY} -m {opts.mtu}"
            f" -t {tcp} -u none -T none -U none -- sleep infinity"
        ).split()]
        with stub_uplink(), spawned(argv) as relay:
            pid = _wait_guest(name, relay)
            _wait_link(pid, name)
            tune_guest(pid)
            yield Guest(name, in_netns(pid), RELAY_GATEWAY, "127.0.0.1", relay.pid, argv,
                        _host_forwards(opts, [f"-t {tcp}"]))

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


@contextlib.contextmanager
def setup_loopback(opts: SetupOptions) -> Iterator[Guest]:
    """No guest: the "guest's" servers listen in the benchmark's namespace and the client
    dials them on loopback directly (each forward maps a port to itself)."""
    ports = {g: g for _h, g in opts.forwards}
    yield Guest("loopback", [], FWD_HOST_ADDR, FWD_HOST_ADDR, None, [],
                Forwards([], ports, ["client and server on 127.0.0.1, no forwarding"]))


@contextlib.contextmanager
def setup_veth_dnat(opts: SetupOptions) -> Iterator[Guest]:
    """The kernel's path for a forwarded port: in a namespace of its own (the "host"), a
    DNAT rule turns a connection to 127.0.0.1:HOST into one to the guest's veth address
    and port, and a source NAT makes the guest answer the veth address. Sending a packet
    with a loopback source out of a non-loopback device takes route_localnet=1 (set in
    that namespace only; it is not the machine's)."""
    require("nft")
    with guest_netns() as host, guest_netns() as pid:
        how = [f"ip link add rnbdnat0 mtu {opts.mtu} type veth"
               f" peer name eth0 mtu {opts.mtu} netns {pid}"]
        run_cmd([*in_netns(host), *how[0].split()])
        ip(f"addr add {VETH_HOST}/{VETH_PREFIX} dev rnbdnat0", host)
        ip("link set rnbdnat0 up", host)
        ip(f"addr add {VETH_GUEST}/{VETH_PREFIX} dev eth0", pid)
        ip("link set eth0 up", pid)
        # `host` is a namespace guest_netns created (it waited for it to differ from the
        # benchmark's own, itself private), so the sysctl and rules below end with it.
        how.append("sysctl -w net.ipv4.conf.all.route_localnet=1")
        rules = [
            "add table ip rnbfwd",
            "add chain ip rnbfwd out { type nat hook output priority -100 ; }",
            "add chain ip rnbfwd post { type nat hook postrouting priority 100 ; }",
            *(f"add rule ip rnbfwd out ip daddr {FWD_HOST_ADDR} tcp dport {h}"
              f" dnat to {VETH_GUEST}:{g}" for h, g in opts.forwards),
            f'add rule ip rnbfwd post oifname "rnbdnat0" snat to {VETH_HOST}',
        ]
        how += [f"nft {r}" for r in rules]
        run_cmd([*in_netns(host), "sysctl", "-q", "-w", "net.ipv4.conf.all.route_localnet=1"])
        for rule in rules:
            run_cmd([*in_netns(host), "nft", rule])
        tune_guest(pid)
        yield Guest("veth-dnat", in_netns(pid), VETH_HOST, VETH_HOST, None, how[0].split(),
                    Forwards(in_netns(host), {g: h for h, g in opts.forwards}, how[1:]))


Setup = Callable[[SetupOptions], contextlib.AbstractContextManager[Guest]]
SETUPS: dict[str, Setup] = {
    "relaynat": setup_relaynat,
    "slirp4netns": setup_slirp4netns,
    "pasta": setup_pasta,
    "pasta-new": setup_pasta_new,
    "veth": setup_veth,
    "veth-dnat": setup_veth_dnat,
    "loopback": setup_loopback,
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
