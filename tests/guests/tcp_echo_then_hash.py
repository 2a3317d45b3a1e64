"""A peer that echoes one connection, then reports what it got.

    python3 tcp_echo_then_hash.py PORT

Listens on 0.0.0.0:PORT and prints "ready"; accepts one connection and echoes every
byte back until EOF, then sends a JSON object with the sha256 and length of all it
got, and closes it.
"""

import hashlib
import json
import socket
import sys


def main() -> None:
    s = socket.create_server(("0.0.0.0", int(sys.argv[1])))
    print("ready", flush=True)
    c, _ = s.accept()
    h, n = hashlib.sha256(), 0
    while data := c.recv(1 << 16):
        h.update(data)
        n += len(data)
        c.sendall(data)
    c.sendall(json.dumps({"sha256": h.hexdigest(), "length": n}).encode())
    c.close()


if __name__ == "__main__":
    main()
