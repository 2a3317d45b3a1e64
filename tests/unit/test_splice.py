"""host/splice.py's Splicer on loopback sockets, in this process's own event loop: a
socket source that makes ordinary sockets (this namespace's) stands in for the guest's
namespace, so the splice(2) engine runs without root. The namespace side, the factory
and the command line are tests/integration/test_splice_forward.py's."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections import Counter
from collections.abc import Callable

import pytest

from relaynat.host.splice import Splicer


class _Source:
    """Fresh non-blocking TCP sockets of this process's namespace."""

    def take(self, family: int) -> socket.socket | None:
        af = socket.AF_INET6 if family == 6 else socket.AF_INET
        return socket.socket(af, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)


async def _client_of(splicer: Splicer, port: int) -> socket.socket:
    """A client whose accepted socket is handed to `splicer` for `port`."""
    loop = asyncio.get_running_loop()
    front = socket.create_server(("127.0.0.1", 0))
    client = socket.socket()
    client.setblocking(False)
    await loop.sock_connect(client, front.getsockname())
    near, _ = front.accept()
    front.close()
    assert splicer.open_inbound(near, False, port)
    return client


async def _read_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    got = bytearray()
    while chunk := await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 10):
        got += chunk
    return bytes(got)


async def _until(predicate: Callable[[], bool], what: str) -> None:
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def _service() -> socket.socket:
    service = socket.create_server(("127.0.0.1", 0))
    service.setblocking(False)
    return service


def test_bytes_cross_both_ways_and_each_half_close_after_them() -> None:
    async def main() -> Counter[str]:
        loop = asyncio.get_running_loop()
        stats: Counter[str] = Counter()
        splicer = Splicer(loop, stats, _Source(), 16)
        service = _service()
        client = await _client_of(splicer, service.getsockname()[1])
        far, _ = await asyncio.wait_for(loop.sock_accept(service), 5)
        up, down = os.urandom(8 << 20), os.urandom(3 << 20)
        # The client sends and half-closes: the service reads to the end (the FIN came
        # after every byte), then answers on its side, still open, and half-closes.
        sending = asyncio.ensure_future(loop.sock_sendall(client, up))
        reading = asyncio.ensure_future(_read_all(far))
        await sending
        client.shutdown(socket.SHUT_WR)
        assert await reading == up
        await loop.sock_sendall(far, down)
        far.shutdown(socket.SHUT_WR)
        assert await _read_all(client) == down
        client.close()
        far.close()
        await _until(lambda: not splicer.connections, "the spliced connection to end")
        splicer.close()
        service.close()
        return stats

    stats = asyncio.run(main())
    assert stats["splice_opened"] == 1
    assert stats["splice_closed"] == 1
    assert stats["splice_bytes_to_guest"] == 8 << 20
    assert stats["splice_bytes_from_guest"] == 3 << 20


@pytest.mark.parametrize("resetting", ["client", "service"])
def test_a_reset_crosses_over(resetting: str) -> None:
    async def main() -> Counter[str]:
        loop = asyncio.get_running_loop()
        stats: Counter[str] = Counter()
        splicer = Splicer(loop, stats, _Source(), 16)
        service = _service()
        client = await _client_of(splicer, service.getsockname()[1])
        far, _ = await asyncio.wait_for(loop.sock_accept(service), 5)
        far.setblocking(False)
        gone, other = (client, far) if resetting == "client" else (far, client)
        await loop.sock_sendall(gone, b"hello")
        assert await asyncio.wait_for(loop.sock_recv(other, 5), 5) == b"hello"
        gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        gone.close()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(loop.sock_recv(other, 5), 5)
        other.close()
        await _until(lambda: not splicer.connections, "the spliced connection to end")
        splicer.close()
        service.close()
        return stats

    stats = asyncio.run(main())
    assert stats["splice_resets"] == 1


def test_no_service_resets_the_client() -> None:
    async def main() -> Counter[str]:
        loop = asyncio.get_running_loop()
        stats: Counter[str] = Counter()
        splicer = Splicer(loop, stats, _Source(), 16)
        service = _service()
        port = service.getsockname()[1]
        service.close()  # nothing listens on the port any more
        client = await _client_of(splicer, port)
        with pytest.raises((ConnectionResetError, ConnectionRefusedError)):
            await asyncio.wait_for(loop.sock_recv(client, 5), 5)
        client.close()
        splicer.close()
        return stats

    stats = asyncio.run(main())
    assert stats["splice_refused"] == 1
    assert stats["splice_opened"] == 0
