"""A client that uploads a file to tcp_hash_sink.py and prints its answer.

    python3 tcp_send_file.py HOST FILE

Connects to HOST port 5001 (timeout 60 s), sends FILE (sendfile), half-closes, and
prints the line the peer answers with (stripped).
"""

import socket
import sys


def main() -> None:
    s = socket.create_connection((sys.argv[1], 5001), timeout=60)
    with open(sys.argv[2], "rb") as f:
        s.sendfile(f)
    s.shutdown(socket.SHUT_WR)
    print(s.makefile().readline().strip())


if __name__ == "__main__":
    main()
