#!/usr/bin/env bash
# A qemu guest on `relaynat serve --unixgram PATH` (qemu 7.2+ `-netdev dgram`).
#
#   examples/qemu_dgram.sh KERNEL [INITRD [APPEND]]
#
# Environment (defaults in brackets):
#   RELAYNAT_SOCK  the relay's datagram socket [a new temporary directory's relay.dgram]
#   RELAYNAT       how to run relaynat [relaynat], e.g. "python3 -m relaynat"
#   QEMU           [qemu-system-x86_64]      QEMU_ACCEL  [kvm:tcg]
#   QEMU_MEM       guest MiB [256]           QEMU_MAC    [52:54:00:12:34:56]
#   QEMU_EXTRA     more qemu arguments, split on spaces (disks, -smp, ...) []
# qemu's serial console is stdout; the relay's counters go to stderr when it stops.
# The exit status is qemu's. The guest gets 10.0.2.15/24 via 10.0.2.2 by DHCP.
set -euo pipefail

kernel=${1:?usage: $0 KERNEL [INITRD [APPEND]]}
initrd=${2:-}
append=${3:-console=ttyS0}
read -ra relaynat <<<"${RELAYNAT:-relaynat}"
read -ra extra <<<"${QEMU_EXTRA:-}"
# Waiting for the socket file proves the relay is ready only if the file is new.
if [ -e "${RELAYNAT_SOCK:-}" ]; then
    echo "$0: $RELAYNAT_SOCK exists (another relay's?); remove it or pick another" >&2
    exit 1
fi
workdir=$(mktemp -d)
sock=${RELAYNAT_SOCK:-$workdir/relay.dgram}
relay_pid=""
qemu_pid=""

cleanup() {
    [ -n "$qemu_pid" ] && kill "$qemu_pid" 2>/dev/null && wait "$qemu_pid" || true
    # SIGTERM: the relay resets the guest's flows, prints --stats and removes the socket.
    [ -n "$relay_pid" ] && kill -TERM "$relay_pid" 2>/dev/null && wait "$relay_pid" || true
    rm -rf -- "$workdir"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"${relaynat[@]}" serve --stats --unixgram "$sock" &
relay_pid=$!
# qemu sends every frame to the relay's path from its own bound socket (local.path), so
# the relay must be bound first; it serves whichever address sends first.
for _ in $(seq 100); do
    [ -S "$sock" ] && break
    kill -0 "$relay_pid" 2>/dev/null || { echo "relaynat serve failed" >&2; exit 1; }
    sleep 0.1
done
[ -S "$sock" ] || { echo "relaynat did not create $sock" >&2; exit 1; }

boot=(-kernel "$kernel" -append "$append")
[ -n "$initrd" ] && boot+=(-initrd "$initrd")
"${QEMU:-qemu-system-x86_64}" \
    -machine "q35,accel=${QEMU_ACCEL:-kvm:tcg}" -cpu max -m "${QEMU_MEM:-256}" \
    -nodefaults -no-user-config -display none -monitor none -serial stdio -no-reboot \
    "${boot[@]}" \
    -netdev "dgram,id=n0,local.type=unix,local.path=$workdir/qemu.dgram,remote.type=unix,remote.path=$sock" \
    -device "virtio-net-pci,netdev=n0,mac=${QEMU_MAC:-52:54:00:12:34:56},romfile=" \
    "${extra[@]}" </dev/null &
qemu_pid=$!
status=0
wait "$qemu_pid" || status=$?   # a signal to this script interrupts the wait (traps run)
qemu_pid=""
exit "$status"
