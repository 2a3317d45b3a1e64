"""A guest whose UDP flow falls idle between two exchanges.

    python3 udp_idle_gap.py HOST PORT

From a connected UDP socket to HOST:PORT (an echo peer), sends "one" and prints the
answer, sleeps 2.5 s, sends "two" and prints the answer (each as a bytes repr; no
answer in 2 s is an error).
"""

import socket
import sys
import time


def main() -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((sys.argv[1], int(sys.argv[2])))
    s.settimeout(2)
    s.send(b"one")
    print(s.recv(10))
    time.sleep(2.5)
    s.send(b"two")
    print(s.recv(10))


if __name__ == "__main__":
    main()
