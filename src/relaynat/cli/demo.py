"""`relaynat demo`: a download through the relay, end to end, on a built-in default.

It moves itself into a private network namespace first (so the demo can reach
nothing but its own loopback), writes a random file, serves it with Python's
http.server on 127.0.0.1, and runs a namespace guest that fetches it from the
gateway address (mapped to host loopback) and hashes it, with a Python its
unprivileged id may run (`namespace.python_for_command`). It prints both hashes and
the speed; exit status 0 only if the hashes match.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time

from relaynat.cli.event_loop import new_loop
from relaynat.config import RelayConfig
from relaynat.netns.syscalls import isolate_network

_GUEST_SCRIPT = """
import hashlib, sys, time, urllib.request
t = time.monotonic()
digest, total = hashlib.sha256(), 0
with urllib.request.urlopen(sys.argv[1]) as r:
    while chunk := r.read(1 << 20):
        digest.update(chunk)
        total += len(chunk)
print(digest.hexdigest(), total, time.monotonic() - t)
"""


def _start_server(directory: str) -> tuple[subprocess.Popen[str], int]:
    server = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1",
         "--directory", directory], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert server.stdout is not None
    line = server.stdout.readline()
    match = re.search(r"port (\d+)", line)
    if not match:
        server.kill()
        raise RuntimeError(f"http.server did not start: {line!r}")
    return server, int(match.group(1))


def run_demo(size_mib: int) -> int:
    from relaynat.netns.guest import command_ids, python_for_command, run_command

    if os.geteuid() != 0:
        print("relaynat demo: needs root (it creates network namespaces and a TAP)",
              file=sys.stderr)
        return 1
    isolate_network()
    python = python_for_command()
    with tempfile.TemporaryDirectory(prefix="relaynat-demo-") as tmp:
        # The guest is root of its own user namespace only, an unprivileged id outside
        # (netns/guest.py): it writes its result here, so that id must own the directory.
        os.chown(tmp, *command_ids())
        path = os.path.join(tmp, "payload.bin")
        digest = hashlib.sha256()
        with open(path, "wb") as f:
            for _ in range(size_mib):
                chunk = os.urandom(1 << 20)
                digest.update(chunk)
                f.write(chunk)
        server, port = _start_server(tmp)
        try:
            url = f"http://{RelayConfig().gateway_ipv4}:{port}/payload.bin"
            print(f"server: {size_mib} MiB on 127.0.0.1:{port}, sha256 {digest.hexdigest()}")
            print(f"guest:  fetching {url} through relaynat (namespace guest, TAP)")
            out_path = os.path.join(tmp, "guest.out")
            loop = new_loop()
            try:
                t0 = time.monotonic()
                code = loop.run_until_complete(run_command(
                    RelayConfig(), ["sh", "-c", f'exec "$0" -c "$1" "$2" > {out_path}',
                                    python, _GUEST_SCRIPT, url],
                    # A SIGTERM ends the guest and the demo reports it, as `relaynat run`.
                    forward_signals=True))
                wall = time.monotonic() - t0
            finally:
                loop.close()
        finally:
            server.kill()
            server.wait()
        with open(out_path) as f:
            fields = f.read().split()
    if code != 0 or len(fields) != 3:
        print(f"guest failed (exit {code})", file=sys.stderr)
        return 1
    guest_hash, total, seconds = fields[0], int(fields[1]), float(fields[2])
    match = guest_hash == digest.hexdigest() and total == size_mib << 20
    print(f"guest:  sha256 {guest_hash} ({'match' if match else 'MISMATCH'})")
    print(f"speed:  {total / seconds / 2**20:.0f} MiB/s = {total * 8 / seconds / 1e9:.2f} Gbit/s "
          f"(download {seconds:.2f} s, whole run with namespace setup {wall:.2f} s)")
    return 0 if match else 1
