#!/usr/bin/env bash
# Installs relaynat with everything its tests and benchmarks use, on Debian 12, as root:
# Debian packages (real peers and tools: iperf3, curl, socat, qemu, busybox, slirp4netns,
# pasta, sockperf, nftables for the benchmarks' veth+DNAT path; rootlesskit, podman and
# uidmap, which start relaynat-slirp4netns and relaynat-pasta as a rootless network;
# dnsmasq-base, a real resolver behind the relay, without the system service that the
# dnsmasq package enables), then a virtualenv in .venv with relaynat and its test and
# benchmark dependencies from PyPI.
set -euo pipefail
cd "$(dirname "$0")"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    python3 python3-venv python3-pip iproute2 iperf3 curl socat tcpdump dnsutils \
    iputils-ping busybox-static cpio qemu-system-x86 slirp4netns passt ca-certificates \
    ndisc6 isc-dhcp-client sockperf nftables rootlesskit podman uidmap dnsmasq-base wget \
    openssl \
    >/dev/null
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test,bench]'
# The qemu guest of the VM tests: Debian's cloud kernel (apt-get download, unpacked, not
# installed) and a busybox initramfs, cached in /var/cache/relaynat-vm.
.venv/bin/python tests/support/vmguest.py build
echo "relaynat installed in $(pwd)/.venv"
