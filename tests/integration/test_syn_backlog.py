"""The new-flow rate and the SYN backlog (syn_backlog.py) with a real guest kernel: a
burst of connections larger than the burst the bucket allows, every one of which must
connect (the SYNs wait, none is refused). Without I/O:
tests/unit/test_syn_backlog_queue.py."""

from __future__ import annotations

import pytest
from support import GUESTS
from support.relaynat_cli import guest_python, parse_stats, relaynat_run


@pytest.mark.integration
def test_a_burst_beyond_the_bucket_waits_and_every_connection_opens(start_peer) -> None:
    """600 connections at once at 200 new flows a second after a burst of 256: the
    SYNs beyond wait (up to about 1.7 s, past the guest's 1 s SYN retransmission, so
    some arrive twice) and every connection opens once and echoes."""
    port = start_peer("echo")
    count = 600
    result = relaynat_run(guest_python(), str(GUESTS / "tcp_burst_echo.py"), str(port),
                          str(count), options=("--syn-rate", "200"), timeout=60)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"connected {count}" in result.stdout
    stats = parse_stats(result.stderr)
    assert stats["tcp_flows_opened"] == count
    # A loopback peer completes the handshake inside connect(): the SYN-ACK goes out in
    # the wakeup that opened the flow, not an epoll round later (tcp_relay._new_flow).
    assert stats["tcp_connects_at_once"] > 0
    assert stats["tcp_syn_deferred"] > 0
    assert stats.get("tcp_syn_backlog_dropped", 0) == 0
    assert stats.get("tcp_refused_flow_limit", 0) == 0 and stats.get("tcp_rst_sent", 0) == 0
