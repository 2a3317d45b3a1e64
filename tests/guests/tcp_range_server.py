"""A guest that serves TCP ports 6000-6009, answering each connection with the port it
reached.

    python3 tcp_range_server.py READY_FILE COUNT

Listens on 0.0.0.0 ports 6000 to 6009, touches READY_FILE once all ten listen, then
sends each connection the number of the port it reached (as ASCII) and closes it;
exits 0 after COUNT connections. Prints nothing.
"""

import pathlib
import selectors
import socket
import sys


def main() -> None:
    ready, count = sys.argv[1], int(sys.argv[2])
    sel = selectors.DefaultSelector()
    for port in range(6000, 6010):
        sel.register(socket.create_server(("0.0.0.0", port)), selectors.EVENT_READ)
    pathlib.Path(ready).touch()
    served = 0
    while served < count:
        for key, _ in sel.select(30):
            listener: socket.socket = key.fileobj  # type: ignore[assignment]
            conn, _ = listener.accept()
            conn.sendall(str(listener.getsockname()[1]).encode())
            conn.close()
            served += 1


if __name__ == "__main__":
    main()
