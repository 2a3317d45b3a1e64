"""`relaynat-pasta`: the pasta command lines podman 4.4 to 5.x builds, copied from its
source, against namespaces made here (`ip netns add`, as podman bind-mounts one).

podman 4.3.1 (Debian 12's) has no `--network pasta`, so the argv is the proof: podman
runs pasta, waits for it to exit with its output closed (exec.Command.Output), and
expects the namespace served until it removes the namespace's path. Each case runs in a
network and mount namespace of its own (`unshare -n -m`), where the host side has a
dnsmasq on 127.0.0.1 (named by a bind-mounted resolv.conf, the relay's upstream) and a
web server on 0.0.0.0, with 198.18.0.1 (RFC 2544's benchmarking range) on `lo` as the
host's non-loopback address.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from support import SUPPORT
from support.dropin_kit import (
    DNSMASQ,
    RESOLV_LOOPBACK,
    SCRATCH,
    SUBIDS_NOBODY,
    TUN_0666,
    WAIT_PORT,
    free_port,
    greeting_through,
    http_peer,
    nobody_env,
)
from support.scenario import run_scenario

pytestmark = pytest.mark.integration

PASTA = str(Path(sys.executable).parent / "relaynat-pasta")
SPEC = "127.0.0.1/{port}-{port}:80-80"

#: podman's argv for `podman run -p 127.0.0.1:PORT:80 --network pasta`, by version.
#: 4.4 to 4.9: libpod/networking_pasta_linux.go, then containers/common v0.56-v0.57
#: libnetwork/pasta/pasta.go (ports, then options, then the "none"s, --no-map-gw).
PODMAN_4 = ["--config-net", "-t", SPEC, "-u", "none", "-T", "none", "-U", "none",
            "--no-map-gw", "--netns", "{netns}"]
#: 5.0 (common v0.58): `--dns none` unless a DNS option was given, always --quiet.
PODMAN_5_0 = ["--config-net", "-t", SPEC, "-u", "none", "-T", "none", "-U", "none",
              "--no-map-gw", "--dns", "none", "--quiet", "--netns", "{netns}"]
#: 5.1 and 5.2 (common v0.59-v0.60): --dns-forward 169.254.0.1 by default.
PODMAN_5_1 = ["--config-net", "-t", SPEC, "--dns-forward", "169.254.0.1", "-u", "none",
              "-T", "none", "-U", "none", "--no-map-gw", "--quiet", "--netns", "{netns}"]
#: 5.3 on (common v0.61+): 169.254.1.1, and --map-guest-addr last, which podman drops
#: and retries without when pasta exits 1 saying "unrecognized option '--map-guest-addr".
PODMAN_5_3 = ["--config-net", "-t", SPEC, "--dns-forward", "169.254.1.1", "-u", "none",
              "-T", "none", "-U", "none", "--no-map-gw", "--quiet", "--netns", "{netns}",
              "--map-guest-addr", "169.254.1.2"]
#: 5.3 with `--network pasta:--map-gw`: podman removes --map-gw and adds no --no-map-gw.
PODMAN_5_3_MAP_GW = ["--config-net", "-t", SPEC, "--dns-forward", "169.254.1.1", "-u", "none",
                     "-T", "none", "-U", "none", "--quiet", "--netns", "{netns}",
                     "--map-guest-addr", "169.254.1.2"]

_SCENARIO = SCRATCH + r"""
mkdir -p /run/netns
mount -t tmpfs tmpfs /run/netns
""" + RESOLV_LOOPBACK + r"""
ip link set lo up
ip addr add 198.18.0.1/32 dev lo
mkdir "$dev/www" "$dev/inside"
echo "from host" > "$dev/www/hello.txt"
echo "from inside" > "$dev/inside/inside.txt"
""" + DNSMASQ + http_peer("0.0.0.0") + r"""
inner=
stop() { kill $dns $http $inner 2>/dev/null || true; ip netns del ctr 2>/dev/null || true; }
trap 'stop; cleanup' EXIT
""" + WAIT_PORT + r"""
ip netns add ctr
# podman: exec.Command(pasta, args...).Output(), retrying without the last two
# arguments on exit 1 and "unrecognized option '--map-guest-addr".
set +e
out=$("$PASTA" "$@" 2>&1)
status=$?
if [ $status = 1 ] && printf '%s' "$out" | grep -q "unrecognized option '--map-guest-addr"; then
    echo "fallback"
    set -- "$@"
    n=$#
    args=
    i=0
    for a in "$@"; do
        i=$((i + 1))
        [ $i -le $((n - 2)) ] && args="$args $(printf '%q' "$a")"
    done
    eval "set -- $args"
    out=$("$PASTA" "$@" 2>&1)
    status=$?
fi
set -e
echo "status $status"
[ $status = 0 ] || { echo "$out" >&2; exit 1; }
# The relay is pasta's background child: the process listening on the forwarded port.
relay=$(ss -Hltnp "sport = :$FWD" | sed -n 's/.*pid=\([0-9]*\),.*/\1/p' | head -n 1)
echo "relay $(awk '/^(Uid|CapEff|NoNewPrivs|Seccomp):/ {printf "%s%s ", $1, $2}' \
    /proc/$relay/status)root $(ls -A /proc/$relay/root | wc -l)"
ns="ip netns exec ctr"
$ns ip -o -4 addr show tap0 | awk '{print "addr", $2, $4}'
$ns ip route show default | sed 's/ *$//; s/^/route /'
for server in $DNS_ADDRS; do
    echo "resolve $server $($ns dig +short +time=3 +tries=2 @$server probe.test)"
done
echo "out $($ns curl -sS --max-time 10 http://198.18.0.1:$port/hello.txt)"
if got=$($ns curl -sS --max-time 5 http://10.0.2.2:$port/hello.txt 2>/dev/null); then
    echo "gateway $got"
else
    echo "gateway refused"
fi
$ns busybox httpd -f -p 80 -h "$dev/inside" &
inner=$!
# Until httpd listens, the relay's connection to port 80 is reset: curl sees an empty
# reply, which its --retry does not cover.
for _ in $(seq 50); do
    got=$(curl -sS --max-time 10 http://127.0.0.1:$FWD/inside.txt 2>/dev/null) && break
    sleep 0.1
done
echo "in $got"
kill $inner
inner=
# podman removes the namespace when the container stops; the relay ends with it and
# its forward stops listening.
ip netns del ctr
listening() { [ -n "$(ss -Hltn "sport = :$FWD")" ]; }
for _ in $(seq 100); do
    listening || break
    sleep 0.1
done
if listening; then echo "still listening"; else echo "ended"; fi
"""


def _scenario(template: list[str], dns_addrs: str) -> list[str]:
    port = free_port()
    argv = [arg.format(port=port, netns="/run/netns/ctr") for arg in template]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PASTA": PASTA, "FWD": str(port),
           "PEERS": str(SUPPORT / "host_peers.py"), "DNS_ADDRS": dns_addrs}
    done = run_scenario(_SCENARIO, argv, env=env, timeout=120)
    assert done.returncode == 0, f"{shlex.join(argv)}\n{done.stdout}{done.stderr}"
    return done.stdout.splitlines()


#: Confined as pasta isolates itself: nobody, no capability, no_new_privs, the seccomp
#: filter (2: SECCOMP_MODE_FILTER), an empty root.
_CONFINED = "relay Uid:65534 CapEff:0000000000000000 NoNewPrivs:1 Seccomp:2 root 0"
_SERVED = [_CONFINED, "addr tap0 10.0.2.15/24", "route default via 10.0.2.2 dev tap0"]
_TAIL = ["out from host", "gateway refused", "in from inside", "ended"]


def test_podman_4_argv() -> None:
    assert _scenario(PODMAN_4, "10.0.2.3") == [
        "status 0", *_SERVED, "resolve 10.0.2.3 198.18.0.7", *_TAIL]


def test_podman_5_0_argv_dns_none() -> None:
    assert _scenario(PODMAN_5_0, "10.0.2.3") == [
        "status 0", *_SERVED, "resolve 10.0.2.3 198.18.0.7", *_TAIL]


def test_podman_5_1_argv_dns_forward() -> None:
    assert _scenario(PODMAN_5_1, "169.254.0.1") == [
        "status 0", *_SERVED, "resolve 169.254.0.1 198.18.0.7", *_TAIL]


def test_podman_5_3_argv_falls_back_without_map_guest_addr() -> None:
    assert _scenario(PODMAN_5_3, "169.254.1.1") == [
        "fallback", "status 0", *_SERVED, "resolve 169.254.1.1 198.18.0.7", *_TAIL]


def test_podman_5_3_map_gw_reaches_host_loopback() -> None:
    assert _scenario(PODMAN_5_3_MAP_GW, "169.254.1.1") == [
        "fallback", "status 0", *_SERVED, "resolve 169.254.1.1 198.18.0.7",
        "out from host", "gateway from host", "in from inside", "ended"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--config-net", "--netns", "/run/netns/x", "--map-guest-addr", "169.254.1.2"],
     "unrecognized option '--map-guest-addr'"),
    (["-i", "eth0", "--netns", "/run/netns/x"], "invalid option -- 'i' (relaynat does not "
                                                "copy a host interface's addresses"),
    (["--outbound", "192.0.2.1", "--netns", "/run/netns/x"], "unrecognized option "
                                                            "'--outbound'"),
    (["--trace", "--netns", "/run/netns/x"], "unrecognized option '--trace'"),
    (["-T", "auto", "--netns", "/run/netns/x"], "-T auto: relaynat does not follow"),
    (["-T", "192.0.2.1/8080", "--netns", "/run/netns/x"], "is not a loopback address"),
    (["-t", "auto", "--netns", "/run/netns/x"], "-t auto: relaynat does not follow"),
    (["-D", "192.0.2.53", "--netns", "/run/netns/x"], "-D 192.0.2.53: relaynat answers DNS"),
    (["--config-net", "sh", "-c", "true"], "sh: relaynat-pasta serves an existing namespace"),
    (["--config-net"], "give the namespace: --netns PATH or a PID"),
    (["-fz", "--netns", "/run/netns/x"], "invalid option -- 'z'"),
    (["--netns"], "option '--netns' requires an argument"),
    (["--quiet=1", "--netns", "/run/netns/x"], "option '--quiet' doesn't allow an argument"),
    (["-t", "99999", "--netns", "/run/netns/x"], "99999"),
    (["--netns", "/run/netns/relaynat-no-such-namespace"], "does not exist"),
    (["--runas", "0", "--netns", "/run/netns/x"], "--runas: a confined relay does not "
                                                  "stay root"),
    (["--runas", "relaynat-no-such-user", "--netns", "/run/netns/x"],
     "--runas: no user named 'relaynat-no-such-user'"),
    (["--runas", "nobody", "--no-confine", "--netns", "/run/netns/x"],
     "--runas: the user a confined relay becomes; not with --no-confine"),
])
def test_refused_naming_the_option(argv: list[str], message: str) -> None:
    done = subprocess.run([PASTA, *argv], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("relaynat-pasta: ") and message in done.stderr, done.stderr
    assert done.stdout == ""


def test_help_lists_what_is_taken() -> None:
    done = subprocess.run([PASTA, "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    for option in ("--config-net", "--dns-forward", "--no-map-gw", "--netns", "--tcp-ports",
                   "--runas", "--no-confine"):
        assert option in done.stdout


def test_foreground_addressing_loopback_forward_pid_file_and_sigterm(tmp_path: Path) -> None:
    """-f stays in the foreground; -a/-n/-g/-m/-I/-4 address the interface as asked (an
    off-link --dns-forward address taken beside them; the DNS scenarios above query
    theirs), the gateway stands for the host's loopback (pasta's default), -T PORT
    makes the namespace's loopback port the host's; with --no-confine (relaynat's own:
    tests/integration/test_pasta_confined.py has the confined relay) the relay keeps
    its privileges and -P names the process and goes away with it."""
    name = f"pasta-{os.getpid()}-{time.monotonic_ns() % 100000}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    pid_file = tmp_path / "pasta.pid"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(15)
    port = listener.getsockname()[1]
    proc = subprocess.Popen(
        [PASTA, "--config-net", "-f", "-a", "192.168.77.10", "-n", "255.255.255.0", "-g",
         "192.168.77.1", "-m", "1500", "-I", "eth0", "-4", "--dns-forward", "192.168.77.53",
         "-P", str(pid_file), "-T", str(port), "--no-confine", "--netns", name],
        stderr=subprocess.PIPE,
        text=True)
    try:
        ns = ["ip", "-n", name]
        deadline = time.monotonic() + 20
        while "192.168.77.10" not in subprocess.run([*ns, "-4", "addr", "show"],
                                                    capture_output=True, text=True).stdout:
            assert proc.poll() is None and time.monotonic() < deadline, (
                proc.stderr.read() if proc.stderr else "")
            time.sleep(0.05)
        assert pid_file.read_text().strip() == str(proc.pid)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        assert "\nSeccomp:\t0\n" in status and "\nUid:\t0\t" in status, status
        link = subprocess.run([*ns, "-o", "link", "show", "eth0"], capture_output=True,
                              text=True, check=True).stdout
        assert "mtu 1500" in link
        addr = subprocess.run([*ns, "-4", "-o", "addr", "show", "eth0"], capture_output=True,
                              text=True, check=True).stdout
        assert "192.168.77.10/24" in addr
        route = subprocess.run([*ns, "route", "show", "default"], capture_output=True,
                               text=True, check=True).stdout
        assert "default via 192.168.77.1 dev eth0" in route
        enter = ["ip", "netns", "exec", name]
        assert greeting_through(enter, "192.168.77.1", listener,
                                b"host loopback via the gateway") == (
            "host loopback via the gateway")
        # -T PORT: the namespace's own 127.0.0.1:PORT is the host's.
        assert greeting_through(enter, "127.0.0.1", listener,
                                b"host loopback via -T") == "host loopback via -T"
        assert proc.poll() is None  # in the foreground: still this process
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert not pid_file.exists()
    finally:
        listener.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
        subprocess.run(["ip", "netns", "del", name], check=False)


_ROOTLESS = SCRATCH + TUN_0666 + SUBIDS_NOBODY + r"""
ip link set lo up
mkdir "$dev/www"
echo "from host loopback" > "$dev/www/hello.txt"
chmod -R a+rX "$dev/www"
""" + http_peer() + r"""
trap 'kill $http 2>/dev/null || true; cleanup' EXIT
""" + WAIT_PORT + r"""
export PORT=$port
cat > "$dev/inner.sh" <<'INNER'
set -eu
unshare -n sleep 60 &
target=$!
while [ "$(readlink /proc/$target/ns/net)" = "$(readlink /proc/self/ns/net)" ]; do
    sleep 0.01
done
env PYTHONPATH="$RELAYNAT_PATH" "$GUEST_PYTHON" -m relaynat.cli.pasta --config-net -t none \
    -u none -T none -U none --quiet --netns /proc/$target/ns/net
echo "status $?"
relay=$(pgrep -f "netns /proc/$target/ns/net")
echo "relay $(awk '/^(Uid|CapEff|NoNewPrivs|Seccomp):/ {printf "%s%s ", $1, $2}' \
    /proc/$relay/status)root $(ls -A /proc/$relay/root | wc -l)"
nsenter -t $target -n ip -o -4 addr show tap0 | awk '{print "addr", $4}'
nsenter -t $target -n curl -sS --max-time 10 http://10.0.2.2:$PORT/hello.txt
kill $target
# The relay ends with the process whose namespace it serves (its /proc entry gone); it
# stays a zombie where nothing reaps orphans.
for _ in $(seq 100); do
    state=$(awk '/^State:/ {print $2}' /proc/$relay/status 2>/dev/null || echo gone)
    [ "$state" = Z ] || [ "$state" = gone ] && break
    sleep 0.1
done
echo "relay ${state:-gone}" | sed 's/ Z$/ ended/; s/ gone$/ ended/'
INNER
cd /
# $USERNS: root alone mapped (-Ur), or root and nobody's subordinate ids (newuidmap).
setpriv --reuid=65534 --regid=65534 --clear-groups unshare $USERNS sh "$dev/inner.sh"
"""


@pytest.mark.parametrize(("userns", "uid"), [
    ("-Ur", "0"),
    # util-linux 2.38's order: outer, inner, count.
    ("--map-root-user --map-users=200000,1,65536 --map-groups=200000,1,65536", "65534"),
], ids=["root-alone", "subordinate-ids"])
def test_rootless_as_podman_runs_it(userns: str, uid: str) -> None:
    """podman's rootless shape: as an unprivileged user, inside a user namespace of its
    own (root there), a network namespace that user namespace owns, pasta run in the
    same user namespace; /dev/net/tun 0666 as Debian ships it (a bind mount here).
    Confined there: where the user namespace maps subordinate ids the relay becomes
    its nobody; where it maps root alone (no subordinate ids) it stays that root, the
    unprivileged user outside. Either way with no capability, no filesystem and the
    seccomp filter; it still ends with the namespace's process."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "USERNS": userns, **nobody_env()}
    done = run_scenario(_ROOTLESS, env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == [
        "status 0", f"relay Uid:{uid} CapEff:0000000000000000 NoNewPrivs:1 Seccomp:2 root 0",
        "addr 10.0.2.15/24", "from host loopback", "relay ended"], done.stdout + done.stderr


def _translated(*argv: str) -> Any:
    from relaynat.cli.pasta_options import parse, translate

    return translate(parse([*argv, "--netns", "/proc/1/ns/net"]))


def test_options_become_relaynat_run_configuration() -> None:
    """What each taken option becomes, through relaynat run's own parser (in process:
    nothing is started, the namespace is only named)."""
    got = _translated("--config-net", "-a", "192.168.5.9", "-n", "255.255.0.0", "-g",
                      "192.168.0.1", "-a", "2001:db8:1::5", "-m", "9000", "--dns-forward",
                      "169.254.1.1", "--no-map-gw", "-t", "127.0.0.1/8080-8081:80-81", "-u",
                      "none", "-T", "127.0.0.1/5432", "-U", "none")
    config = got.config
    assert (str(config.guest_ipv4), config.prefix_len_v4) == ("192.168.5.9", 16)
    assert str(config.gateway_ipv4) == "192.168.0.1" and config.mtu == 9000
    assert str(config.dns_ipv4) == "169.254.1.1"
    assert config.map_host_loopback_v4 is None and config.map_host_loopback_v6 is None
    assert (str(config.guest_ipv6), str(config.prefix_v6)) == ("2001:db8:1::5",
                                                               "2001:db8:1::/64")
    assert (str(config.gateway_ipv6), str(config.dns_ipv6)) == ("2001:db8:1::2",
                                                                "2001:db8:1::3")
    assert [(f.proto, str(f.address), f.host_first, f.host_last, f.guest_first)
            for f in got.forwards] == [("tcp", "127.0.0.1", 8080, 8081, 80)]
    assert got.loopback == [("tcp", 4, 5432, 5432)]
    got = _translated("-4")
    assert not got.config.ipv6 and got.forwards == [] and got.loopback == []
    # pasta's default: the gateway stands for the host's loopback.
    assert str(got.config.map_host_loopback_v4) == str(got.config.gateway_ipv4)
    got = _translated("--map-host-loopback", "10.0.2.9")
    assert str(got.config.map_host_loopback_v4) == "10.0.2.9"
