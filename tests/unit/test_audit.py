"""`AuditLog` (audit.py): a real relay's events written as JSON lines off the event
loop, read back as the same events; a writer that falls behind loses events, counted
in the log and in the relay's `audit_dropped`, and never holds the relay up."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from pathlib import Path

import pytest

from relaynat import AuditLog, FlowClosed, FlowOpened, TransportLost, event_from_dict
from relaynat.testing import InMemoryGuest


async def _wait_written(audit: AuditLog, n: int) -> None:
    deadline = time.monotonic() + 5
    while audit.written < n:
        assert time.monotonic() < deadline, f"{audit.written} of {n} written"
        await asyncio.sleep(0.01)


async def test_a_flows_events_are_written_as_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    async with InMemoryGuest() as guest:
        audit = AuditLog(path)
        audit.attach(guest.relay)
        conn = await guest.tcp_connect(guest.sink_port)
        await conn.send(b"hello")
        await _wait_written(audit, 1)
    audit.close()  # what the relay's close queued (the flow's end) is written now
    events = [event_from_dict(json.loads(line)) for line in path.read_text().splitlines()]
    opened = [e for e in events if isinstance(e, FlowOpened)]
    closed = [e for e in events if isinstance(e, FlowClosed)]
    assert len(opened) == 1 and opened[0].far.port == guest.sink_port
    assert opened[0].rule == -1 and opened[0].names == () and opened[0].wire_name is None
    assert len(closed) == 1 and closed[0].bytes_from_guest == 5
    assert closed[0].how == "detached"
    assert audit.dropped == 0


class _Stalled(io.StringIO):
    """A stream whose writes wait until `go` is set: a disk that fell behind."""

    def __init__(self) -> None:
        super().__init__()
        self.go = threading.Event()

    def write(self, s: str) -> int:
        self.go.wait(0.2)
        return super().write(s)


async def test_a_writer_behind_drops_and_counts_and_never_blocks() -> None:
    stream = _Stalled()
    async with InMemoryGuest() as guest:
        audit = AuditLog(stream=stream, maxsize=10)
        audit.attach(guest.relay)
        event = TransportLost(0.0, None, "test")
        start = time.monotonic()
        for _ in range(100):
            audit.offer(event)
        assert time.monotonic() - start < 0.5  # the stalled writer held nothing up
        # The executor's batch holds at most the first event; the queue ten more.
        assert 100 - 11 <= audit.dropped <= 100 - 10
        assert guest.relay.stats()["audit_dropped"] == audit.dropped
        stream.go.set()
        await _wait_written(audit, 100 - audit.dropped)
        audit.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == audit.written == 100 - audit.dropped
    assert all(json.loads(line)["kind"] == "transport_lost" for line in lines)
    audit.offer(event)  # after close: dropped, not written
    assert audit.written == len(lines)


def test_a_log_takes_a_path_or_a_stream() -> None:
    with pytest.raises(ValueError, match="a path or a stream"):
        AuditLog()
    with pytest.raises(ValueError, match="maxsize"):
        AuditLog(stream=io.StringIO(), maxsize=0)


def test_decision_records_carry_names_and_read_back_without_them() -> None:
    """The fields a decision record gained round-trip through JSON (tuples of names as
    lists), and a record written before them reads back with their defaults."""
    from relaynat import Endpoint, FlowDenied, event_dict

    denied = FlowDenied(1.0, "vm0", "tcp", Endpoint("11.2.0.2", 443), 5, "allowed domains",
                        "name_mismatch", ("www.allowed.test", "cdn.allowed.test"),
                        "www.other.test")
    line = json.dumps(event_dict(denied))
    assert json.loads(line)["names"] == ["www.allowed.test", "cdn.allowed.test"]
    assert event_from_dict(json.loads(line)) == denied
    opened = FlowOpened(1.0, None, "tcp", "outbound", Endpoint("10.0.2.15", 40000),
                        Endpoint("11.2.0.2", 443), Endpoint("11.2.0.2", 443),
                        ("www.allowed.test",), "www.allowed.test", 5, "allowed domains")
    assert event_from_dict(json.loads(json.dumps(event_dict(opened)))) == opened
    old = {"kind": "flow_denied", "time": 1.0, "guest": None, "protocol": "udp",
           "far": ["10.0.0.1", 53], "rule": -1, "comment": ""}
    assert event_from_dict(old) == FlowDenied(1.0, None, "udp", Endpoint("10.0.0.1", 53),
                                              -1, "")
