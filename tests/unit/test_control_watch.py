"""The control socket's `watch` (control/server.py): a real relay (relaynat.testing's
`InMemoryGuest`) and its ControlServer in the test's loop, spoken to over the unix
socket. The events stream as JSON lines after the answer, end with the relay, and a
watcher that stops reading holds nothing up: it loses events (counted) and is let go.
`relaynat ctl watch` against `relaynat run`: tests/integration/test_wire_names.py."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import time
from pathlib import Path

from relaynat.control.server import ControlServer
from relaynat.testing import InMemoryGuest, frames


async def _watch(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(b'{"execute": "watch"}\n')
    await writer.drain()
    assert json.loads(await asyncio.wait_for(reader.readline(), 5)) == {
        "return": {"watching": True}}
    return reader, writer


async def test_watch_streams_a_flows_events_until_the_relay_closes(tmp_path: Path) -> None:
    path = str(tmp_path / "control.sock")
    guest = InMemoryGuest()
    guest.start()
    control = ControlServer(path)
    await control.start(guest.relay)
    try:
        reader, writer = await _watch(path)
        conn = await guest.tcp_connect(guest.sink_port)
        await conn.send(b"hello")
        seen = []
        while not any(e["kind"] == "flow_opened" for e in seen):
            seen.append(json.loads(await asyncio.wait_for(reader.readline(), 5)))
        opened = next(e for e in seen if e["kind"] == "flow_opened")
        assert opened["far"][1] == guest.sink_port and opened["protocol"] == "tcp"
        guest.close()  # the relay closes: the flow's end, then the end of the stream
        rest = [json.loads(line) for line in
                (await asyncio.wait_for(reader.read(), 5)).splitlines()]
        assert [e["kind"] for e in rest if e["kind"] == "flow_closed"] == ["flow_closed"]
        writer.close()
    finally:
        control.close()
        guest.close()


async def _flood(guest: InMemoryGuest, flows: int, pace: bool) -> None:
    """A UDP flow opened for each of `flows` ports: an event each, for a watcher."""
    for port in range(20000, 20000 + flows):
        await guest.send(frames.udp_datagram(guest.addressing, False, port, 9, b"x"))
        if pace and port % 20 == 0:
            await asyncio.sleep(0.001)  # the watcher's turn: it writes what it got


async def test_a_watcher_that_stops_reading_holds_nothing_up(tmp_path: Path) -> None:
    """It loses what its queue cannot hold, counted, while the relay goes on."""
    path = str(tmp_path / "control.sock")
    async with InMemoryGuest() as guest:
        control = ControlServer(path, watch_queue=16)
        await control.start(guest.relay)
        try:
            _reader, writer = await _watch(path)
            start = time.monotonic()
            await _flood(guest, 3000, pace=False)
            assert time.monotonic() - start < 30
            conn = await guest.tcp_connect(guest.sink_port)  # the relay went on
            await conn.send(b"still here")
            assert guest.stats()["events_dropped"] > 0
            writer.close()
        finally:
            control.close()


async def test_a_watcher_whose_lines_wait_too_long_is_let_go(tmp_path: Path) -> None:
    """Once a line waited `idle_timeout_s` to be taken, the connection is dropped at
    once, its unread lines with it (a close would wait for them to be read)."""
    path = str(tmp_path / "control.sock")
    async with InMemoryGuest() as guest:
        control = ControlServer(path, idle_timeout_s=0.5)
        await control.start(guest.relay)
        try:
            reader, writer = await _watch(path)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await _flood(guest, 3000, pace=True)  # far more lines than the buffers hold
            await asyncio.sleep(1.0)
            # The relay's end is closed while lines it wrote are still unread here.
            hangup = select.poll()
            hangup.register(sock.fileno(), select.POLLRDHUP)
            assert hangup.poll(0), "the watcher was not let go"
            await asyncio.wait_for(reader.read(), 5)  # what is left, then the end
            writer.close()
        finally:
            control.close()
