"""DNS over TCP at the relay's DNS address, when static records are configured or the
egress policy has domain rules.

Over UDP the relay answers static records itself (relay.py, dns.answer_static). Over
TCP the guest's connection is relayed like any other (host/tcp_relay.py), so to answer the
same records there the relay points such connections at this small server on the
host's loopback instead of at the upstream resolver. It speaks DNS over TCP (RFC 7766:
each message preceded by its 2-byte length, several per connection, §6.2.1) and, for
every query it cannot answer from the table, forwards the message unchanged to the
upstream resolver over TCP and relays the reply; the guest sees one resolver that
knows the static names, whichever transport its resolver picks. Under a policy
with domain rules the relay also screens each query first (`screen`: REFUSED for a
name no rule allows, link/dns_filter.py), and reads each answer (`answered`) for the
addresses it gives, as on the UDP path. The upstream is asked
of the relay for every query (it follows the host's resolv.conf, link/dns.py): a query
after a change goes to the new resolver, one in flight finishes with the old.

Bounds, since a guest is untrusted: at most `MAX_CLIENTS` connections at once, an idle
connection is closed after `IDLE_TIMEOUT_S` (RFC 7766 §6.2.3 leaves the value to the
server), and an upstream exchange that takes longer than `UPSTREAM_TIMEOUT_S` closes
the guest's connection (its resolver retries, as after a lost UDP answer).

Only the guest is served. The port on host loopback is open to every local user, and
the responder answers and forwards queries, so it would be an open resolver for each of
them. The relay tells it (`expect`) the host socket of each connection it opens for the
guest, and an accepted connection is served only if one of those sockets, still open,
is connected from the accepted peer's address to the responder: the kernel holds that
address for the relay's socket alone (bind(2) refuses it to others, EADDRINUSE; and a
TCP 4-tuple names one connection), so no other process can come from it. Anything else
is closed unanswered and counted as `dns_tcp_not_guest`.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections import Counter
from collections.abc import Callable

from relaynat.guest_log import guest_logger
from relaynat.link.dns import StaticTable, answer_static

log = guest_logger("relaynat.dns")

MAX_CLIENTS = 64
IDLE_TIMEOUT_S = 10.0
UPSTREAM_TIMEOUT_S = 5.0
DNS_PORT = 53
_LEN = struct.Struct("!H")
_LOOPBACK = "127.0.0.1"


class DnsTcpResponder:
    """Listens on 127.0.0.1 (port chosen by the kernel: `port`; both: `address`) from
    construction on; serves once the event loop runs, the connections whose host socket
    `expect` was given only (see the module docstring). `upstream()` is where the next
    query goes; None: only static names are answered, other queries end the connection."""

    def __init__(self, table: StaticTable, upstream: Callable[[], str | None],
                 loop: asyncio.AbstractEventLoop, stats: Counter[str],
                 screen: Callable[[bytes], bytes | None] | None = None,
                 answered: Callable[[bytes, str], None] | None = None) -> None:
        self._table = table
        self._upstream = upstream
        self._screen = screen
        self._answered = answered
        self._clients: set[asyncio.Task[None]] = set()
        self._stats = stats
        # Bound now, so the port is known before the first guest SYN can arrive.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((_LOOPBACK, 0))
        sock.listen(MAX_CLIENTS)
        sock.setblocking(False)
        self.port: int = sock.getsockname()[1]
        self._sock = sock
        self._server: asyncio.Server | None = None
        self._starting = loop.create_task(self._start())
        #: The relay's sockets connecting here, by their own (address, port).
        self._expected: dict[tuple[str, int], socket.socket] = {}
        self._prune_at = MAX_CLIENTS

    @property
    def address(self) -> tuple[str, int]:
        """Where the relay connects the guest's DNS-over-TCP flows."""
        return _LOOPBACK, self.port

    def expect(self, sock: socket.socket) -> None:
        """`sock`, the relay's host socket of a guest flow, is connecting here: serve
        the connection it makes (once)."""
        try:
            self._expected[sock.getsockname()[:2]] = sock
        except OSError:  # closed already: there will be no connection to serve
            return
        if len(self._expected) >= self._prune_at:
            # Sockets whose connection never got accepted (the guest gave up) and that
            # the relay has closed since; the amortised cost stays constant per call.
            self._expected = {a: s for a, s in self._expected.items() if s.fileno() >= 0}
            self._prune_at = max(MAX_CLIENTS, 2 * len(self._expected))

    def _from_relay(self, peer: object) -> bool:
        """Whether the accepted connection from `peer` is one the relay made."""
        if not isinstance(peer, tuple):
            return False
        sock = self._expected.pop(peer[:2], None)
        if sock is None or sock.fileno() < 0:
            return False
        try:
            own: tuple[str, int] = sock.getsockname()[:2]
            far: tuple[str, int] = sock.getpeername()[:2]
        except OSError:  # no longer connected
            return False
        return own == peer[:2] and far == self.address

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._accepted, sock=self._sock)

    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._from_relay(writer.get_extra_info("peername")):
            self._stats["dns_tcp_not_guest"] += 1
            writer.close()
            return
        if len(self._clients) >= MAX_CLIENTS:
            self._stats["dns_tcp_refused"] += 1
            writer.close()
            return
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._clients.add(task)
        task.add_done_callback(self._clients.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    (length,) = _LEN.unpack(await asyncio.wait_for(reader.readexactly(2),
                                                                   IDLE_TIMEOUT_S))
                    query = await asyncio.wait_for(reader.readexactly(length), IDLE_TIMEOUT_S)
                except (asyncio.IncompleteReadError, TimeoutError):
                    return
                answer = answer_static(query, self._table)
                if answer is not None:
                    self._stats["dns_tcp_static"] += 1
                    if self._answered is not None:
                        self._answered(answer, "static")
                elif self._screen is not None and (answer := self._screen(query)) is not None:
                    if not answer:  # unreadable even as a header: nothing to answer
                        return
                else:
                    answer = await self._forward(query)
                    if answer is None:
                        return
                    self._stats["dns_tcp_forwarded"] += 1
                    if self._answered is not None:
                        self._answered(answer, "forwarded")
                writer.write(_LEN.pack(len(answer)) + answer)
                await writer.drain()
        except OSError as exc:
            log.debug("DNS over TCP client: %s", exc)
        finally:
            writer.close()

    async def _forward(self, query: bytes) -> bytes | None:
        """One exchange with the upstream resolver over TCP; None on any failure."""
        upstream = self._upstream()
        if upstream is None:
            return None
        writer = None
        try:
            async with asyncio.timeout(UPSTREAM_TIMEOUT_S):
                reader, writer = await asyncio.open_connection(upstream, DNS_PORT)
                writer.write(_LEN.pack(len(query)) + query)
                (length,) = _LEN.unpack(await reader.readexactly(2))
                return await reader.readexactly(length)
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            log.debug("DNS over TCP to %s failed: %s", upstream, exc)
            return None
        finally:
            if writer is not None:
                writer.close()

    def close(self) -> None:
        self._starting.cancel()
        if self._server is not None:
            self._server.close()  # closes the listening socket too
        else:
            self._sock.close()
        for task in list(self._clients):
            task.cancel()
