"""A host peer for the handover tests: one paced download and one paced upload.

    python3 transfer_peer.py SIZE RATE TAIL GO_FILE

Serves one download (SIZE bytes of indexed_blocks, then FIN) and one upload (read to
EOF, hashed) on two listeners on 127.0.0.1, and prints their ports as a JSON list.
Both run at RATE bytes a second until TAIL bytes are left, then wait until GO_FILE
exists and finish at full speed. Then prints one JSON line per transfer: "kind"
("down" or "up"), "length", "sha256", "error" (null, or the exception it got) and
"end" (its CLOCK_MONOTONIC end).
"""

import hashlib
import json
import os
import socket
import sys
import threading
import time

from indexed_blocks import blocks

SIZE, RATE, TAIL, GO = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
down, up = (socket.create_server(("127.0.0.1", 0)) for _ in range(2))


def pace(done: int, start: float) -> None:
    """Hold the transfer at RATE, or until GO exists once only TAIL is left."""
    if done >= SIZE - TAIL:
        while not os.path.exists(GO):
            time.sleep(0.01)
    else:
        time.sleep(max(0.0, start + done / RATE - time.monotonic()))


def serve_down() -> None:
    c, _ = down.accept()
    h, sent, error, start = hashlib.sha256(), 0, None, time.monotonic()
    try:
        for block in blocks(None, SIZE):
            pace(sent, start)
            c.sendall(block)
            h.update(block)
            sent += len(block)
        c.shutdown(socket.SHUT_WR)
        if c.recv(1):
            error = "data after the download"
    except OSError as exc:
        error = repr(exc)
    print(json.dumps({"kind": "down", "length": sent, "sha256": h.hexdigest(),
                      "error": error, "end": time.monotonic()}), flush=True)


def serve_up() -> None:
    c, _ = up.accept()
    h, n, error, start = hashlib.sha256(), 0, None, time.monotonic()
    try:
        while True:
            pace(n, start)
            chunk = c.recv(1 << 20)
            if not chunk:
                break
            h.update(chunk)
            n += len(chunk)
        c.close()
    except OSError as exc:
        error = repr(exc)
    print(json.dumps({"kind": "up", "length": n, "sha256": h.hexdigest(), "error": error,
                      "end": time.monotonic()}), flush=True)


def main() -> None:
    print(json.dumps([down.getsockname()[1], up.getsockname()[1]]), flush=True)
    threads = [threading.Thread(target=f) for f in (serve_down, serve_up)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
