"""A guest that opens a TCP connection expected to fail and prints how it failed.

    python3 tcp_connect_error.py HOST PORT [--timeout S] [--elapsed]

Connects to HOST:PORT (socket.create_connection, timeout S, default 5). If that
fails, prints the exception's type name, and with --elapsed the seconds the attempt
took (rounded to ms) after it; if it connects, prints nothing. Exits 0 either way.
"""

import argparse
import socket
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--timeout", type=float, default=5)
    p.add_argument("--elapsed", action="store_true")
    args = p.parse_args()
    t = time.monotonic()
    try:
        socket.create_connection((args.host, args.port), timeout=args.timeout)
    except OSError as exc:
        if args.elapsed:
            print(type(exc).__name__, round(time.monotonic() - t, 3))
        else:
            print(type(exc).__name__)


if __name__ == "__main__":
    main()
