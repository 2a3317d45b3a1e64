#!/usr/bin/env bash
# Network for containers and other network namespaces, pasta-style.
#
#   examples/container_netns.sh run [RUN OPTIONS] -- CMD [ARGS...]
#       CMD in a new network namespace whose only link is relaynat's TAP, e.g.
#         run -- curl http://10.0.2.2:8000/      (10.0.2.2 is the host's 127.0.0.1)
#         run -t 8080:80 -- python3 -m http.server 80     (host port 8080 -> guest 80)
#       The exit status is CMD's. RUN OPTIONS are `relaynat run`'s (-t, -u, --sandbox,
#       --policy, -m, ...).
#   examples/container_netns.sh attach NETNS [IFNAME [SERVE OPTIONS...]]
#       a namespace that already exists: NETNS is a process in it (a container's PID)
#       or an `ip netns` name. relaynat has no option to join one itself (pasta's
#       `pasta PID` form); instead a veth pair puts IFNAME [eth0] in the namespace and
#       `relaynat serve --interface` serves the near end, as for a VM's TAP. Inside,
#       run a DHCP client on IFNAME (`udhcpc -i eth0`) or configure 10.0.2.15/24 via
#       10.0.2.2. Runs until SIGTERM/SIGINT; the veth pair is deleted on exit.
#
# Environment: RELAYNAT (how to run relaynat [relaynat]), MTU (veth MTU [65520]),
# HOST_IF (the near end's name [rnv<pid of this script>]).
# Both forms need root (or CAP_NET_ADMIN; `run` also works unprivileged, in a user
# namespace). Counters go to stderr when the relay stops.
set -euo pipefail

usage="usage: $0 run [OPTIONS] -- CMD [ARGS...] | attach NETNS [IFNAME [OPTIONS...]]"
read -ra relaynat <<<"${RELAYNAT:-relaynat}"
mode=${1:?$usage}
shift

case "$mode" in
run)
    exec "${relaynat[@]}" run --stats "$@"
    ;;
attach)
    netns=${1:?$usage}
    ifname=${2:-eth0}
    shift $(($# < 2 ? $# : 2))
    ;;
*)
    echo "$usage" >&2
    exit 2
    ;;
esac

if [[ $netns =~ ^[0-9]+$ ]]; then nspath=/proc/$netns/ns/net; else nspath=/run/netns/$netns; fi
[ -e "$nspath" ] || { echo "$0: no network namespace $nspath" >&2; exit 1; }
near=${HOST_IF:-rnv$$}
mtu=${MTU:-65520}
relay_pid=""
cleanup() {
    [ -n "$relay_pid" ] && kill -TERM "$relay_pid" 2>/dev/null && wait "$relay_pid" || true
    ip link del dev "$near" 2>/dev/null || true   # takes the far end with it
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ip link add "$near" mtu "$mtu" type veth peer name "$ifname" mtu "$mtu" netns "$netns"
ip link set dev "$near" addrgenmode none   # the host stays silent on it
ip link set dev "$near" up
nsenter --net="$nspath" ip link set dev "$ifname" up
"${relaynat[@]}" serve --stats --interface "$near" "$@" &
relay_pid=$!
status=0
wait "$relay_pid" || status=$?   # a signal to this script interrupts the wait (traps run)
relay_pid=""
exit "$status"
