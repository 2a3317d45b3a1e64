"""A guest that sends one datagram from a connected UDP socket and prints the error
its kernel reports for it.

    python3 udp_send_error.py HOST PORT [--timeout S] [--payload TEXT] [--recverr]
                              [--show name|name-errno|is-enetunreach]

Connects a UDP socket (IPv6 if HOST has a colon) to HOST:PORT, sends TEXT (default
"x") and waits up to S seconds (default 5) for an answer. With --recverr the socket
sets IP_RECVERR first (udp(7): without it Linux reports no ICMP error but port
unreachable to a UDP socket). If the receive fails, prints the exception's type name
(--show name, the default), its type name and errno (name-errno), or whether the
errno is ENETUNREACH, "True" or "False" (is-enetunreach); if an answer comes, prints
nothing. Exits 0 either way.
"""

import argparse
import errno
import socket

IP_RECVERR = 11  # linux/in.h


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--timeout", type=float, default=5)
    p.add_argument("--payload", default="x")
    p.add_argument("--recverr", action="store_true")
    p.add_argument("--show", choices=["name", "name-errno", "is-enetunreach"],
                   default="name")
    args = p.parse_args()
    s = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET,
                      socket.SOCK_DGRAM)
    if args.recverr:
        s.setsockopt(socket.SOL_IP, IP_RECVERR, 1)
    s.connect((args.host, args.port))
    s.settimeout(args.timeout)
    s.send(args.payload.encode())
    try:
        s.recv(100)
    except OSError as exc:
        if args.show == "name":
            print(type(exc).__name__)
        elif args.show == "name-errno":
            print(type(exc).__name__, exc.errno)
        else:
            print(exc.errno == errno.ENETUNREACH)


if __name__ == "__main__":
    main()
