"""A guest with one UDP flow that the test cuts from outside.

    python3 udp_flow_until_cut.py PORT READY_FILE CUT_FILE

Sends "a" from a connected UDP socket to 10.0.2.2:PORT (an echo peer) and expects it
back (timeout 5 s), then touches READY_FILE and waits up to 10 s for CUT_FILE to
exist. Then sends "b" and prints "answer" and what came back, or the errno's name
(e.g. ECONNREFUSED) of the error the receive got instead.
"""

import errno
import os
import socket
import sys
import time


def main() -> None:
    port, ready, cut = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.connect(("10.0.2.2", port))
    s.send(b"a")
    assert s.recv(10) == b"a"
    open(ready, "w").close()
    for _ in range(200):
        if os.path.exists(cut):
            break
        time.sleep(0.05)
    s.send(b"b")
    try:
        print("answer", s.recv(10))
    except OSError as exc:
        print(errno.errorcode.get(exc.errno or 0, exc))


if __name__ == "__main__":
    main()
