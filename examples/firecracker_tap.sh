#!/usr/bin/env bash
# Firecracker or cloud-hypervisor on a TAP, served by `relaynat serve --interface`.
# See firecracker.md for the VMM side.
#
#   examples/firecracker_tap.sh [IFNAME [SERVE OPTIONS...]]
#       IFNAME [tap0] is created if missing; SERVE OPTIONS go to `relaynat serve`
#       (--mtu, -t, --sandbox, --log-level info, ...).
#
# Environment: RELAYNAT (how to run relaynat [relaynat]), TAP_USER (owner of a TAP
# this script creates, so an unprivileged VMM may open it [root]).
# The relay runs in the foreground until SIGTERM/SIGINT or until IFNAME is removed;
# its counters go to stderr. It needs CAP_NET_RAW (its AF_PACKET socket) and creating
# the TAP needs CAP_NET_ADMIN. A TAP created here stays after the relay exits
# (`ip link del IFNAME` when done), like the one Firecracker's own guide creates.
set -euo pipefail

ifname=${1:-tap0}
shift $(($# < 1 ? $# : 1))
read -ra relaynat <<<"${RELAYNAT:-relaynat}"

if ! ip link show dev "$ifname" >/dev/null 2>&1; then
    ip tuntap add dev "$ifname" mode tap ${TAP_USER:+user "$TAP_USER"}
fi
# No address and no IPv6 link-local on it: the host kernel must neither answer nor
# route the guest's frames; relaynat answers ARP, DHCP and NDP itself.
ip link set dev "$ifname" addrgenmode none
ip link set dev "$ifname" up
exec "${relaynat[@]}" serve --stats --interface "$ifname" "$@"
