"""A guest that opens three UDP flows to one echo peer, for a relay that allows two.

    python3 udp_three_flows.py HOST PORT

Three connected UDP sockets to HOST:PORT each send "hello N" (N = 0, 1, 2); after the
first, it waits (up to 10 s) until the guest kernel's ARP entry for HOST is complete,
so that the later datagrams are not queued behind it and reordered. Then it prints
what each socket gets back ("timeout" after 1 s) and sends "again" on it, and does the
same once more for the first two. HOST must be an IPv4 address on the guest's link.
"""

import socket
import sys
import time


def arp_complete(host: str) -> bool:
    """Whether the guest kernel's neighbour entry for `host` is complete (ATF_COM, 0x2
    in the flags column of /proc/net/arp)."""
    with open("/proc/net/arp") as f:
        for line in f.read().splitlines()[1:]:
            if line.split()[0] == host and int(line.split()[2], 16) & 2:
                return True
    return False


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    socks = []
    for i in range(3):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect((host, port))
        s.settimeout(1)
        s.send(b"hello %d" % i)
        socks.append(s)
        deadline = time.monotonic() + 10
        while i == 0 and not arp_complete(host) and time.monotonic() < deadline:
            time.sleep(0.001)
    for s in socks + socks[:2]:
        try:
            print(s.recv(100).decode())
        except TimeoutError:
            print("timeout")
        s.send(b"again")


if __name__ == "__main__":
    main()
