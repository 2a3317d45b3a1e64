"""A guest for the handover tests: one download and one upload at once.

    python3 transfer_guest.py DOWN_PORT UP_PORT SIZE RESULT_FILE

Downloads from 10.0.2.2:DOWN_PORT to EOF and uploads SIZE bytes of indexed_blocks to
10.0.2.2:UP_PORT (then half-closes and expects nothing back), both at once. Writes
RESULT_FILE as JSON: "down" and "up", each with "length", "sha256" and "error" (null,
or the exception it got), and "tcp", the guest kernel's TCP counters (/proc/net/snmp).
Prints nothing.
"""

import hashlib
import json
import socket
import sys
import threading
from typing import Any

from indexed_blocks import blocks

DOWN, UP, SIZE, OUT = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
result: dict[str, Any] = {}


def download() -> None:
    h, n, error = hashlib.sha256(), 0, None
    try:
        with socket.create_connection(("10.0.2.2", DOWN)) as c:
            while chunk := c.recv(1 << 20):
                h.update(chunk)
                n += len(chunk)
    except OSError as exc:
        error = repr(exc)
    result["down"] = {"length": n, "sha256": h.hexdigest(), "error": error}


def upload() -> None:
    h, n, error = hashlib.sha256(), 0, None
    try:
        with socket.create_connection(("10.0.2.2", UP)) as c:
            for block in blocks(None, SIZE):
                c.sendall(block)
                h.update(block)
                n += len(block)
            c.shutdown(socket.SHUT_WR)
            if c.recv(1):
                error = "data on the upload"
    except OSError as exc:
        error = repr(exc)
    result["up"] = {"length": n, "sha256": h.hexdigest(), "error": error}


def main() -> None:
    threads = [threading.Thread(target=f) for f in (download, upload)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with open("/proc/net/snmp") as f:
        snmp = [line.split() for line in f if line.startswith("Tcp:")]
    result["tcp"] = dict(zip(snmp[0][1:], map(int, snmp[1][1:]), strict=True))
    with open(OUT, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
