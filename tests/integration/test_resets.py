"""Resets mid-transfer, both ways, through a real namespace guest (`relaynat run`).

A host peer that closes with SO_LINGER 0 sends a RST: the guest's socket must then
report ECONNRESET (not EOF, not a hang). A guest that does the same must make the
host peer's socket report ECONNRESET. Each in both directions of transfer: the side
that resets is sending, or receiving, when it does. The peer is a thread of the test
on the suite's private 127.0.0.1, which the guest reaches as 10.0.2.2.
"""

from __future__ import annotations

import json

import pytest
from support import SUPPORT
from support.faultkit import MIB, OneShotPeer
from support.relaynat_cli import guest_python, parse_stats, relaynat_run

pytestmark = pytest.mark.integration

GUEST_TOOLS = str(SUPPORT / "guest_tools.py")
GATEWAY = "10.0.2.2"
#: Bytes moved before the reset: many windows' worth, so the flow is in full swing.
RESET_AFTER = 8 * MIB


def _guest(port: int, *args: str) -> tuple[dict, dict[str, int]]:  # type: ignore[type-arg]
    done = relaynat_run(guest_python(), GUEST_TOOLS, "tcp-reset", GATEWAY, str(port), *args,
                        timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), parse_stats(done.stderr)


@pytest.mark.parametrize("peer_sends", [True, False], ids=["peer-sending", "peer-receiving"])
def test_host_peer_reset_reaches_the_guest_as_econnreset(peer_sends: bool) -> None:
    peer = OneShotPeer(send=peer_sends, reset_after=RESET_AFTER)
    out, stats = _guest(peer.port, "--recv" if peer_sends else "--send")
    assert peer.result() == ("reset-sent", RESET_AFTER)
    assert out["outcome"] == "ECONNRESET", out
    # The guest got a part of the stream (data the RST overtook is lost, as TCP says).
    assert out["bytes"] > 0, out
    if not peer_sends:
        assert out["bytes"] >= RESET_AFTER, out  # it sent at least what the peer read
    assert stats["tcp_host_errors"] >= 1, stats
    assert stats.get("tcp_internal_errors", 0) == 0


@pytest.mark.parametrize("guest_sends", [True, False], ids=["guest-sending", "guest-receiving"])
def test_guest_reset_reaches_the_host_peer_as_econnreset(guest_sends: bool) -> None:
    peer = OneShotPeer(send=not guest_sends)
    out, stats = _guest(peer.port, "--send" if guest_sends else "--recv",
                        "--reset-after", str(RESET_AFTER))
    assert out == {"bytes": RESET_AFTER, "outcome": "reset-sent"}
    outcome, moved = peer.result()
    assert outcome == "ECONNRESET", (outcome, moved)
    assert moved > 0
    if not guest_sends:
        assert moved >= RESET_AFTER  # the peer sent at least what the guest read
    # The relay passed the guest's RST on as a reset of its host socket.
    assert stats["tcp_host_resets"] >= 1, stats
    assert stats.get("tcp_internal_errors", 0) == 0
