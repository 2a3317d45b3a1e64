"""`relaynat serve --audit FILE`, confined and not: a qemu-style stream client's first
frame makes the guest known to the relay, and its `guest_ready` record is in the file,
written by the event loop's executor after the process confined itself (which needs a
process of one thread). `run --audit`: tests/integration/test_wire_names.py."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relaynat import RelayConfig
from relaynat.testing import frames


@pytest.mark.parametrize("confine", [True, False], ids=["confined", "no-confine"])
def test_serve_writes_its_guests_events(tmp_path: Path, confine: bool) -> None:
    sock_path, audit = tmp_path / "vm.sock", tmp_path / "audit.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "relaynat", "serve", "--socket", str(sock_path), "--audit",
         str(audit), "--confine" if confine else "--no-confine"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while not sock_path.exists():
            assert time.monotonic() < deadline and proc.poll() is None, "no socket"
            time.sleep(0.05)
        addressing = frames.Addressing.of(RelayConfig(), frames.GUEST_MAC)
        frame = frames.arp_request(addressing, addressing.gateway4)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as guest:
            guest.connect(str(sock_path))
            guest.sendall(struct.pack("!I", len(frame)) + frame)  # qemu's stream framing
            guest.settimeout(5)
            guest.recv(4)  # the ARP reply's length: the relay has the frame
            while time.monotonic() < deadline and not audit.read_text():
                time.sleep(0.05)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert {"kind": "guest_ready", "mac": frames.GUEST_MAC.hex(":"),
            "source": "mac"}.items() <= records[0].items(), records
