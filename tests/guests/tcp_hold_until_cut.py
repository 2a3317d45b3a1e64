"""A guest with one TCP connection to a name that the test cuts from outside.

    python3 tcp_hold_until_cut.py NAME PORT READY_FILE CUT_FILE

Resolves NAME (through the guest's resolver, the relay's DNS address), connects to
PORT, touches READY_FILE and waits up to 20 s for CUT_FILE to exist. Then prints how
the connection is ("open: reset", "open: eof" or "open: alive" when nothing came within
2 s), and how a new connection to NAME fares ("new: ok", or "new: " and the errno's
name, e.g. ECONNREFUSED for the relay's RST).
"""

import errno
import os
import socket
import sys
import time


def main() -> None:
    name, port, ready, cut = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    conn = socket.create_connection((name, port), timeout=5)
    open(ready, "w").close()
    for _ in range(400):
        if os.path.exists(cut):
            break
        time.sleep(0.05)
    conn.settimeout(2)
    try:
        state = "eof" if conn.recv(1) == b"" else "data"
    except ConnectionResetError:
        state = "reset"
    except TimeoutError:
        state = "alive"
    print(f"open: {state}", flush=True)
    try:
        socket.create_connection((name, port), timeout=5).close()
        print("new: ok", flush=True)
    except OSError as exc:
        print(f"new: {errno.errorcode.get(exc.errno or 0, type(exc).__name__)}", flush=True)


if __name__ == "__main__":
    main()
