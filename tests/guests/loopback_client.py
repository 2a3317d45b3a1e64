"""A guest client of its own loopback, for the -T and -U forwards.

    python3 loopback_client.py tcp HOST PORT SIZE
    python3 loopback_client.py udp HOST PORT COUNT

tcp: connects to HOST:PORT (timeout 30 s), sends SIZE pseudo-random bytes (seed 3,
1 MiB blocks of random.Random(3).randbytes), half-closes and prints the line the peer
answers with. udp: sends "hello N" for N below COUNT from one connected socket and
prints each answer ("timeout" after 2 s).
"""

import random
import socket
import sys


def main() -> None:
    kind, host, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if kind == "tcp":
        s = socket.create_connection((host, port), timeout=30)
        rng, left = random.Random(3), n
        while left:
            block = rng.randbytes(min(1 << 20, left))
            s.sendall(block)
            left -= len(block)
        s.shutdown(socket.SHUT_WR)
        print(s.makefile().readline().strip(), flush=True)
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.connect((host, port))
    for i in range(n):
        s.send(f"hello {i}".encode())
        try:
            print(s.recv(65536).decode(), flush=True)
        except TimeoutError:
            print("timeout", flush=True)


if __name__ == "__main__":
    main()
