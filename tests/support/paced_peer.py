#!/usr/bin/env python3
"""A host peer for flow-moving tests: one paced download and one paced upload.

    python3 tests/support/paced_peer.py DATA_FILE CHUNK PAUSE_S BIND_ADDR [UP_RCVBUF]

Serves one download (the file, CHUNK bytes per PAUSE_S seconds, then FIN) and one
upload (read at the same pace to EOF, hashed) on two listeners bound to BIND_ADDR;
prints their ports as a JSON list, then one JSON line per transfer with its own view
of how it ended ("error": null, or the exception it got: a reset shows here). The
pace keeps both transfers running long enough for flows to move mid-way.

UP_RCVBUF (default 64 KiB; 0: the kernel's autotuning) is the upload socket's receive
buffer: a small one keeps the relay's host socket's send queue full, so its bytes move
in the repair dump too.
"""

import hashlib
import json
import socket
import sys
import threading
import time

data = open(sys.argv[1], "rb").read()  # noqa: SIM115
CHUNK, PAUSE, BIND = int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
UP_RCVBUF = int(sys.argv[5]) if len(sys.argv) > 5 else 1 << 16
down = socket.create_server((BIND, 0))
up = socket.socket()
if UP_RCVBUF:
    up.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UP_RCVBUF)
up.bind((BIND, 0))
up.listen()
print(json.dumps([down.getsockname()[1], up.getsockname()[1]]), flush=True)


def serve_down() -> None:
    c, _ = down.accept()
    sent, error = 0, None
    try:
        while sent < len(data):
            sent += c.send(data[sent:sent + CHUNK])
            time.sleep(PAUSE)
        c.shutdown(socket.SHUT_WR)
        c.recv(1)  # b"": the guest closed in order; a reset raises
    except OSError as exc:
        error = repr(exc)
    print(json.dumps({"kind": "down", "sent": sent, "error": error}), flush=True)


def serve_up() -> None:
    c, _ = up.accept()
    h, n, error = hashlib.sha256(), 0, None
    try:
        while chunk := c.recv(CHUNK):
            h.update(chunk)
            n += len(chunk)
            time.sleep(PAUSE)
    except OSError as exc:
        error = repr(exc)
    print(json.dumps({"kind": "up", "length": n, "sha256": h.hexdigest(), "error": error}),
          flush=True)


threads = [threading.Thread(target=f) for f in (serve_down, serve_up)]
for t in threads:
    t.start()
for t in threads:
    t.join()
