"""A guest that asks for a file over HTTP, then reads nothing for a while.

    python3 stalled_http_get.py HOST PORT PAUSE_S [--started FILE]

Connects to HOST:PORT with a 64 KiB receive buffer, sends "GET /f.bin HTTP/1.0",
touches FILE if given, sleeps PAUSE_S seconds (its kernel's window closes meanwhile),
then reads the answer to EOF and prints the body's sha256 and length.
"""

import argparse
import hashlib
import socket
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("pause", type=float)
    p.add_argument("--started")
    args = p.parse_args()
    s = socket.create_connection((args.host, args.port), timeout=30)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    s.sendall(b"GET /f.bin HTTP/1.0\r\n\r\n")
    if args.started:
        open(args.started, "w").close()
    time.sleep(args.pause)
    buf = bytearray()
    while chunk := s.recv(1 << 20):
        buf += chunk
    body = bytes(buf).split(b"\r\n\r\n", 1)[1]
    print(hashlib.sha256(body).hexdigest(), len(body))


if __name__ == "__main__":
    main()
