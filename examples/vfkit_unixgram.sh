#!/usr/bin/env bash
# vfkit, krunkit or a libkrun launcher on `relaynat serve --unixgram PATH` (macOS VMMs;
# the relay side runs anywhere). See vfkit_unixgram.md for the libkrun C API.
#
#   examples/vfkit_unixgram.sh SOCK                  the relay alone, in the foreground
#   examples/vfkit_unixgram.sh SOCK vfkit ARGS...    the relay, then vfkit with ARGS and
#   examples/vfkit_unixgram.sh SOCK krunkit ARGS...  a virtio-net device on SOCK
#
# Environment: RELAYNAT (how to run relaynat [relaynat]), MAC [52:54:00:12:34:56].
# The VMM binds a socket of its own, connects it to SOCK and sends the 4 bytes VFKT
# first (vfkit always; krunkit with vfkitMagic=on); relaynat consumes them and serves
# whichever address sends first, one guest per socket. Frames are plain Ethernet, one
# per datagram: no virtio-net offloads (krunkit's type=unixgram form leaves them off).
set -euo pipefail

sock=${1:?usage: $0 SOCK [vfkit|krunkit VMM-ARGS...]}
shift
read -ra relaynat <<<"${RELAYNAT:-relaynat}"
mac=${MAC:-52:54:00:12:34:56}

if [ $# -eq 0 ]; then
    echo "vfkit:   --device virtio-net,unixSocketPath=$sock,mac=$mac" >&2
    echo "krunkit: --device virtio-net,type=unixgram,path=$sock,mac=$mac,vfkitMagic=on" >&2
    exec "${relaynat[@]}" serve --stats --unixgram "$sock"
fi

vmm=$1
shift
case "$(basename "$vmm")" in
    vfkit) device="virtio-net,unixSocketPath=$sock,mac=$mac" ;;
    krunkit) device="virtio-net,type=unixgram,path=$sock,mac=$mac,vfkitMagic=on" ;;
    *) echo "$0: unknown VMM $vmm (vfkit or krunkit)" >&2; exit 2 ;;
esac

# Waiting for the socket file proves the relay is ready only if the file is new.
if [ -e "$sock" ]; then
    echo "$0: $sock exists (another relay's?); remove it or pick another" >&2
    exit 1
fi
relay_pid=""
vmm_pid=""
cleanup() {
    [ -n "$vmm_pid" ] && kill "$vmm_pid" 2>/dev/null && wait "$vmm_pid" || true
    [ -n "$relay_pid" ] && kill -TERM "$relay_pid" 2>/dev/null && wait "$relay_pid" || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
"${relaynat[@]}" serve --stats --unixgram "$sock" &
relay_pid=$!
for _ in $(seq 100); do   # the VMM connects at start: the relay must be bound first
    [ -S "$sock" ] && break
    kill -0 "$relay_pid" 2>/dev/null || { echo "relaynat serve failed" >&2; exit 1; }
    sleep 0.1
done
[ -S "$sock" ] || { echo "relaynat did not create $sock" >&2; exit 1; }
"$vmm" "$@" --device "$device" &
vmm_pid=$!
status=0
wait "$vmm_pid" || status=$?   # a signal to this script interrupts the wait (traps run)
vmm_pid=""
exit "$status"
