#!/usr/bin/env python3
"""Small bounded load tools of the benchmark suite, run as separate processes on the host
side (servers, bound to loopback) or inside a guest (clients, via nsenter):

    loadtools.py crr-server  --bind A --port P --seconds T
    loadtools.py crr-client  --target A --port P --duration D        -> JSON on stdout
    loadtools.py idle-server --bind A --port P --seconds T
    loadtools.py idle-client --target A --port P --count N --hold T  -> "READY n" line

Every loop stops on its own: servers after --seconds, clients after --duration/--hold or
when stdin reaches EOF (the benchmark closes it to end a hold early). Only stdlib, so the
same interpreter works in any namespace.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import resource
import selectors
import socket
import statistics
import sys
import time
from collections.abc import Callable

REQUEST = RESPONSE = 64  # bytes per request and per response (a small RPC)
#: The idle client gives up when no connect completed for this long (a relay that hit
#: its limit), instead of waiting out its whole hold time.
STALL_S = 15.0


def raise_nofile() -> None:
    """10,000 idle flows need more descriptors than the usual soft limit of 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def listener(bind: str, port: int) -> socket.socket:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((bind, port))
    srv.listen(4096)
    srv.setblocking(False)
    return srv


def _serve_connections(srv: socket.socket, seconds: float,
                       on_data: Callable[[socket.socket, bytes], None],
                       on_close: Callable[[socket.socket], None] = lambda sock: None) -> None:
    """Accept on `srv` and read every connection until `seconds` pass: each chunk goes to
    `on_data`; a connection that ends (EOF or error) to `on_close`, then it is closed."""
    sel = selectors.DefaultSelector()
    sel.register(srv, selectors.EVENT_READ)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for key, _ in sel.select(0.2):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is srv:
                with contextlib.suppress(BlockingIOError):
                    while True:
                        conn, _ = srv.accept()
                        conn.setblocking(False)
                        sel.register(conn, selectors.EVENT_READ)
                continue
            try:
                data = sock.recv(4096)
            except OSError:
                data = b""
            if data:
                on_data(sock, data)
                continue
            sel.unregister(sock)
            on_close(sock)
            sock.close()


def crr_server(bind: str, port: int, seconds: float) -> None:
    """Answer each connection's 64-byte request with 64 bytes; the client closes."""
    pending: dict[socket.socket, int] = {}

    def on_data(sock: socket.socket, data: bytes) -> None:
        got = pending.get(sock, 0) + len(data)
        if got >= REQUEST:
            got -= REQUEST
            with contextlib.suppress(OSError):
                sock.send(b"r" * RESPONSE)  # 64 bytes always fit an empty buffer
        pending[sock] = got

    _serve_connections(listener(bind, port), seconds, on_data,
                       lambda sock: pending.pop(sock, None))


def crr_client(target: str, port: int, duration: float) -> dict[str, object]:
    """Sequential connect, request, response, close; per-connection latency in µs."""
    lat_ns: list[int] = []
    per_second: list[int] = [0] * max(1, int(duration + 0.999))
    errors: dict[str, int] = {}
    start = time.monotonic()
    end = start + duration
    request = b"q" * REQUEST
    while (now := time.monotonic()) < end:
        t0 = time.perf_counter_ns()
        try:
            with socket.create_connection((target, port), timeout=2.0) as sock:
                sock.sendall(request)
                got = 0
                while got < RESPONSE:
                    chunk = sock.recv(RESPONSE - got)
                    if not chunk:
                        raise ConnectionError("server closed early")
                    got += len(chunk)
        except OSError as exc:
            name = type(exc).__name__
            errors[name] = errors.get(name, 0) + 1
            continue
        lat_ns.append(time.perf_counter_ns() - t0)
        slot = int(now - start)
        if slot < len(per_second):
            per_second[slot] += 1
    elapsed = time.monotonic() - start
    out: dict[str, object] = {"count": len(lat_ns), "seconds": elapsed,
                              "per_second": per_second, "errors": errors}
    if lat_ns:
        lat_ns.sort()
        out |= {"rate": len(lat_ns) / elapsed,
                "p50_us": statistics.median(lat_ns) / 1000,
                "p99_us": lat_ns[min(len(lat_ns) - 1, int(len(lat_ns) * 0.99))] / 1000}
    return out


def idle_server(bind: str, port: int, seconds: float) -> None:
    """Accept and hold connections (reading and discarding) until `seconds` pass."""
    raise_nofile()
    _serve_connections(listener(bind, port), seconds, lambda sock, data: None)


def idle_client(target: str, port: int, count: int, hold: float, concurrency: int) -> int:
    """Open `count` connections, at most `concurrency` connecting at once (a relay
    bounds its pending connects), print READY, hold them until stdin EOF or `hold`."""
    raise_nofile()
    sel = selectors.DefaultSelector()
    established: list[socket.socket] = []
    connecting = 0
    opened = 0
    failed: dict[str, int] = {}
    deadline = time.monotonic() + hold
    progress_at = time.monotonic()
    while len(established) + sum(failed.values()) < count:
        now = time.monotonic()
        if now > deadline or now - progress_at > STALL_S:
            failed["stalled"] = count - len(established) - sum(failed.values())
            break
        while opened < count and connecting < concurrency:
            sock = socket.socket()
            sock.setblocking(False)
            err = sock.connect_ex((target, port))
            opened += 1
            if err not in (0, errno.EINPROGRESS):
                name = errno.errorcode.get(err, str(err))
                failed[name] = failed.get(name, 0) + 1
                sock.close()
                continue
            sel.register(sock, selectors.EVENT_WRITE)
            connecting += 1
        for key, _ in sel.select(0.5):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            sel.unregister(sock)
            connecting -= 1
            progress_at = time.monotonic()
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                name = errno.errorcode.get(err, str(err))
                failed[name] = failed.get(name, 0) + 1
                sock.close()
            else:
                established.append(sock)
    print(f"READY {len(established)} {json.dumps(failed)}", flush=True)
    # Hold: stdin EOF (the benchmark is done with us) or the deadline ends it.
    sel2 = selectors.DefaultSelector()
    sel2.register(sys.stdin, selectors.EVENT_READ)
    while time.monotonic() < deadline:
        if sel2.select(0.5) and not sys.stdin.buffer.read1(4096):
            break
    for sock in established:
        sock.close()
    return 0 if len(established) == count else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("crr-server", "idle-server"):
        s = sub.add_parser(name)
        s.add_argument("--bind", required=True)
        s.add_argument("--port", type=int, required=True)
        s.add_argument("--seconds", type=float, required=True)
    s = sub.add_parser("crr-client")
    s.add_argument("--target", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--duration", type=float, required=True)
    s = sub.add_parser("idle-client")
    s.add_argument("--target", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--count", type=int, required=True)
    s.add_argument("--hold", type=float, required=True)
    s.add_argument("--concurrency", type=int, default=128)
    a = p.parse_args()
    if a.cmd == "crr-server":
        crr_server(a.bind, a.port, a.seconds)
    elif a.cmd == "idle-server":
        idle_server(a.bind, a.port, a.seconds)
    elif a.cmd == "crr-client":
        print(json.dumps(crr_client(a.target, a.port, a.duration)))
    else:
        return idle_client(a.target, a.port, a.count, a.hold, a.concurrency)
    return 0


if __name__ == "__main__":
    sys.exit(main())
