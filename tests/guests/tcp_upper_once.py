"""A guest server that answers one connection, and sends nothing before it.

    python3 tcp_upper_once.py LISTENING_FILE

Listens on 0.0.0.0:8080, touches LISTENING_FILE, accepts one connection and sends
back what its first receive got, upper-cased. Prints nothing.
"""

import socket
import sys


def main() -> None:
    s = socket.create_server(("0.0.0.0", 8080))
    open(sys.argv[1], "w").close()
    c, _ = s.accept()
    c.sendall(c.recv(100).upper())


if __name__ == "__main__":
    main()
