"""Programs the integration tests run *inside* a guest namespace (real kernel clients).

    python3 guest_tools.py echo-many HOST PORT --conns 200 --size 1048576
        opens N connections at once, each sends SIZE random bytes, reads them back,
        and checks they are equal; prints "ok N" or exits 1 naming the failures.
    python3 guest_tools.py half-close HOST PORT --size N
        sends N bytes, shutdown(SHUT_WR), then reads the reply to EOF and prints it.
    python3 guest_tools.py udp-echo HOST PORT SIZE...
        one connected UDP socket (IPv4 or IPv6, by HOST); each SIZE is sent with random
        content, up to 3 tries, and checked on the echo; prints "ok|corrupt|timeout SIZE".
    python3 guest_tools.py peer-echo PORT --events N --ready FILE
        serves TCP and UDP on [::]:PORT (both families) for N events, then exits: a TCP
        client's bytes (to EOF) are answered "PEER SHA256 LENGTH", a UDP datagram is
        echoed as "PEER " + payload; PEER is the source address the guest saw. FILE is
        created once both sockets listen.
    python3 guest_tools.py connect-burst HOST PORT --count N [--pause S --after M]
        N TCP connects back to back, then after S seconds M more; prints JSON with each
        outcome (ok, refused, timeout, errno name) and the first burst's duration.
    python3 guest_tools.py udp-flows HOST PORT --flows N [--tries T]
        N UDP sockets, one flow each, each echo-checked twice; prints JSON of which worked.
    python3 guest_tools.py inject IFNAME --rounds N [--pause S]
        writes malformed frames onto IFNAME with an AF_PACKET socket, N rounds of the
        same set; prints how many frames went out.
    python3 guest_tools.py flood IFNAME --seconds S
        writes as fast as it can for S seconds, round after round: one each of
        guest_flood.py's SYNs, UDP datagrams, ARP requests and DHCP discovers, and the
        malformed set of `inject`; prints how many frames went out.
    python3 guest_tools.py tcp-reset HOST PORT (--send|--recv) [--reset-after N]
        one TCP connection that sends (or receives) until an error, EOF or --limit
        bytes; with --reset-after it stops after N bytes and closes with SO_LINGER 0
        (a RST); prints JSON {"bytes": moved, "outcome": errno name | "eof" | "reset-sent"}.
    python3 guest_tools.py hold HOST PORT --conns N --ready FILE --go FILE
        N TCP connections (nothing sent); FILE --ready gets their outcomes
        (JSON), then they stay open until FILE --go appears (at most 120 s).
    python3 guest_tools.py fd-exhaust HOST PORT --conns N --ready F --go F --udp-port P
        an echo connection runs across a burst of N more connections and a UDP
        datagram made while the test holds the relay at its descriptor limit; prints
        JSON: the echo checks, each connection's outcome, the UDP one, and whether a
        new connection works once the burst is closed.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import hashlib
import json
import os
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator


async def _echo_one(host: str, port: int, size: int) -> bool:
    reader, writer = await asyncio.open_connection(host, port)
    payload = os.urandom(size)

    async def send() -> None:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    received = await reader.readexactly(size)
    await sender
    writer.close()
    return received == payload


async def echo_many(host: str, port: int, conns: int, size: int) -> int:
    results = await asyncio.wait_for(
        asyncio.gather(*(_echo_one(host, port, size) for _ in range(conns)),
                       return_exceptions=True), timeout=120)
    bad = [r for r in results if r is not True]
    if bad:
        print(f"{len(bad)} of {conns} failed: {bad[:3]}", file=sys.stderr)
        return 1
    print(f"ok {conns}")
    return 0


def half_close(host: str, port: int, size: int) -> int:
    payload = os.urandom(size)
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    expected = f"{hashlib.sha256(payload).hexdigest()} {size}\n".encode()
    print(reply.decode(errors="replace").strip())
    return 0 if reply == expected else 1


def _ipv4(src: str, dst: str, proto: int, payload: bytes, *, ihl: int = 5,
          total: int | None = None, frag: int = 0x4000, good_csum: bool = True) -> bytes:
    total = 20 + len(payload) if total is None else total
    head = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, 1, frag, 64, proto, 0,
                                 socket.inet_aton(src), socket.inet_aton(dst)))
    csum = 0
    for i in range(0, 20, 2):
        csum += (head[i] << 8) | head[i + 1]
    csum = (csum & 0xFFFF) + (csum >> 16)
    csum = ~((csum & 0xFFFF) + (csum >> 16)) & 0xFFFF
    struct.pack_into("!H", head, 10, csum if good_csum else csum ^ 0x5A5A)
    return bytes(head) + payload


def malformed_frames(src_mac: bytes, guest: str, gateway: str) -> list[bytes]:
    eth = b"\x52\x55\x0a\x00\x02\x02" + src_mac
    tcp_ok = struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, 5 << 4, 0x02, 1000, 0, 0)
    tcp_lying_offset = struct.pack("!HHIIBBHHH", 40001, 80, 1, 0, 15 << 4, 0x02, 1000, 0, 0)
    return [
        eth[:10],                                                  # truncated Ethernet
        eth + b"\x08\x00" + b"\x45\x00",                           # truncated IPv4
        eth + b"\x08\x00" + os.urandom(60),                        # garbage "IPv4"
        eth + b"\x08\x00" + _ipv4(guest, gateway, 6, tcp_ok, ihl=15),         # IHL lies
        eth + b"\x08\x00" + _ipv4(guest, gateway, 6, tcp_ok, total=1400),     # length lies
        eth + b"\x08\x00" + _ipv4(guest, gateway, 6, tcp_lying_offset),       # TCP offset lies
        eth + b"\x08\x00" + _ipv4(guest, gateway, 6, tcp_ok[:12]),            # TCP truncated
        eth + b"\x08\x00" + _ipv4(guest, gateway, 6, tcp_ok, good_csum=False),  # bad IP csum
        eth + b"\x08\x00" + _ipv4(guest, gateway, 6, tcp_ok, frag=0x2000),    # fragment
        eth + b"\x08\x00" + _ipv4("10.9.9.9", gateway, 6, tcp_ok),            # spoofed source
        eth + b"\x08\x06" + os.urandom(8),                         # truncated ARP
        eth + b"\x88\xb5" + os.urandom(46),                        # unknown ethertype
    ]


def inject(ifname: str, rounds: int, pause: float = 0.0) -> int:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((ifname, 0))
        src_mac = s.getsockname()[4]
        frames = malformed_frames(src_mac, "10.0.2.15", "10.0.2.2")
        sent = 0
        for _ in range(rounds):
            for frame in frames:
                try:
                    s.send(frame)
                    sent += 1
                except OSError as exc:  # the kernel may refuse the shortest ones
                    print(f"not sent ({len(frame)} bytes): {exc}", file=sys.stderr)
            if pause:
                # A TAP drops what its queue (tx_queue_len frames) cannot hold without
                # telling the sender; paced rounds stay within it beside a download.
                time.sleep(pause)
    print(f"sent {sent}")
    return 0


def flood(ifname: str, seconds: float) -> int:
    # guest_flood's builders, endlessly: SYNs (to a closed port, closed ports and
    # unrouted addresses), UDP to distinct ports, ARP requests, DHCP discovers.
    try:
        from support.guest_flood import arp_frames, dhcp_frames, syn_frames, udp_frames
    except ImportError:  # run as a file (inside the guest): this directory is sys.path[0]
        from guest_flood import arp_frames, dhcp_frames, syn_frames, udp_frames

    def endless(make: Callable[[], Iterator[bytes]]) -> Iterator[bytes]:
        while True:
            yield from make()

    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((ifname, 0))
        mac = s.getsockname()[4]
        kinds = [endless(lambda: syn_frames(mac, 30000, open_port=9)),
                 endless(lambda: udp_frames(mac, 30000)),
                 endless(lambda: arp_frames(mac, 30000)),
                 endless(lambda: dhcp_frames(mac, 30000))]
        malformed = malformed_frames(mac, "10.0.2.15", "10.0.2.2")
        deadline = time.monotonic() + seconds
        sent = 0
        while time.monotonic() < deadline:
            for frame in [*(next(kind) for kind in kinds), *malformed]:
                try:
                    s.send(frame)
                    sent += 1
                except OSError:  # TAP queue full (the relay is behind) or a too-short frame
                    pass
    print(f"sent {sent}")
    return 0


def udp_echo(host: str, port: int, sizes: list[int]) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.connect((host, port))
    s.settimeout(2)
    for size in sizes:
        data = os.urandom(size)
        for _ in range(3):
            s.send(data)
            try:
                got = s.recv(70000)
            except TimeoutError:
                continue
            print("ok" if got == data else "corrupt", size)
            break
        else:
            print("timeout", size)
    return 0


def peer_echo(port: int, events: int, ready: str) -> int:
    import selectors

    tcp = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    for s in (tcp, udp):
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", port))
    tcp.listen(16)
    sel = selectors.DefaultSelector()
    sel.register(tcp, selectors.EVENT_READ)
    sel.register(udp, selectors.EVENT_READ)
    open(ready, "w").close()
    for _ in range(events):
        key = sel.select(timeout=60)[0][0]
        if key.fileobj is udp:
            data, peer = udp.recvfrom(70000)
            udp.sendto(peer[0].encode() + b" " + data, peer)
            continue
        conn, peer = tcp.accept()
        with conn:
            conn.settimeout(30)
            digest, n = hashlib.sha256(), 0
            while chunk := conn.recv(1 << 20):
                digest.update(chunk)
                n += len(chunk)
            conn.sendall(f"{peer[0]} {digest.hexdigest()} {n}".encode())
    return 0


def _connect(host: str, port: int, timeout: float) -> str:
    """"ok", "refused" (the relay's RST: ECONNREFUSED) or the other outcome's name."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((host, port))
        return "ok"
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))
    finally:
        s.close()


def connect_burst(host: str, port: int, count: int, pause: float, after: int) -> int:
    """`count` connects back to back, timed on CLOCK_MONOTONIC (the relay's loop clock
    too: namespaces share it), then, after `pause` seconds, `after` more."""
    start = time.monotonic()
    first = [_connect(host, port, 5.0) for _ in range(count)]
    elapsed = time.monotonic() - start
    time.sleep(pause)
    second = [_connect(host, port, 5.0) for _ in range(after)]
    print(json.dumps({"first": first, "elapsed": elapsed, "second": second}))
    return 0


def udp_flows(host: str, port: int, flows: int, tries: int) -> int:
    """Open `flows` UDP sockets (one flow each: distinct source ports) and for each,
    up to `tries` times, send a datagram and wait 0.5 s for its echo; then once more on
    every socket, to see which flows still work."""
    socks = []
    for _ in range(flows):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect((host, port))
        s.settimeout(0.5)
        socks.append(s)

    def echo(s: socket.socket, data: bytes) -> bool:
        for _ in range(tries):
            s.send(data)
            try:
                if s.recv(2048) == data:
                    return True
            except TimeoutError:
                continue
        return False

    first = [echo(s, b"flow %d" % i) for i, s in enumerate(socks)]
    again = [echo(s, b"again %d" % i) for i, s in enumerate(socks)]
    print(json.dumps({"first": first, "again": again}))
    return 0


def linger0_close(s: socket.socket) -> None:
    """close() with SO_LINGER {on, 0}: the kernel sends RST, not FIN (socket(7))."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc))


def move_bytes(s: socket.socket, send: bool, reset_after: int | None,
               limit: int) -> tuple[str, int]:
    """Send (or receive) on `s` until EOF, an error or `limit` bytes; with
    `reset_after`, stop after that many and close with a RST. Returns the outcome
    ("eof", "limit", "reset-sent" or the errno's name) and the bytes moved; `s` is
    closed either way."""
    chunk, moved = os.urandom(1 << 16), 0
    try:
        while moved < limit:
            if reset_after is not None and moved >= reset_after:
                linger0_close(s)
                return "reset-sent", moved
            want = len(chunk) if reset_after is None else min(len(chunk), reset_after - moved)
            n = s.send(chunk[:want]) if send else len(s.recv(want))
            if n == 0:
                return "eof", moved
            moved += n
        return "limit", moved
    except OSError as exc:
        return errno_name(exc), moved
    finally:
        s.close()


def tcp_reset(host: str, port: int, send: bool, reset_after: int | None, limit: int) -> int:
    s = socket.create_connection((host, port), timeout=30)
    outcome, moved = move_bytes(s, send, reset_after, limit)
    print(json.dumps({"bytes": moved, "outcome": outcome}))
    return 0


def _open_many(host: str, port: int, conns: int) -> tuple[list[socket.socket], list[str]]:
    """`conns` TCP connections (nothing sent); the open ones and every outcome
    ("ok", "ECONNREFUSED" for the relay's RST, "timeout", other errno names)."""
    socks, outcomes = [], []
    for _ in range(conns):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(10)
        try:
            s.connect((host, port))
            socks.append(s)
            outcomes.append("ok")
        except TimeoutError:
            outcomes.append("timeout")
            s.close()
        except OSError as exc:
            outcomes.append(errno_name(exc))
            s.close()
    return socks, outcomes


def _write_json(path: str, value: object) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(value, f)
    os.replace(path + ".tmp", path)


def _wait_path(path: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)


def hold(host: str, port: int, conns: int, ready: str, go: str) -> int:
    socks, outcomes = _open_many(host, port, conns)
    _write_json(ready, outcomes)
    _wait_path(go)
    for s in socks:
        s.close()
    return 0


def _echo_check(s: socket.socket, size: int) -> bool:
    """`size` random bytes through an echo peer, 256 KiB at a time; equal?"""
    ok = True
    for _ in range(size >> 18):
        block = os.urandom(1 << 18)
        s.sendall(block)
        got = bytearray()
        while len(got) < len(block):
            chunk = s.recv(len(block) - len(got))
            if not chunk:
                return False
            got += chunk
        ok = ok and got == block
    return ok


def fd_exhaust(host: str, port: int, conns: int, ready: str, go: str, udp_port: int) -> int:
    """An echo connection A runs; then (once FILE --go appears: the test has lowered
    the relay's descriptor limit) `conns` more connections and one UDP flow are tried,
    and A must still echo intact; once those close, a new connection must work."""
    a = socket.create_connection((host, port), timeout=30)
    before = _echo_check(a, 2 << 20)
    _write_json(ready, {"phase": "a-open"})
    _wait_path(go)
    socks, outcomes = _open_many(host, port, conns)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.settimeout(1)
    udp.connect((host, udp_port))
    udp.send(b"over the limit")
    try:
        udp_outcome = "answered" if udp.recv(100) else "empty"
    except TimeoutError:
        udp_outcome = "timeout"
    except OSError as exc:
        udp_outcome = errno_name(exc)
    udp.close()
    during = _echo_check(a, 16 << 20)
    for s in socks:
        s.close()
    time.sleep(1)  # the relay ends those flows (FIN both ways) and frees their sockets
    after = _open_many(host, port, 1)[1][0]
    a.close()
    print(json.dumps({"before": before, "outcomes": outcomes, "udp": udp_outcome,
                      "during": during, "after": after}))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("echo-many")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--conns", type=int, default=200)
    p.add_argument("--size", type=int, default=1 << 20)
    p = sub.add_parser("half-close")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--size", type=int, default=1 << 20)
    p = sub.add_parser("udp-echo")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("sizes", type=int, nargs="+")
    p = sub.add_parser("peer-echo")
    p.add_argument("port", type=int)
    p.add_argument("--events", type=int, required=True)
    p.add_argument("--ready", required=True)
    p = sub.add_parser("connect-burst")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--pause", type=float, default=0.0)
    p.add_argument("--after", type=int, default=0)
    p = sub.add_parser("udp-flows")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--flows", type=int, required=True)
    p.add_argument("--tries", type=int, default=3)
    p = sub.add_parser("tcp-reset")
    p.add_argument("host")
    p.add_argument("port", type=int)
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--send", action="store_true")
    way.add_argument("--recv", action="store_true")
    p.add_argument("--reset-after", type=int)
    p.add_argument("--limit", type=int, default=1 << 30)
    p = sub.add_parser("hold")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--conns", type=int, required=True)
    p.add_argument("--ready", required=True)
    p.add_argument("--go", required=True)
    p = sub.add_parser("fd-exhaust")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--conns", type=int, required=True)
    p.add_argument("--ready", required=True)
    p.add_argument("--go", required=True)
    p.add_argument("--udp-port", type=int, required=True)
    p = sub.add_parser("inject")
    p.add_argument("ifname")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--pause", type=float, default=0.0, help="seconds between rounds")
    p = sub.add_parser("flood")
    p.add_argument("ifname")
    p.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args()
    if args.cmd == "echo-many":
        return asyncio.run(echo_many(args.host, args.port, args.conns, args.size))
    if args.cmd == "half-close":
        return half_close(args.host, args.port, args.size)
    if args.cmd == "udp-echo":
        return udp_echo(args.host, args.port, args.sizes)
    if args.cmd == "connect-burst":
        return connect_burst(args.host, args.port, args.count, args.pause, args.after)
    if args.cmd == "udp-flows":
        return udp_flows(args.host, args.port, args.flows, args.tries)
    if args.cmd == "tcp-reset":
        return tcp_reset(args.host, args.port, args.send, args.reset_after, args.limit)
    if args.cmd == "hold":
        return hold(args.host, args.port, args.conns, args.ready, args.go)
    if args.cmd == "fd-exhaust":
        return fd_exhaust(args.host, args.port, args.conns, args.ready, args.go,
                          args.udp_port)
    if args.cmd == "peer-echo":
        return peer_echo(args.port, args.events, args.ready)
    if args.cmd == "flood":
        return flood(args.ifname, args.seconds)
    return inject(args.ifname, args.rounds, args.pause)


if __name__ == "__main__":
    sys.exit(main())
