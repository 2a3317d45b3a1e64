"""A guest that uploads its standard input over TCP and waits for the peer to close.

    python3 tcp_send_stdin.py HOST PORT < DATA

Connects to HOST:PORT (timeout 60 s), sends all of standard input, half-closes, then
waits for the peer's end (one recv), so that the command ends only once the peer has
read everything. Prints nothing.
"""

import socket
import sys


def main() -> None:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
    s.sendall(sys.stdin.buffer.read())
    s.shutdown(socket.SHUT_WR)
    s.recv(1)


if __name__ == "__main__":
    main()
