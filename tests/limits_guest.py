"""Guest side of tests/test_limits.py: runs inside the `relaynat run` namespace and
prints one JSON object on stdout describing what the guest's own kernel reported."""

from __future__ import annotations

import argparse
import errno
import json
import socket
import sys
import time


def _connect(host: str, port: int, timeout: float) -> str:
    """"ok", "refused" (the relay's RST: ECONNREFUSED) or the other outcome's name."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((host, port))
        return "ok"
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))
    finally:
        s.close()


def connect_burst(host: str, port: int, count: int, pause: float, after: int) -> int:
    """`count` connects back to back, timed on CLOCK_MONOTONIC (the relay's loop clock
    too: namespaces share it), then, after `pause` seconds, `after` more."""
    start = time.monotonic()
    first = [_connect(host, port, 5.0) for _ in range(count)]
    elapsed = time.monotonic() - start
    time.sleep(pause)
    second = [_connect(host, port, 5.0) for _ in range(after)]
    print(json.dumps({"first": first, "elapsed": elapsed, "second": second}))
    return 0


def udp_flows(host: str, port: int, flows: int, tries: int) -> int:
    """Open `flows` UDP sockets (one flow each: distinct source ports) and for each,
    up to `tries` times, send a datagram and wait 0.5 s for its echo; then once more on
    every socket, to see which flows still work."""
    socks = []
    for _ in range(flows):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect((host, port))
        s.settimeout(0.5)
        socks.append(s)

    def echo(s: socket.socket, data: bytes) -> bool:
        for _ in range(tries):
            s.send(data)
            try:
                if s.recv(2048) == data:
                    return True
            except TimeoutError:
                continue
        return False

    first = [echo(s, b"flow %d" % i) for i, s in enumerate(socks)]
    again = [echo(s, b"again %d" % i) for i, s in enumerate(socks)]
    print(json.dumps({"first": first, "again": again}))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("connect-burst")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--pause", type=float, default=0.0)
    p.add_argument("--after", type=int, default=0)
    p = sub.add_parser("udp-flows")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--flows", type=int, required=True)
    p.add_argument("--tries", type=int, default=3)
    args = parser.parse_args()
    if args.cmd == "connect-burst":
        return connect_burst(args.host, args.port, args.count, args.pause, args.after)
    return udp_flows(args.host, args.port, args.flows, args.tries)


if __name__ == "__main__":
    sys.exit(main())
