"""Descriptor exhaustion: the relay at a low `ulimit -n`, a guest asking for more.

`relaynat run` raises its own RLIMIT_NOFILE at start-up to fit its flow maxima, so the
test lowers the soft limit of the running relay (prlimit(2), as `prlimit --pid`
does) once the guest's first connection is up. The guest then opens more connections
than the limit leaves room for: each must connect or be refused by RST
(ECONNREFUSED at once, no timeout), counted as `tcp_refused_fd_limit`; a UDP flow is
dropped and counted as `udp_drop_fd_limit`; the first connection keeps echoing
intact; the relay logs one warning, no traceback, and serves new flows again once
descriptors are free.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from support import SUPPORT
from support.faultkit import LiveRun, cpu_seconds, lowest_free_fd, nofile_limit
from support.relaynat_cli import guest_python

pytestmark = pytest.mark.integration
pytest_plugins = ["support.guest_fs"]

GUEST_TOOLS = str(SUPPORT / "guest_tools.py")
GATEWAY = "10.0.2.2"
#: Descriptors left to the relay above those it holds when the limit is lowered.
ROOM = 20
#: Connections the guest tries at the limit: well beyond ROOM.
TRIES = 60


def test_low_nofile_refuses_new_flows_cleanly_and_the_open_one_runs(
        start_peer, udp_echo: int, guest_dir: Path) -> None:
    port = start_peer("echo")
    ready, go = guest_dir / "ready", guest_dir / "go"
    run = LiveRun([guest_python(), GUEST_TOOLS, "fd-exhaust", GATEWAY, str(port),
                   "--conns", str(TRIES), "--ready", str(ready), "--go", str(go),
                   "--udp-port", str(udp_echo)])
    try:
        run.wait_file(ready)
        # RLIMIT_NOFILE bounds the descriptor *number* (the lowest free one is used).
        nofile_limit(run.pid, lowest_free_fd(run.pid) + ROOM)
        go.touch()
        status, stats = run.finish(timeout_s=120)
    finally:
        run.kill()
    assert status == 0, run.stdout + run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    outcomes = out["outcomes"]
    ok, refused = outcomes.count("ok"), outcomes.count("ECONNREFUSED")
    print(f"at {ROOM} free descriptors: {ok} connected, {refused} refused; stats "
          f"{ {k: v for k, v in stats.items() if 'fd_limit' in k} }")
    assert ok + refused == TRIES, outcomes  # no timeouts, no other errors
    assert 0 < ok <= ROOM and refused >= TRIES - ROOM, outcomes
    assert stats["tcp_refused_fd_limit"] == refused, stats
    assert out["udp"] == "timeout" and stats["udp_drop_fd_limit"] == 1, (out, stats)
    assert out["before"] is True and out["during"] is True, out
    assert out["after"] == "ok", out
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    # One warning per kind, however many flows the guest tried.
    assert run.stderr.count("cannot open a host TCP socket") == 1, run.stderr[-3000:]
    assert stats.get("tcp_internal_errors", 0) == 0


def test_forward_at_the_fd_limit_waits_without_spinning_then_serves(guest_dir: Path) -> None:
    """A client of a forwarded port while the relay has no descriptor left: accept()
    fails with EMFILE and the connection waits in the listener's backlog. The relay
    must not spin on the still-readable listener (CPU stays low), and once descriptors
    are back it must accept the waiting client and carry it to the guest."""
    with socket.socket() as probe:  # a free port for the forward (the suite's netns)
        probe.bind(("127.0.0.1", 0))
        host_port = probe.getsockname()[1]
    ready = guest_dir / "ready"
    run = LiveRun([guest_python(), GUEST_TOOLS, "peer-echo", "5353", "--events", "1",
                   "--ready", str(ready)],
                  # The guest's link: a spliced client would count no tcp_inbound_opened.
                  options=("--no-splice", "-t", f"127.0.0.1/{host_port}:5353"))
    try:
        run.wait_file(ready)
        soft, _ = nofile_limit(run.pid)
        nofile_limit(run.pid, lowest_free_fd(run.pid))
        client = socket.create_connection(("127.0.0.1", host_port), timeout=30)
        client.sendall(b"hello")
        client.shutdown(socket.SHUT_WR)
        time.sleep(0.5)  # the relay has seen the listener readable and failed to accept
        cpu0, t0 = cpu_seconds(run.pid), time.monotonic()
        time.sleep(2)
        busy = (cpu_seconds(run.pid) - cpu0) / (time.monotonic() - t0)
        nofile_limit(run.pid, soft)
        reply = client.recv(4096)
        client.close()
        status, stats = run.finish(timeout_s=60)
    finally:
        run.kill()
    print(f"relay CPU while accept() failed: {busy:.0%}")
    assert busy < 0.3, f"the relay spun at {busy:.0%} CPU on a listener it cannot accept"
    assert status == 0, run.stdout + run.stderr[-3000:]
    assert reply.endswith(b" 5"), reply
    assert stats["tcp_inbound_opened"] == 1, stats
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
