"""A guest that reports who and where it is, as one JSON object on stdout.

    python3 report_identity.py [HOST PORT]

The object has the environment ("env"), the working directory ("cwd"), the ids
getresuid/getresgid/getgroups give ("uid", "gid", "groups") and the lines of
/proc/self/status about ids and capabilities ("status": Uid, Gid, Groups, CapInh,
CapPrm, CapEff, CapBnd, CapAmb, NoNewPrivs, as the kernel prints them). With HOST and
PORT it also connects there, sends b"ping", half-closes and puts what came back in
"echo" (an echo server answers "ping").
"""

import json
import os
import socket
import sys

STATUS_KEYS = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
               "NoNewPrivs")


def _status() -> dict[str, str]:
    found = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in STATUS_KEYS:
                found[key] = " ".join(value.split())
    return found


def _echo(host: str, port: int) -> str:
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"ping")
        sock.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := sock.recv(4096):
            got += chunk
    return got.decode()


def main() -> None:
    report: dict[str, object] = {
        "env": dict(os.environ), "cwd": os.getcwd(), "uid": list(os.getresuid()),
        "gid": list(os.getresgid()), "groups": os.getgroups(), "status": _status()}
    if len(sys.argv) == 3:
        report["echo"] = _echo(sys.argv[1], int(sys.argv[2]))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
