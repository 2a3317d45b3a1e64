"""Closed flows are freed: a guest that opens and closes connections one after another
for as long as it likes holds no more relay memory than its open flows need.

Found by benches/soak.py, whose relay grew by 22 MiB over ten minutes of short
connections: each closed flow stayed referenced by its stale timer-heap entry until
that entry's deadline, as far off as the 2-hour idle timeout.
"""

from __future__ import annotations

import asyncio
import gc
import socket

from relaynat.nat_entry import TcpNatEntry
from relaynat.testing.guest import InMemoryGuest
from relaynat.wire import ACK, RST

CONNECTIONS = 2500


async def _echo_server(listener: socket.socket) -> None:
    loop = asyncio.get_running_loop()

    async def echo(conn: socket.socket) -> None:
        with conn:
            while data := await loop.sock_recv(conn, 65536):
                await loop.sock_sendall(conn, data)

    tasks = set()
    while True:
        conn, _ = await loop.sock_accept(listener)
        conn.setblocking(False)
        task = asyncio.ensure_future(echo(conn))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


def _live_entries() -> int:
    gc.collect()
    return sum(isinstance(obj, TcpNatEntry) for obj in gc.get_objects())


async def test_thousands_of_closed_connections_leave_no_flow_state_behind() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        listener.setblocking(False)
        server = asyncio.ensure_future(_echo_server(listener))
        before = _live_entries()
        async with InMemoryGuest() as guest:
            for i in range(CONNECTIONS):
                conn = await guest.tcp_connect(listener.getsockname()[1], sport=10000 + i)
                await conn.send(b"ping")
                assert await conn.recv_exactly(4) == b"ping"
                await guest.send(conn.frame(RST | ACK))
            await asyncio.sleep(0.2)
            assert guest.relay.flows() == []
            # The timer heap may keep some stale entries (it is rebuilt once they
            # outnumber twice the live flows plus 256), never one per closed flow.
            assert _live_entries() - before <= 300
        server.cancel()
