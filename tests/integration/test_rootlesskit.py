"""The real rootlesskit (Debian's 1.1.0) running `relaynat-slirp4netns` as its slirp4netns
binary, and the real slirp4netns in the same test as the reference.

As `nobody`, with a subordinate id range for newuidmap/newgidmap and /dev/net/tun mode
0666 (as Debian ships it; 0600 on this machine): `rootlesskit --net=slirp4netns
--slirp4netns-binary=BINARY --port-driver=slirp4netns -p 127.0.0.1:PORT:80/tcp`, with
and without `--disable-host-loopback`. Inside, the child's tap0 is addressed, a name
resolves through 10.0.2.3 (the binary's upstream is a dnsmasq on loopback, named by the
resolv.conf the binary reads), `wget` reaches a host-loopback server through 10.0.2.2 or
is refused, 64 MiB go down and up intact (through 10.0.2.2 where host loopback is
reachable, to the host's other address where it is not), and the published ports
(TCP and UDP) reach servers inside; a port is added, listed and removed at run time.
One difference is expected: the real slirp4netns loses UDP answers through a forward
when host loopback is off, relaynat does not.

Nothing global changes: the scenario runs in a network namespace and a mount namespace
of its own (`unshare -n -m`), where /etc/subuid, /etc/subgid, /etc/resolv.conf and
/dev/net/tun are bind mounts that vanish with it. The host side's second address
(198.18.0.1, RFC 2544's benchmarking range) is on that namespace's `lo`: the guest
reaches it as any non-loopback address of the host.
"""

from __future__ import annotations

import os
import shutil

import pytest
from support.dropin_kit import (
    DNSMASQ,
    RESOLV_LOOPBACK,
    SCRATCH,
    SLIRP4NETNS_BINARY,
    SUBIDS_NOBODY,
    TUN_0666,
    WAIT_PORT,
    free_port,
    http_peer,
    nobody_env,
    run_digest_scenario,
)
from support.scenario import run_scenario

pytestmark = pytest.mark.integration

_SCENARIO = SCRATCH + TUN_0666 + SUBIDS_NOBODY + RESOLV_LOOPBACK + r"""
mkdir -m 777 "$dev/state" "$dev/sync"
mkdir -m 755 "$dev/www" "$dev/inside"
ip link set lo up
ip addr add 198.18.0.1/32 dev lo
echo "from host loopback" > "$dev/www/hello.txt"
echo "from inside" > "$dev/inside/inside.txt"
head -c 64M /dev/urandom > "$dev/www/big.bin"
chmod 644 "$dev/www/"* "$dev/inside/"*
echo "big $(sha256sum < "$dev/www/big.bin" | cut -d' ' -f1)"
""" + SLIRP4NETNS_BINARY + DNSMASQ + http_peer("0.0.0.0") + r"""
rk=
trap 'touch "$dev/sync/stop"; kill $dns $http $rk 2>/dev/null || true; cleanup' EXIT
""" + WAIT_PORT + r"""
cat > "$dev/child.sh" <<CHILD
ip -o -4 addr show tap0 | awk '{print "addr", \$2, \$4}'
ip route | sed 's/ *$//; s/^/route /'
echo "resolve \$(getent ahostsv4 probe.test | head -1 | cut -d' ' -f1)"
if wget -q -T 5 -O - http://10.0.2.2:$port/hello.txt; then :; else echo "loopback refused"; fi
echo "down \$(curl -sS --max-time 60 http://$BULK:$port/big.bin | sha256sum | cut -d' ' -f1)"
echo "up \$(curl -sS --max-time 60 -T $dev/www/big.bin http://$BULK:$port/up)"
busybox httpd -f -p 80 -h $dev/inside &
httpd=\$!
# A UDP service inside: answers each datagram with "udp " and the datagram. It says
# the child is ready once bound (a datagram before that would be lost).
$GUEST_PYTHON -c "
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(('0.0.0.0', 53))
open('$dev/sync/child-ready', 'w').close()
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(b'udp ' + data, peer)
" &
udp=\$!
while [ ! -e $dev/sync/stop ]; do sleep 0.1; done
kill \$httpd \$udp
CHILD
cd /
setpriv --reuid=65534 --regid=65534 --clear-groups env HOME=/nonexistent \
    rootlesskit --state-dir "$dev/state/rk" --net=slirp4netns --slirp4netns-binary="$s4n" \
    --mtu=65520 --copy-up=/etc --port-driver=slirp4netns -p "127.0.0.1:$FWD:80/tcp" \
    -p "127.0.0.1:$FWD:53/udp" $LOOPBACK $SANDBOX sh "$dev/child.sh" &
rk=$!
for _ in $(seq 600); do
    [ -e "$dev/sync/child-ready" ] && break
    kill -0 $rk 2>/dev/null || break
    sleep 0.1
done
if [ -n "$SANDBOX" ]; then
    # The binary as rootlesskit started it (its own command line has --mtu=65520).
    s4npid=$(pgrep -n -f 'slirp4netns --mtu 65520 ')
    echo "confined $(grep -E '^(Seccomp|NoNewPrivs):' /proc/$s4npid/status \
        | tr -s '\t' ' ' | tr '\n' ' ')root $(ls -A /proc/$s4npid/root | wc -l)"
fi
echo "forwarded $(curl -sS --max-time 10 --retry 5 --retry-connrefused \
    http://127.0.0.1:$FWD/inside.txt)"
echo "$(printf 'ping' | socat -t 3 - "UDP:127.0.0.1:$FWD")"
# A port added and removed at run time (rootlessctl, the port driver's add_hostfwd and
# remove_hostfwd on the binary's API socket).
ctl="setpriv --reuid=65534 --regid=65534 --clear-groups rootlessctl
    --socket=$dev/state/rk/api.sock"
id=$($ctl add-ports "127.0.0.1:$FWD2:80/tcp")
echo "added $(curl -sS --max-time 10 http://127.0.0.1:$FWD2/inside.txt)"
echo "listed $($ctl list-ports --json | grep -c "\"parentPort\":$FWD2")"
$ctl remove-ports "$id" >/dev/null
if curl -s --max-time 5 http://127.0.0.1:$FWD2/inside.txt >/dev/null; then
    echo "still forwarded"
else
    echo "removed"
fi
touch "$dev/sync/stop"
set +e
wait $rk
echo "rootlesskit $?"
set -e
rk=
echo "dns queries $(grep -c 'query\[A\] probe.test' "$dev/dns.log")"
"""


@pytest.mark.parametrize("loopback", ["host-loopback", "disable-host-loopback"])
@pytest.mark.parametrize(("binary", "sandbox"), [
    ("relaynat", False), ("relaynat", True), ("/usr/bin/slirp4netns", False)],
    ids=["relaynat", "relaynat-sandbox", "slirp4netns"])
def test_rootlesskit_slirp4netns_network_and_port_driver(binary: str, sandbox: bool,
                                                         loopback: str) -> None:
    """`sandbox`: rootlesskit's --slirp4netns-sandbox=true --slirp4netns-seccomp=true
    (their default is false), which pass --enable-sandbox and --enable-seccomp: the
    binary, relaynat confined, has a seccomp filter, no_new_privs and an empty root,
    and everything else comes out the same."""
    for tool in ("rootlesskit", "newuidmap", "dnsmasq", "busybox", "wget", "curl"):
        assert shutil.which(tool), f"{tool} is installed by install.sh"
    if binary != "relaynat":
        assert os.access(binary, os.X_OK), "slirp4netns is installed by install.sh"
    env = {**os.environ, **nobody_env(), "BINARY": binary,
           "FWD": str(free_port()), "FWD2": str(free_port()),
           "LOOPBACK": "--disable-host-loopback" if loopback.startswith("disable") else "",
           "SANDBOX": "--slirp4netns-sandbox=true --slirp4netns-seccomp=true"
           if sandbox else "",
           # The bulk transfers take the host-loopback mapping where it is on.
           "BULK": "198.18.0.1" if loopback.startswith("disable") else "10.0.2.2"}
    digest, out, report = run_digest_scenario(_SCENARIO, env=env, timeout=240)
    reached = (["loopback refused"] if loopback.startswith("disable")
               else ["from host loopback"])
    # slirp4netns drops the child's UDP answer to a forwarded datagram when host
    # loopback is off: libslirp's sotranslate_out refuses the reply to the host alias
    # (podman issue 4586). relaynat answers through the forward's own socket.
    udp = ("" if binary != "relaynat" and loopback.startswith("disable") else "udp ping")
    assert out == [
        "addr tap0 10.0.2.100/24",
        "route default via 10.0.2.2 dev tap0",
        "route 10.0.2.0/24 dev tap0 proto kernel scope link src 10.0.2.100",
        "resolve 198.18.0.7",
        *reached,
        f"down {digest}",
        f"up {digest}",
        *(["confined NoNewPrivs: 1 Seccomp: 2 root 0"] if sandbox else []),
        "forwarded from inside",
        udp,
        "added from inside",
        "listed 1",
        "removed",
        "rootlesskit 0",
        "dns queries 1",
    ], report


_IPV6_CIDR = SCRATCH + TUN_0666 + SUBIDS_NOBODY + r"""
mkdir -m 777 "$dev/state"
mkdir -m 755 "$dev/www"
ip link set lo up
echo "from host ::1" > "$dev/www/hello.txt"
chmod 644 "$dev/www/hello.txt"
""" + SLIRP4NETNS_BINARY + http_peer("::1") + r"""
trap 'kill $http 2>/dev/null || true; cleanup' EXIT
""" + WAIT_PORT + r"""
cd /
setpriv --reuid=65534 --regid=65534 --clear-groups env HOME=/nonexistent \
    rootlesskit --state-dir "$dev/state/rk" --net=slirp4netns --slirp4netns-binary="$s4n" \
    --ipv6 --cidr=10.9.0.0/24 --copy-up=/etc sh -c "
ip -o -4 addr show tap0 | awk '{print \"addr\", \$4}'
# SLAAC from the router advertisement: wait for a global address past duplicate
# address detection (a tentative one cannot be a source, RFC 4862 section 5.4).
for _ in \$(seq 100); do
    ip -6 -o addr show dev tap0 scope global -tentative | grep -q 'fd00::' && break
    sleep 0.1
done
curl -sS --max-time 10 'http://[fd00::2]:$port/hello.txt'
" 2>"$dev/rk.log" || { cat "$dev/rk.log" >&2; exit 1; }
"""


@pytest.mark.parametrize("binary", ["relaynat", "/usr/bin/slirp4netns"])
def test_rootlesskit_ipv6_and_cidr(binary: str) -> None:
    """`--ipv6` (rootlesskit passes --enable-ipv6; the child takes its address from the
    router advertisement) and `--cidr`: the child is .100 of that network and reaches
    the host's ::1 through fd00::2."""
    env = {**os.environ, **nobody_env(), "BINARY": binary}
    done = run_scenario(_IPV6_CIDR, env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == ["addr 10.9.0.100/24", "from host ::1"], (
        done.stdout + done.stderr)
