"""A guest that keeps two TCP connections open, tries a third, then uses the two.

    python3 tcp_third_connection.py HOST PORT

Opens two connections to HOST:PORT (an echo peer), then tries a third and prints
"third: connected" or "third: " and the exception's type name; then sends "still here"
on each of the first two and prints what each gets back.
"""

import socket
import sys


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    a = socket.create_connection((host, port), timeout=5)
    b = socket.create_connection((host, port), timeout=5)
    try:
        socket.create_connection((host, port), timeout=5)
        print("third: connected")
    except OSError as exc:
        print("third:", type(exc).__name__)
    for s in (a, b):
        s.sendall(b"still here")
        print(s.recv(100).decode())


if __name__ == "__main__":
    main()
