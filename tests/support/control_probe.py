"""Times a relay's control-socket answers from a process of its own (run as a script).

    python3 control_probe.py CONTROL_PATH --seconds S [--interval S] [--timeout S]

Sends `{"execute": "stats"}` on one connection every `--interval` seconds for
`--seconds`, and times each answer from the request's send to the answer's newline.
The relay handles control requests on the same event loop as the guests' frames, so
the answer's delay is how long the loop was held by other work: a flow that freezes
the loop shows here as a long answer. An answer that takes longer than `--timeout`
ends the run (that loop is frozen for good). Prints one JSON object: the latencies in
seconds, in order, and whether the run ended on a timeout.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time

REQUEST = b'{"execute": "stats"}\n'


def probe(path: str, seconds: float, interval: float, timeout: float) -> dict[str, object]:
    latencies: list[float] = []
    timed_out = False
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    buf = b""
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            start = time.monotonic()
            sock.sendall(REQUEST)
            while b"\n" not in buf:
                try:
                    chunk = sock.recv(1 << 16)
                except TimeoutError:
                    timed_out = True
                    break
                if not chunk:
                    raise ConnectionError("the relay closed the control connection")
                buf += chunk
            if timed_out:
                latencies.append(time.monotonic() - start)
                break
            latencies.append(time.monotonic() - start)
            buf = buf.split(b"\n", 1)[1]
            time.sleep(max(0.0, interval - (time.monotonic() - start)))
    finally:
        sock.close()
    return {"latencies": latencies, "timed_out": timed_out}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path")
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--interval", type=float, default=0.02)
    p.add_argument("--timeout", type=float, default=30.0)
    args = p.parse_args()
    json.dump(probe(args.path, args.seconds, args.interval, args.timeout), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
