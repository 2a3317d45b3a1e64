"""A guest server that hashes uploads and says where each came from.

    python3 tcp_upload_hash_server.py COUNT

Listens on port 8080 of both families (an IPv6 socket with IPV6_V6ONLY off) and
prints "listening"; then, for each of COUNT connections in turn, reads to EOF and
answers with the sha256 of what it read, its length and the client's address
(IPv4 clients as ::ffff:a.b.c.d), space-separated, then closes it.
"""

import hashlib
import socket
import sys


def main() -> None:
    s = socket.socket(socket.AF_INET6)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", 8080))
    s.listen(8)
    print("listening", flush=True)
    for _ in range(int(sys.argv[1])):
        c, peer = s.accept()
        h, n = hashlib.sha256(), 0
        while d := c.recv(1 << 20):
            h.update(d)
            n += len(d)
        c.sendall(f"{h.hexdigest()} {n} {peer[0]}".encode())
        c.close()


if __name__ == "__main__":
    main()
