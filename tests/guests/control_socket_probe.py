"""A guest that tries the relay's control socket by its path.

    python3 control_socket_probe.py CONTROL_SOCKET

Connects to CONTROL_SOCKET and asks for the forwards; prints "reached:" and the start
of the answer, or "refused:" and the errno if the connect or the request failed.
"""

import socket
import sys


def main() -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(sys.argv[1])
        s.sendall(b'{"execute": "list_hostfwd"}\n')
        print("reached:", s.recv(100))
    except OSError as exc:
        print("refused:", exc.errno)


if __name__ == "__main__":
    main()
