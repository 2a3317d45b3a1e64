"""The real podman (Debian's 4.3.1, rootful) with `--network slirp4netns` and containers.conf's
`network_cmd_path` naming `relaynat-slirp4netns`, and the real slirp4netns in the same
test as the reference.

The image is a busybox rootfs (busybox-static's /bin/busybox) imported with `podman
import`: no registry. Inside the container a name resolves through 10.0.2.3 (the
binary's upstream is a dnsmasq on loopback, named by the resolv.conf the binary reads),
64 MiB arrive intact by `wget`, 10.0.2.2 is refused as podman asks
(`--disable-host-loopback`) and reached with `allow_host_loopback=true`, and `-p
127.0.0.1:PORT:80` reaches busybox httpd inside with both of podman's port handlers
(rootlessport, and `port_handler=slirp4netns`, which is the binary's API socket).

This machine's container setup needs three things, all scoped to the scenario's own
mount namespace or to podman's command line:
- `--ulimit host` with `default_ulimits = []`: rootful podman asks for RLIMIT_NOFILE and
  RLIMIT_NPROC of 1048576, above the hard limits here, and root here lacks
  CAP_SYS_RESOURCE, so crun's setrlimit fails with EPERM;
- /sys/fs/cgroup/unified unmounted: the machine is cgroup v1 with a v2 hierarchy holding
  the hugetlb controller, which crun refuses ("cgroups in hybrid mode not supported");
- storage (vfs), run, tmp and CNI configuration directories under the scenario's
  tmpfs, and tmpfs mounts on /run (netns bind mounts, crun's state) and /var/lib (root's
  blob-info cache), so nothing of podman's outlives the test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import SUPPORT
from support.dropin_kit import (
    DNSMASQ,
    RESOLV_LOOPBACK,
    SCRATCH,
    WAIT_PORT,
    free_port,
    http_peer,
    run_digest_scenario,
)

pytestmark = pytest.mark.integration

RELAYNAT_SLIRP4NETNS = str(Path(sys.executable).parent / "relaynat-slirp4netns")

_SCENARIO = SCRATCH + r"""
# podman's netns bind mounts and crun's state (/run/crun) stay in this mount namespace.
mount -t tmpfs tmpfs /run
mkdir /run/netns
umount /sys/fs/cgroup/unified 2>/dev/null || true
# containers/image keeps root's blob-info cache in /var/lib/containers/cache whatever
# the storage root: a tmpfs over /var/lib keeps it (and anything else there) here.
mount -t tmpfs tmpfs /var/lib
""" + RESOLV_LOOPBACK + r"""
ip link set lo up
ip addr add 198.18.0.1/32 dev lo
mkdir "$dev/www" "$dev/rootfs"
echo "from host loopback" > "$dev/www/hello.txt"
head -c 64M /dev/urandom > "$dev/www/big.bin"
echo "big $(sha256sum < "$dev/www/big.bin" | cut -d' ' -f1)"
# The argv podman passes is logged, which also shows podman ran this binary.
printf '#!/bin/sh\necho "$*" >> %s/argv.log\nexec %s "$@"\n' "$dev" "$BINARY" \
    > "$dev/network-cmd"
chmod 755 "$dev/network-cmd"
cat > "$dev/containers.conf" <<CONF
[containers]
netns = "slirp4netns"
default_ulimits = []
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "crun"
tmp_dir = "$dev/libpod-tmp"
network_cmd_path = "$dev/network-cmd"
[network]
network_config_dir = "$dev/cni"
CONF
cat > "$dev/storage.conf" <<CONF
[storage]
driver = "vfs"
runroot = "$dev/runroot"
graphroot = "$dev/graph"
CONF
export CONTAINERS_CONF="$dev/containers.conf" CONTAINERS_STORAGE_CONF="$dev/storage.conf"
mkdir -p "$dev/rootfs/bin" "$dev/rootfs/etc" "$dev/rootfs/www"
cp /bin/busybox "$dev/rootfs/bin/"
for a in sh wget httpd ip nslookup sha256sum cut grep head sed timeout; do
    ln -s busybox "$dev/rootfs/bin/$a"
done
echo "from inside" > "$dev/rootfs/www/inside.txt"
tar -C "$dev/rootfs" -cf "$dev/busybox.tar" .
podman import -q "$dev/busybox.tar" localhost/relaynat-busybox:test >/dev/null
""" + DNSMASQ + http_peer("0.0.0.0") + r"""
trap 'podman rm -f -t 0 -a >/dev/null 2>&1; kill $dns $http 2>/dev/null || true; cleanup' EXIT
""" + WAIT_PORT + r"""
image=localhost/relaynat-busybox:test
run="podman run --rm --ulimit host"
# busybox's wget crashes on a refused connection when given -T; timeout bounds it.
$run --network slirp4netns $image sh -c "
ip -o -4 addr show tap0 | cut -d' ' -f2,7 | sed 's/^/addr /'
echo resolve \$(nslookup probe.test 10.0.2.3 | grep -A3 probe.test | grep -o 198.18.0.7)
if timeout 10 wget -q -O - http://10.0.2.2:$port/hello.txt 2>/dev/null; then :; else
    echo 'loopback refused'; fi
echo down \$(wget -q -O - http://198.18.0.1:$port/big.bin | sha256sum | cut -d' ' -f1)
"
$run --network slirp4netns:allow_host_loopback=true $image \
    timeout 10 wget -q -O - http://10.0.2.2:$port/hello.txt
for handler in rootlesskit slirp4netns; do
    $run -d --network slirp4netns:port_handler=$handler -p 127.0.0.1:$FWD:80 $image \
        httpd -f -p 80 -h /www >/dev/null
    echo "$handler $(curl -sS --max-time 10 --retry 10 --retry-connrefused --retry-delay 1 \
        http://127.0.0.1:$FWD/inside.txt)"
    podman rm -f -t 0 -a >/dev/null
done
echo "dns queries $(grep -c 'query\[A\] probe.test' "$dev/dns.log")"
grep -v -e '--help' "$dev/argv.log" \
    | sed 's#/run/netns/netns-[0-9a-f-]*#NETNS#; s#--api-socket [^ ]*#--api-socket API#' \
    | sed 's/^/argv /'
"""


@pytest.mark.parametrize("binary", [RELAYNAT_SLIRP4NETNS, "/usr/bin/slirp4netns"])
def test_podman_slirp4netns_network_cmd_path(binary: str) -> None:
    for tool in ("podman", "crun", "conmon", "dnsmasq", "busybox", "curl"):
        assert shutil.which(tool), f"{tool} is installed by install.sh"
    assert os.access(binary, os.X_OK), binary
    env = {**os.environ, "BINARY": binary, "FWD": str(free_port()),
           "PEERS": str(SUPPORT / "host_peers.py")}
    digest, out, report = run_digest_scenario(_SCENARIO, env=env, timeout=300)
    assert out[:8] == [
        "addr tap0 10.0.2.100/24",
        "resolve 198.18.0.7",
        "loopback refused",
        f"down {digest}",
        "from host loopback",
        "rootlesskit from inside",
        "slirp4netns from inside",
        "dns queries 1",
    ], report
    # podman 4.3's setupSlirp4netns argv, once per container: the default network with
    # host loopback off, then allow_host_loopback, then the two port handlers. It passes
    # --enable-sandbox and --enable-seccomp when the binary's --help names them.
    helptext = subprocess.run([binary, "--help"], capture_output=True, text=True,
                              timeout=30).stdout
    confine = " ".join(flag for flag in ("--enable-sandbox", "--enable-seccomp")
                       if flag in helptext)
    head = f"--mtu=65520 {confine} --enable-ipv6 -c -e 3 -r 4".replace("  ", " ")
    tail = "--netns-type=path NETNS tap0"
    assert [line.removeprefix("argv ") for line in out[8:]] == [
        f"--disable-host-loopback {head} {tail}",
        f"{head} {tail}",
        f"--disable-host-loopback {head} {tail}",
        f"--disable-host-loopback {head} --api-socket API {tail}",
    ], report
