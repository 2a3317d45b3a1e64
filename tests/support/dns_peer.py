"""A tiny authoritative DNS server for tests: the "host's resolver" behind the relay.

    python3 tests/support/dns_peer.py --addr 127.0.0.53 --record NAME=ADDR ... --ready-file F
        [--delay NAME=SECONDS ...]

Listens on ADDR port 53, UDP and TCP (RFC 1035 §4.2.2: 2-byte length prefix), and
answers A queries for the configured names, NOERROR with no answers for other types of
those names, NXDOMAIN for anything else. Every query is appended, as "udp NAME TYPE" or
"tcp NAME TYPE", to F.log, so a test can see that a query really went upstream; the
answer to a name given --delay leaves that many seconds after the query was logged (an
answer in flight while the test changes something). It runs in the test's private
network namespace, never on a public address.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import sys

import dpkt


class _Answerer:
    def __init__(self, records: dict[str, bytes], log_path: str,
                 delays: dict[str, float] | None = None) -> None:
        self.records = records
        self.log_path = log_path
        self.delays = delays or {}

    def delay(self, data: bytes) -> float:
        """How long the answer to `data` waits (0 unless its name was given --delay)."""
        try:
            qd = dpkt.dns.DNS(data).qd
        except (dpkt.UnpackError, IndexError, ValueError):
            return 0.0
        return self.delays.get(qd[0].name.rstrip(".").lower(), 0.0) if len(qd) == 1 else 0.0

    def answer(self, data: bytes, proto: str) -> bytes | None:
        try:
            query = dpkt.dns.DNS(data)
        except (dpkt.UnpackError, IndexError, ValueError):
            return None
        if query.qr != dpkt.dns.DNS_Q or len(query.qd) != 1:
            return None
        q = query.qd[0]
        name = q.name.rstrip(".").lower()
        with open(self.log_path, "a") as f:
            f.write(f"{proto} {name} {q.type}\n")
        query.qr = dpkt.dns.DNS_R
        query.ra = 1
        query.an, query.ns, query.ar = [], [], []
        if name not in self.records:
            query.rcode = dpkt.dns.DNS_RCODE_NXDOMAIN
        elif q.type == dpkt.dns.DNS_A:
            query.an = [dpkt.dns.DNS.RR(name=q.name, type=dpkt.dns.DNS_A, cls=dpkt.dns.DNS_IN,
                                        ttl=30, rdata=self.records[name])]
        return bytes(query)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, answerer: _Answerer) -> None:
        self.answerer = answerer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = self.answerer.answer(data, "udp")
        if reply is not None:
            send = self.transport.sendto  # type: ignore[attr-defined]
            asyncio.get_running_loop().call_later(self.answerer.delay(data), send, reply, addr)


async def serve(addr: str, records: dict[str, bytes], ready_file: str,
                delays: dict[str, float] | None = None) -> None:
    answerer = _Answerer(records, ready_file + ".log", delays)
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(lambda: _Udp(answerer), local_addr=(addr, 53))

    async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                query = await reader.readexactly(size)
                reply = answerer.answer(query, "tcp")
                if reply is None:
                    break
                await asyncio.sleep(answerer.delay(query))
                writer.write(len(reply).to_bytes(2, "big") + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(tcp, addr, 53)
    with open(ready_file + ".tmp", "w") as f:
        f.write("ready")
    os.replace(ready_file + ".tmp", ready_file)
    async with server:
        await server.serve_forever()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--addr", default="127.0.0.53")
    parser.add_argument("--record", action="append", default=[], metavar="NAME=ADDR")
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--delay", action="append", default=[], metavar="NAME=SECONDS")
    args = parser.parse_args()
    records = {}
    for item in args.record:
        name, _, addr = item.partition("=")
        records[name.rstrip(".").lower()] = ipaddress.IPv4Address(addr).packed
    delays = {}
    for item in args.delay:
        name, _, seconds = item.partition("=")
        delays[name.rstrip(".").lower()] = float(seconds)
    asyncio.run(serve(args.addr, records, args.ready_file, delays))
    return 0


if __name__ == "__main__":
    sys.exit(main())
