"""A peer that reads one upload and answers with its hash.

    python3 tcp_hash_sink.py BIND_ADDR

Listens on BIND_ADDR port 5001, accepts one connection, reads it to EOF, then sends
back the sha256 of what it read and its length, space-separated, and a newline.
Prints nothing.
"""

import hashlib
import socket
import sys


def main() -> None:
    srv = socket.create_server((sys.argv[1], 5001))
    conn, _ = srv.accept()
    digest, total = hashlib.sha256(), 0
    while data := conn.recv(1 << 20):
        digest.update(data)
        total += len(data)
    conn.sendall(f"{digest.hexdigest()} {total}\n".encode())
    conn.close()


if __name__ == "__main__":
    main()
