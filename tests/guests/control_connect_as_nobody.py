"""Another local user trying the control socket: run as root, it becomes nobody.

    python3 control_connect_as_nobody.py CONTROL_SOCKET

Drops to uid and gid 65534 (no supplementary groups), then connects to the control
socket and asks for the stats. Prints why the connect failed (strerror, e.g.
"Permission denied") and exits 0, or "answered" if the relay answered the command,
"error" if it answered with an error.
"""

import json
import os
import socket
import sys


def main() -> None:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(sys.argv[1])
    except OSError as exc:
        print(os.strerror(exc.errno or 0))
        sys.exit(0)
    s.sendall(b'{"execute": "stats"}\n')
    print("answered" if "return" in json.loads(s.makefile().readline()) else "error")


if __name__ == "__main__":
    main()
