"""A host peer that sends one line on one connection, then reports how it ended.

    python3 hello_then_wait_peer.py BIND_ADDR

Listens on BIND_ADDR (any port) and prints the port; accepts one connection, sends
"hello" and a newline, then waits up to 20 s for whatever comes next and prints it as
a JSON string: the repr of the bytes received (b'' for an orderly close), or the type
name of the exception (ConnectionResetError for a reset).
"""

import json
import socket
import sys


def main() -> None:
    srv = socket.create_server((sys.argv[1], 0))
    print(srv.getsockname()[1], flush=True)
    c, _ = srv.accept()
    c.settimeout(20)
    c.sendall(b"hello\n")
    try:
        end = repr(c.recv(1))
    except OSError as exc:
        end = type(exc).__name__
    print(json.dumps(end), flush=True)


if __name__ == "__main__":
    main()
