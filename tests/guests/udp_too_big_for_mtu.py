"""A guest that asks a UDP echo peer for a datagram one byte too big for its link,
then for one that just fits.

    python3 udp_too_big_for_mtu.py HOST PORT

From a connected UDP socket to HOST:PORT (an echo peer that answers "big N" with N
bytes), asks for 1473 bytes (over a 1500-byte MTU with IPv4 and UDP headers) and
prints "got" and the length received, or "nothing" after 1 s; then asks for 1472
and prints "got" and the length (no answer in 1 s is an error).
"""

import socket
import sys


def main() -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((sys.argv[1], int(sys.argv[2])))
    s.settimeout(1)
    s.send(b"big 1473")
    try:
        print("got", len(s.recv(70000)))
    except TimeoutError:
        print("nothing")
    s.send(b"big 1472")
    print("got", len(s.recv(70000)))


if __name__ == "__main__":
    main()
