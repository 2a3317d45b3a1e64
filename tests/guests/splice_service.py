"""A TCP service for forwarded-connection tests, one behaviour per MODE.

    python3 splice_service.py MODE PORT [COUNT] [SIZE]

Listens on PORT of every address, IPv4 and IPv6 (so both the guest's loopback and
its link address answer), and prints "ready"; serves COUNT connections
(default 1), each in a thread, then prints one line per connection (in the order they
ended) and exits. MODE:

- sink: read to EOF, answer "SHA256 LENGTH\\n" and close (the client half-closes first).
- both: send SIZE pseudo-random bytes (seed 1) while reading to EOF at once; half-close
  after sending; print "SHA256 LENGTH" of what it read.
- first: send SIZE pseudo-random bytes (seed 2) and half-close first, then read to EOF
  and print "SHA256 LENGTH" of what it read.
- echo: echo every byte back until EOF, then close.
- slow: read 64 KiB every 20 ms to EOF, print "SHA256 LENGTH".
- expect_reset: read until the connection ends; print "reset" or "eof".
- idle_reset: read to EOF, keep its own side open and idle for 2 s, then print "reset"
  if the connection was reset meanwhile (SO_ERROR), else "open".
- reset: read 5 bytes, then close with a RST (SO_LINGER 0).
"""

import contextlib
import hashlib
import random
import socket
import struct
import sys
import threading
import time

BLOCK = 1 << 20


def pattern(seed: int, size: int):
    rng = random.Random(seed)
    left = size
    while left:
        block = rng.randbytes(min(BLOCK, left))
        left -= len(block)
        yield block


def drain(c: socket.socket, delay: float = 0.0) -> str:
    h, n = hashlib.sha256(), 0
    while data := c.recv(65536 if delay else 1 << 20):
        h.update(data)
        n += len(data)
        if delay:
            time.sleep(delay)
    return f"{h.hexdigest()} {n}"


def serve(mode: str, c: socket.socket, size: int, out: list[str]) -> None:
    result = ""
    try:
        if mode == "sink":
            c.sendall((drain(c) + "\n").encode())
        elif mode == "both":
            def send() -> None:
                for block in pattern(1, size):
                    c.sendall(block)
                c.shutdown(socket.SHUT_WR)
            sender = threading.Thread(target=send)
            sender.start()
            result = drain(c)
            sender.join()
        elif mode == "first":
            for block in pattern(2, size):
                c.sendall(block)
            c.shutdown(socket.SHUT_WR)
            result = drain(c)
        elif mode == "echo":
            while data := c.recv(65536):
                c.sendall(data)
        elif mode == "slow":
            result = drain(c, delay=0.02)
        elif mode == "expect_reset":
            try:
                while c.recv(65536):
                    pass
                result = "eof"
            except ConnectionResetError:
                result = "reset"
        elif mode == "idle_reset":
            drain(c)
            time.sleep(2)
            result = "reset" if c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) else "open"
        elif mode == "reset":
            c.recv(5)
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError as exc:
        result = f"error {type(exc).__name__}"
    finally:
        c.close()
    if result:
        out.append(result)


def main() -> None:
    mode, port = sys.argv[1], int(sys.argv[2])
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    size = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    listeners = [socket.create_server(("0.0.0.0", port), backlog=256)]
    with contextlib.suppress(OSError):  # no IPv6 in the namespace
        listeners.append(socket.create_server(("::", port), family=socket.AF_INET6,
                                              backlog=256))
    print("ready", flush=True)
    out: list[str] = []
    threads = []
    accepted = 0
    while accepted < count:
        for srv in listeners:
            srv.settimeout(0.05)
            try:
                c, _ = srv.accept()
            except TimeoutError:
                continue
            c.settimeout(None)
            t = threading.Thread(target=serve, args=(mode, c, size, out))
            t.start()
            threads.append(t)
            accepted += 1
    for t in threads:
        t.join()
    for line in out:
        print(line, flush=True)


if __name__ == "__main__":
    main()
