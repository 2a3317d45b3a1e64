"""`ctl handover`, `ctl export` and `ctl import` against confined relays (`--confine`,
started as root: uid nobody, an empty filesystem root, a seccomp allowlist).

A confined relay can open no path and connect to no socket path, so `relaynat ctl`
opens the flows file or connects to the new relay's --receive-handover socket itself
and passes the descriptor over the control socket (control/server.py). Here:

- a confined `serve --interface` with a real kernel guest mid-transfer (both ways)
  hands over to a confined `serve --receive-handover`; both transfers end whole;
- the same from a confined `relaynat run` with its command;
- a confined relay exports its guest's flows to a file and another confined relay, in
  another network namespace, imports them (TCP_REPAIR: CAP_NET_ADMIN is kept with a
  control socket); both transfers end whole;
- bad requests to a confined relay (a descriptor announced but none passed, a
  descriptor of the wrong kind) are answered with what is wrong, and the relay serves
  on; the path form (the relay opening the path itself) fails confined, which is why
  the descriptor is passed.

Confinement is asked for explicitly (`--confine`): the default may change.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import SUPPORT
from support.faultkit import wait_until
from support.procfs import status, wait_confined
from support.relaynat_cli import guest_python

from integration.test_handover import (
    LINK_RATE,
    LINK_SIZE,
    Transfers,
    _hand_over,
    _receiver,
    _relaynat,
    _serve_and_hand_over,
    _stop,
    _stop_for_stats,
    _wait_for,
    _wait_for_transfers,
)
from integration.test_interface import VethGuest
from integration.test_migration import CHUNK, PAUSE_S, PEER_ADDR, Hosts, _wait_flowing, ctl_ok
from relaynat.control.client import call

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0, reason="confinement starts as root")]
pytest_plugins = ["support.guest_fs"]

#: The export/import transfers (test_migration's pacing: 4 s or more each).
SIZE = 24 << 20


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    _stop(started)


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    made = Hosts(tmp_path)
    try:
        yield made
    finally:
        made.close()


NOBODY = 65534


def _confined(pid: int) -> None:
    """The relay runs as nobody under its seccomp filter, with an empty root."""
    st = status(pid)
    assert st["Seccomp"] == "2" and st["Uid"].split() == [str(NOBODY)] * 4, st
    assert os.listdir(f"/proc/{pid}/root") == []


def test_confined_serve_hands_over_to_a_confined_relay(
        tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    """A veth-backed guest namespace (a real kernel) downloading and uploading through a
    confined `serve --interface` keeps both transfers across a handover to a confined
    new relay: the relay, which cannot connect to the new relay's path, hands over on
    the socket `relaynat ctl handover` connected and passed."""
    veth = VethGuest(tmp_path, 1500)
    try:

        def start_guest(argv: list[str]) -> subprocess.Popen[bytes]:
            veth.dhcp()
            return subprocess.Popen(["ip", "netns", "exec", veth.ns, *argv])

        relay_b = _serve_and_hand_over(tmp_path, procs,
                                       ["--confine", "--interface", veth.near],
                                       ("--confine", "-m", "1500"), start_guest)
        _confined(relay_b.pid)  # confined before it took anything over
        stats = _stop_for_stats(relay_b, tmp_path / "b.log")
    finally:
        veth.close()
    assert stats["handovers_received"] == 1 and stats["tcp_flows_imported"] == 2, stats
    assert "handed over to" in (tmp_path / "a.log").read_text()


def test_confined_run_hands_its_command_over_to_a_confined_relay(
        tmp_path: Path, guest_dir: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    """`relaynat run --confine -- CMD`: the TAP, the control socket and the command
    (a pidfd) move to a confined `serve --receive-handover`, which ends with the
    command; the command's transfers end whole."""
    transfers = Transfers(guest_dir, LINK_SIZE, LINK_RATE)
    try:
        receiver, path = _receiver(tmp_path, "b", "--confine")
        procs.append(receiver)
        control = tmp_path / "control.sock"
        relay_a = _relaynat("run", "--confine", "--control-socket", str(control),
                            "--log-level", "info", "--",
                            *transfers.guest_argv(guest_python()), log=tmp_path / "a.log")
        procs.append(relay_a)
        _wait_for(control, relay_a)
        _wait_for_transfers(control)
        _confined(relay_a.pid)  # confined while it relays
        _hand_over(control, path, relay_a, tmp_path / "a.log", exits=False)
        transfers.release()
        assert receiver.wait(timeout=60) == 0, (tmp_path / "b.log").read_text()
        assert relay_a.wait(timeout=60) == 0, (tmp_path / "a.log").read_text()
        guest, reports = transfers.finish()
    finally:
        transfers.close()
    transfers.check(guest, reports)


@pytest.mark.parametrize("handed_over", [False, True], ids=["export", "handover-export"])
def test_confined_relays_export_and_import_flows(
        hosts: Hosts, data_file: tuple[Path, str], handed_over: bool) -> None:
    """test_migration's move, both relays confined: `ctl export` creates the file and
    passes it to relay A, `ctl import` opens it and passes it to relay B (in another
    network namespace); both transfers end whole. `handed_over`: relay A is a confined
    `serve --receive-handover` that took the guest, its flows and the control socket
    over mid-transfer from the first confined relay, and exports from there (its
    TCP_REPAIR needs the CAP_NET_ADMIN it kept though it confined itself before it
    knew a control socket would come), and ends on `ctl quit` as the first would."""
    path, digest = data_file
    peer = hosts.popen(hosts.peer, sys.executable, str(SUPPORT / "paced_peer.py"), str(path),
                       str(CHUNK), str(PAUSE_S), PEER_ADDR, "0", stdout=subprocess.PIPE)
    assert peer.stdout is not None
    down_port, up_port = json.loads(peer.stdout.readline())
    relay_a, sock_a = hosts.relay(hosts.a, "A", "--confine")
    out = hosts.workdir / "downloaded"
    down = hosts.popen(hosts.guest, "timeout", "40", "socat", "-u",
                       f"TCP:{PEER_ADDR}:{down_port}", f"OPEN:{out},creat,trunc")
    up = hosts.popen(hosts.guest, "timeout", "40", "socat", "-u", f"OPEN:{path}",
                     f"TCP:{PEER_ADDR}:{up_port}")
    _wait_flowing(sock_a, 2)
    _confined(relay_a.pid)
    if handed_over:
        relay_a = _take_over(hosts, relay_a, sock_a)
    time.sleep(0.5)

    hosts.cut_uplink()
    doc_path = hosts.workdir / "flows.json"
    exported = ctl_ok(sock_a, "export", str(doc_path))
    # At once: a flow that did not move (TCP_REPAIR refused) would leave the
    # transfers hanging below.
    assert exported.startswith(f"exported 2 flows to {doc_path}"), exported
    hosts.nic_to_b()
    hosts.uplink_up_on_b()
    relay_b, sock_b = hosts.relay(hosts.b, "B", "--confine", "--incoming")
    imported = ctl_ok(sock_b, "import", str(doc_path))
    hosts.release_peer()

    assert down.wait(40) == 0 and up.wait(40) == 0
    assert peer.wait(40) == 0
    reports = {r["kind"]: r for r in map(json.loads, peer.stdout.read().splitlines())}
    _confined(relay_b.pid)
    assert ctl_ok(sock_a, "release") == "released 2 held sockets silently\n"
    assert ctl_ok(sock_a, "quit") == "the relay is exiting\n"
    assert relay_a.wait(10) == 0
    relay_b.send_signal(signal.SIGTERM)
    assert relay_b.wait(10) == 0

    doc = json.loads(doc_path.read_text())
    assert len(doc["flows"]) == 2 and doc["not_moved"] == [], exported
    assert imported.startswith(f"imported 2 flows from {doc_path}"), imported
    assert doc_path.stat().st_mode & 0o777 == 0o600
    assert not list(hosts.workdir.glob("flows.json.*.tmp"))  # renamed into place
    assert reports["down"] == {"kind": "down", "sent": SIZE, "error": None}
    assert reports["up"] == {"kind": "up", "length": SIZE, "sha256": digest, "error": None}
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest


def _take_over(hosts: Hosts, relay: subprocess.Popen[str], control: Path
               ) -> subprocess.Popen[str]:
    """A confined relay in host A (`serve --receive-handover`, the same addressing)
    takes over from `relay` (which exits 0), control socket included; returns it."""
    to = hosts.workdir / "A2.handover"
    with open(hosts.workdir / "A2.log", "w") as err:
        new = hosts.popen(hosts.a, sys.executable, "-m", "relaynat", "serve", "-4", "-m", "1500",
                          "--receive-handover", str(to), "--confine", "--stats",
                          "--log-level", "info", stderr=err)
    wait_until(to.exists, 20, "the receiving relay's socket", new)
    wait_confined(new, 20)
    answer = json.loads(ctl_ok(control, "--json", "handover", "--to", str(to)))["return"]
    assert answer["moved_tcp"] == 2 and answer["not_moved"] == [], answer
    assert relay.wait(20) == 0
    _confined(new.pid)
    return new


def _exchange(control: Path, request: dict[str, object], fds: list[int]) -> tuple[
        list[dict[str, object]], bool]:
    """The descriptor exchange spoken by hand: the request, then (after `send_fd`) one
    byte with `fds` attached; the answers, and whether the relay closed the
    connection after them."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(15)
        sock.connect(str(control))
        sock.sendall(json.dumps(request).encode() + b"\n")
        lines = sock.makefile("rb")
        answers = [json.loads(lines.readline())]
        if answers[0] == {"send_fd": True}:
            socket.send_fds(sock, [b"\0"], fds)
            answers.append(json.loads(lines.readline()))
        try:  # a closed connection: EPIPE at once, or end of file (or reset) below
            sock.sendall(b'{"execute": "list_hostfwd"}\n')
            after = lines.readline()
        except (BrokenPipeError, ConnectionResetError):
            after = b""
        if after:
            assert json.loads(after) == {"return": {"entries": []}}
        return answers, not after


def test_bad_descriptors_are_refused_and_the_confined_relay_serves_on(tmp_path: Path) -> None:
    control = tmp_path / "control.sock"
    log = tmp_path / "relay.log"
    with open(log, "w") as err:
        relay = subprocess.Popen(
            [sys.executable, "-m", "relaynat", "serve", "--confine", "--socket",
             str(tmp_path / "guest.sock"), "--control-socket", str(control)],
            stderr=err, text=True)
    try:
        wait_confined(relay)
        _confined(relay.pid)
        doc = tmp_path / "flows.json"
        export = {"execute": "export_flows", "arguments": {"file": str(doc), "fd": True}}
        imports = {"execute": "import_flows", "arguments": {"file": str(doc), "fd": True}}
        handover = {"execute": "handover", "arguments": {"to": "/new", "fd": True}}

        # Announced, then a byte without a descriptor: an error, and the connection
        # is closed (out of step); the relay serves the next one.
        answers, closed = _exchange(control, export, [])
        assert answers[1] == {"error": {"desc": "export_flows: one descriptor must come "
                                                "with the byte after send_fd, none came; "
                                                "closing"}}, answers
        assert closed
        two = [os.open(tmp_path, os.O_RDONLY), os.open(tmp_path, os.O_RDONLY)]
        answers, closed = _exchange(control, imports, two)
        assert "2 came" in str(answers[1]) and closed, answers
        for fd in two:
            os.close(fd)

        # A descriptor of the wrong kind: what is wrong, and the connection serves on.
        reader, writer = os.pipe()
        directory = os.open(tmp_path, os.O_RDONLY)
        tcp = socket.socket()
        unconnected = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        doc.write_text("{}")
        read_only = os.open(doc, os.O_RDONLY)
        for request, fd, error in [
                (export, writer, f"export_flows: the descriptor passed for {doc} is not a "
                                 "regular file open for writing"),
                (export, read_only, f"export_flows: the descriptor passed for {doc} is not a "
                                    "regular file open for writing"),
                (imports, directory, f"import_flows: the descriptor passed for {doc} is not "
                                     "a regular file open for reading"),
                (handover, read_only, "the descriptor passed for /new is not a socket"),
                (handover, tcp.fileno(), "the socket passed for /new is not a unix "
                                         "seqpacket socket"),
                (handover, unconnected.fileno(), "the socket passed for /new is not "
                                                 "connected")]:
            answers, closed = _exchange(control, request, [fd])
            assert answers[0] == {"send_fd": True} and not closed, answers
            desc = answers[1]["error"]["desc"]  # type: ignore[index]
            assert desc.startswith(error), (desc, error)
        for fd in (reader, writer, directory, read_only):
            os.close(fd)
        tcp.close()
        unconnected.close()

        # The path form: the confined relay cannot create a file (its root is empty).
        answer = call(str(control), {"execute": "export_flows",
                                     "arguments": {"file": str(tmp_path / "by-path.json")}})
        assert "cannot create" in answer["error"]["desc"], answer
        assert not list(tmp_path.glob("by-path*"))
        # The descriptor form, as `relaynat ctl` speaks it, works confined.
        done = subprocess.run([sys.executable, "-m", "relaynat", "ctl", "-s", str(control),
                               "export", str(doc)], capture_output=True, text=True,
                              timeout=30)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"exported 0 flows to {doc}"), done.stdout
        assert json.loads(doc.read_text())["flows"] == []
        done = subprocess.run([sys.executable, "-m", "relaynat", "ctl", "-s", str(control),
                               "import", str(doc)], capture_output=True, text=True,
                              timeout=30)
        assert (done.returncode, done.stdout) == (0, f"imported 0 flows from {doc}\n"), done
        done = subprocess.run([sys.executable, "-m", "relaynat", "ctl", "-s", str(control),
                               "handover", "--to", str(tmp_path / "nobody-waits")],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 1 and "cannot connect to" in done.stderr, done.stderr
        assert relay.poll() is None
        _confined(relay.pid)  # alive and confined throughout
    finally:
        relay.kill()
        relay.wait()
    assert "Traceback" not in log.read_text()
