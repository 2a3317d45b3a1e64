"""The guest's transport disappears while it has flows open.

A real guest kernel on `relaynat serve --socket` (through tests/netshim.py with a
clean wire: a qemu-style stream client with a TAP behind it) holds N TCP connections
to a host peer. Then its end of the stream socket dies with it (the shim is
SIGKILLed, as a killed qemu would be). Every host peer connection must see its end
within a bounded time, the relay's descriptors must return to what they were before
the guest came, and the next guest must be accepted and get its DHCP lease.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faultkit import HoldingPeer, fd_count, wait_until
from lossy_harness import serve_relay, stop_proc
from netshim import GATEWAY_IP, GUEST_IP, LossyGuest

pytestmark = pytest.mark.integration

GUEST_TOOLS = str(Path(__file__).parent / "guest_tools.py")
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
                wait_until(lambda: len(peer.ended) == FLOWS, CLOSE_BOUND_S,
                           "every host peer connection closed")
                wait_until(lambda: fd_count(relay.proc.pid) == baseline, CLOSE_BOUND_S,
                           "relay descriptors back to the baseline")
            finally:
                go.touch()
                stop_proc(holder)
        slowest = max(t for _, t in peer.ended) - gone_at
        with LossyGuest(tmp_path, relay.socket, seed) as second:
            lease = second.dhcp()
        stop_proc(relay.proc)
    peer.close()
    stats = relay.stats()
    print(f"{FLOWS} flows: relay fds {baseline} -> {during} -> {baseline}; every peer "
          f"closed {slowest * 1000:.0f} ms after the guest's socket died; "
          f"outcomes {sorted({o for o, _ in peer.ended})}")
    assert during >= baseline + FLOWS
    # The relay resets them toward the hosts (their guest can no longer close them).
    assert {o for o, _ in peer.ended} == {"ECONNRESET"}, peer.ended
    assert lease.get("ip") == GUEST_IP and lease.get("router") == GATEWAY_IP, lease
    assert stats["tcp_flows_closed_on_detach"] == FLOWS, stats
    assert stats["stream_clients"] == 2, stats
    assert "Traceback" not in relay.log.read_text(errors="replace")
