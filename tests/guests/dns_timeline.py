"""A guest that asks a DNS server for A records on a timeline.

    python3 dns_timeline.py SERVER [--tcp] NAME@SECONDS ...

Each NAME@SECONDS is one query for NAME's A record, sent SECONDS after the start from a
socket of its own (UDP, or a TCP connection with --tcp, RFC 1035 §4.2.2's 2-byte length
before the message), so that queries overlap when an answer is slow. Once every query is
answered or has waited 8 s, prints one line per query, in the order given: "NAME ADDR",
ADDR the first A record of the answer, "none" when it had none, "timeout" without one.
"""

import argparse
import random
import socket
import struct
import threading
import time

WAIT_S = 8.0


def query(name: str) -> tuple[int, bytes]:
    ident = random.randrange(1 << 16)
    qname = b"".join(bytes([len(label)]) + label.encode() for label in name.split("."))
    header = struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0)  # RD, one question
    return ident, header + qname + b"\x00" + struct.pack("!HH", 1, 1)  # A, IN


def skip_name(msg: bytes, pos: int) -> int:
    while True:
        length = msg[pos]
        if length & 0xC0 == 0xC0:  # a compression pointer ends the name (RFC 1035 §4.1.4)
            return pos + 2
        pos += 1 + length
        if length == 0:
            return pos


def first_a(msg: bytes, ident: int) -> str:
    got, _flags, qdcount, ancount, _ns, _ar = struct.unpack_from("!HHHHHH", msg)
    if got != ident:
        return "wrong-id"
    pos = 12
    for _ in range(qdcount):
        pos = skip_name(msg, pos) + 4
    for _ in range(ancount):
        pos = skip_name(msg, pos)
        rtype, _cls, _ttl, rdlength = struct.unpack_from("!HHIH", msg, pos)
        pos += 10
        if rtype == 1 and rdlength == 4:
            return socket.inet_ntoa(msg[pos:pos + 4])
        pos += rdlength
    return "none"


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise TimeoutError("connection closed")
        data += chunk
    return data


def ask(server: str, tcp: bool, name: str, at: float, start: float, out: list[str],
        slot: int) -> None:
    time.sleep(max(0.0, start + at - time.monotonic()))
    ident, msg = query(name)
    try:
        if tcp:
            with socket.create_connection((server, 53), timeout=WAIT_S) as s:
                s.sendall(struct.pack("!H", len(msg)) + msg)
                (length,) = struct.unpack("!H", recv_exactly(s, 2))
                answer = recv_exactly(s, length)
        else:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(WAIT_S)
                s.sendto(msg, (server, 53))
                answer = s.recv(4096)
        out[slot] = f"{name} {first_a(answer, ident)}"
    except OSError:  # socket.timeout is TimeoutError, an OSError
        out[slot] = f"{name} timeout"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("server")
    parser.add_argument("--tcp", action="store_true")
    parser.add_argument("steps", nargs="+", metavar="NAME@SECONDS")
    args = parser.parse_args()
    out = [""] * len(args.steps)
    start = time.monotonic()
    threads = []
    for slot, step in enumerate(args.steps):
        name, _, at = step.partition("@")
        t = threading.Thread(target=ask, args=(args.server, args.tcp, name, float(at), start,
                                               out, slot))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    print("\n".join(out), flush=True)


if __name__ == "__main__":
    main()
