"""The guest's transport disappears while it has flows open.

A real guest kernel on `relaynat serve --socket` holds N TCP connections to a host
peer; then its end of the stream socket dies with it. The guest is a namespace behind
tests/support/netshim.py on a clean wire (a qemu-style stream client with a TAP behind it,
SIGKILLed as a killed qemu would be), and then qemu itself: the TCG VM of
tests/support/vmguest.py, SIGKILLed. Every host peer connection must see its end within a
bounded time, the relay's descriptors must return to what they were before the guest
came, and the next guest must be accepted and get its DHCP lease.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import SUPPORT
from support.faultkit import HoldingPeer, fd_count, wait_until
from support.lossy_harness import RelayProc, serve_relay, stop_proc
from support.netshim import GATEWAY_IP, GUEST_IP, LossyGuest
from support.vmguest import build_vm_images, guest_boot_args, qemu_command, vm_unavailable_reason

pytestmark = pytest.mark.integration

GUEST_TOOLS = str(SUPPORT / "guest_tools.py")
FLOWS = 50
#: How long the host peers may wait for the relay to close their connections once the
#: guest's socket is gone (it takes milliseconds; this only bounds a hang).
CLOSE_BOUND_S = 5.0


def test_guest_socket_gone_closes_its_flows_frees_fds_and_next_guest_is_served(
        tmp_path: Path) -> None:
    peer = HoldingPeer(FLOWS)
    seed = random.SystemRandom().randrange(1 << 32)
    with serve_relay(tmp_path) as relay:
        baseline = fd_count(relay.proc.pid)
        ready, go = tmp_path / "ready", tmp_path / "go"
        with LossyGuest(tmp_path, relay.socket, seed) as g:
            g.static()
            holder = subprocess.Popen(
                ["ip", "netns", "exec", g.name, sys.executable, GUEST_TOOLS, "hold",
                 GATEWAY_IP, str(peer.port), "--conns", str(FLOWS), "--ready", str(ready),
                 "--go", str(go)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                wait_until(ready.exists, 30, "guest connections", holder)
                assert json.loads(ready.read_text()) == ["ok"] * FLOWS
                wait_until(lambda: peer.accepted == FLOWS, 10, "host peer accepts")
                during = fd_count(relay.proc.pid)
                assert g.shim is not None
                os.kill(g.shim.pid, signal.SIGKILL)  # the guest's transport, gone
                gone_at = time.monotonic()
                _wait_released(peer, relay, FLOWS, baseline)
            finally:
                go.touch()
                stop_proc(holder)
        slowest = _next_guest_served(tmp_path, relay, peer, FLOWS, seed, gone_at)
    print(f"{FLOWS} flows: relay fds {baseline} -> {during} -> {baseline}; every peer "
          f"closed {slowest * 1000:.0f} ms after the guest's socket died; "
          f"outcomes {sorted({o for o, _ in peer.ended})}")
    assert during >= baseline + FLOWS


def _wait_released(peer: HoldingPeer, relay: RelayProc, flows: int, baseline: int) -> None:
    """The guest's transport is gone: every host peer sees its connection end and the
    relay's descriptors return to what they were before the guest came."""
    wait_until(lambda: len(peer.ended) == flows, CLOSE_BOUND_S,
               "every host peer connection closed")
    wait_until(lambda: fd_count(relay.proc.pid) == baseline, CLOSE_BOUND_S,
               "relay descriptors back to the baseline")


def _next_guest_served(tmp_path: Path, relay: RelayProc, peer: HoldingPeer, flows: int,
                       seed: int, gone_at: float) -> float:
    """A second guest gets its lease from the same relay; then the relay is stopped and
    its counters and the peers' outcomes checked. Returns how long after `gone_at` the
    last peer saw its connection end."""
    slowest = max(t for _, t in peer.ended) - gone_at
    with LossyGuest(tmp_path, relay.socket, seed) as second:
        lease = second.dhcp()
    stop_proc(relay.proc)
    peer.close()
    stats = relay.stats()
    # The relay resets them toward the hosts (their guest can no longer close them).
    assert {o for o, _ in peer.ended} == {"ECONNRESET"}, peer.ended
    assert lease.get("ip") == GUEST_IP and lease.get("router") == GATEWAY_IP, lease
    assert stats["tcp_flows_closed_on_detach"] == flows, stats
    assert stats["stream_clients"] == 2, stats
    assert "Traceback" not in relay.log.read_text(errors="replace")
    return slowest


VM_FLOWS = 20


@pytest.mark.vm
def test_qemu_killed_closes_its_flows_frees_fds_and_next_guest_is_served(
        tmp_path: Path) -> None:
    reason = vm_unavailable_reason()
    if reason is not None:
        pytest.fail(f"the qemu guest cannot run here: {reason}")
    images = build_vm_images(fetch=False)
    peer = HoldingPeer(VM_FLOWS)
    # busybox nc holds each connection open while its stdin (a sleep) lasts.
    command = (f"i=0; while [ $i -lt {VM_FLOWS} ]; do sleep 600 | nc {GATEWAY_IP} "
               f"{peer.port} >/dev/null & i=$((i+1)); done; sleep 600")
    with serve_relay(tmp_path) as relay:
        baseline = fd_count(relay.proc.pid)
        append, initrd = guest_boot_args(images, command, tmp_path)
        console = tmp_path / "console.log"
        with open(console, "wb") as out:
            qemu = subprocess.Popen(qemu_command(images, relay.socket, append=append,
                                                 initrd=initrd),
                                    stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        try:
            try:
                wait_until(lambda: peer.accepted == VM_FLOWS, 120, "the VM's connections",
                           qemu)
            except AssertionError as exc:
                tail = console.read_text(errors="replace")[-3000:]
                raise AssertionError(f"{exc}\n{tail}") from None
            during = fd_count(relay.proc.pid)
            os.killpg(qemu.pid, signal.SIGKILL)
            gone_at = time.monotonic()
            _wait_released(peer, relay, VM_FLOWS, baseline)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(qemu.pid, signal.SIGKILL)
            qemu.wait()
        slowest = _next_guest_served(tmp_path, relay, peer, VM_FLOWS, 1, gone_at)
    print(f"qemu with {VM_FLOWS} flows killed: relay fds {baseline} -> {during} -> "
          f"{baseline}; every peer closed {slowest * 1000:.0f} ms after")
    assert during >= baseline + VM_FLOWS
