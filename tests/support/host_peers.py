"""Host-side peers for integration tests, run as separate processes on 127.0.0.1.

    python3 tests/support/host_peers.py http --root DIR --port-file F
        GET /NAME serves DIR/NAME; PUT /anything answers the body's sha256 (hex).
    python3 tests/support/host_peers.py echo --port-file F
        echoes every byte back until the client half-closes, then closes.
    python3 tests/support/host_peers.py drain-then-reply --port-file F [--delay S]
        waits S seconds without reading, reads until EOF (the client's SHUT_WR), then
        sends "<sha256> <length>\\n" and closes.

Each binds 127.0.0.1 (or `--bind ADDR`, e.g. ::1) port 0 and writes the chosen port to
the port file, so tests never race for ports. They are real servers using the kernel's
TCP, nothing is simulated.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import http.server
import os
import shutil
import socket
import socketserver
import sys
from collections.abc import Callable


class _Handler(http.server.BaseHTTPRequestHandler):
    root = "."
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        path = os.path.join(self.root, os.path.basename(self.path))
        try:
            f = open(path, "rb")  # noqa: SIM115
        except OSError:
            self.send_error(404)
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            shutil.copyfileobj(f, self.wfile, 1 << 20)

    def _read_into(self, update: Callable[[bytes], object], remaining: int) -> int:
        """Read `remaining` bytes of the body into `update`; what is still missing."""
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 1 << 20))
            if not chunk:
                break
            update(chunk)
            remaining -= len(chunk)
        return remaining

    def _read_chunked(self, update: Callable[[bytes], object]) -> bool:
        """A chunked body (RFC 9112 §7.1: curl -T - sends one, having no length to
        give); whether it was whole."""
        while True:
            size_line = self.rfile.readline(1024)
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                return False
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailer fields
                return True
            if self._read_into(update, size) or self.rfile.readline(1024) not in (
                    b"\r\n", b"\n"):
                return False

    def do_PUT(self) -> None:
        digest = hashlib.sha256()
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            whole = self._read_chunked(digest.update)
        else:
            length = int(self.headers.get("Content-Length", "0"))
            whole = self._read_into(digest.update, length) == 0
        body = (digest.hexdigest() + "\n").encode()
        self.send_response(200 if whole else 400)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_PUT


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


def _write_port(port_file: str, port: int) -> None:
    tmp = port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(port))
    os.replace(tmp, port_file)


def serve_http(root: str, port_file: str, bind: str, port: int = 0) -> None:
    _Handler.root = root
    server = (_Server6 if ":" in bind else _Server)((bind, port), _Handler)
    _write_port(port_file, server.server_address[1])
    server.serve_forever()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


async def _drain_then_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            delay_s: float = 0.0) -> None:
    # With a delay, the peer does not read at first: its window and then the relay's
    # send buffer fill up, and the guest must be held back and released cleanly.
    await asyncio.sleep(delay_s)
    digest, total = hashlib.sha256(), 0
    while data := await reader.read(1 << 16):
        digest.update(data)
        total += len(data)
    writer.write(f"{digest.hexdigest()} {total}\n".encode())
    await writer.drain()
    writer.close()


async def serve_stream(kind: str, port_file: str, delay_s: float, bind: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if kind == "echo":
            await _echo(reader, writer)
        else:
            await _drain_then_reply(reader, writer, delay_s)

    server = await asyncio.start_server(handler, bind, 0, backlog=1024)
    _write_port(port_file, server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["http", "echo", "drain-then-reply"])
    parser.add_argument("--root", default=".")
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--bind", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="http: port (default: any)")
    parser.add_argument("--delay", type=float, default=0.0,
                        help="drain-then-reply: seconds to wait before reading")
    args = parser.parse_args()
    if args.kind == "http":
        serve_http(args.root, args.port_file, args.bind, args.port)
    else:
        asyncio.run(serve_stream(args.kind, args.port_file, args.delay, args.bind))
    return 0


if __name__ == "__main__":
    sys.exit(main())
