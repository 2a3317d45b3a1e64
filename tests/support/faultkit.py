"""What the fault and flood tests (and benches/soak.py, benches/faults.py) share.

- `rss_kib(pid)`, `fd_count(pid)`, `cpu_seconds(pid)`: the relay process's resident
  memory (VmRSS in /proc/PID/status; kernel socket buffers are not in it), open
  descriptors and CPU time used.
- `LiveRun`: `relaynat run --stats [options] -- CMD` as a live process, so a test can
  act while the guest runs (sample the relay, lower its RLIMIT_NOFILE, wait for a file
  the guest writes: `relaynat run` shares the filesystem with its guest) and then read
  the guest's output and the relay's counters.
- `OneShotPeer`: a host-side TCP server (a thread of the test process, on 127.0.0.1)
  for one connection that sends or receives, optionally resetting after N bytes, and
  records what its kernel reported (the reset tests read it).
- `HoldingPeer`: a host-side TCP server that holds many idle connections and records
  how and when each one ends.
"""

from __future__ import annotations

import os
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from support.guest_tools import errno_name, move_bytes
from support.relaynat_cli import parse_stats

MIB = 1 << 20


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used (proc(5): stat fields 14, 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def lowest_free_fd(pid: int) -> int:
    """The descriptor number the process's next socket() gets (the lowest unused)."""
    used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    return min(set(range(len(used) + 1)) - used)


def nofile_limit(pid: int, soft: int | None = None) -> tuple[int, int]:
    """RLIMIT_NOFILE of the process `pid` (soft, hard), first setting its soft limit to
    `soft` if given, with util-linux's `prlimit --pid` (prlimit(2)).

    Another user's process may only be changed with CAP_SYS_RESOURCE, which root lacks
    on this kind of machine, and a confined relay runs as nobody: prlimit then runs
    with the relay's own ids, which prlimit(2) allows without it."""
    ids = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Uid", "Gid"):
                ids[key] = int(value.split()[0])
    same = (ids["Uid"], ids["Gid"]) == (os.geteuid(), os.getegid())
    as_relay: dict[str, object] = (
        {} if same else {"user": ids["Uid"], "group": ids["Gid"], "extra_groups": []})
    base = ["prlimit", f"--pid={pid}"]
    if soft is not None:
        hard = nofile_limit(pid)[1]
        subprocess.run([*base, f"--nofile={soft}:{hard}"], check=True, timeout=30,
                       **as_relay)
    done = subprocess.run([*base, "--nofile", "--output=SOFT,HARD", "--noheadings", "--raw"],
                          capture_output=True, text=True, check=True, timeout=30,
                          **as_relay)
    now_soft, now_hard = done.stdout.split()
    return int(now_soft), int(now_hard)


def wait_until(check: Callable[[], bool], timeout_s: float, what: str,
               alive: subprocess.Popen | None = None) -> None:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout_s
    while not check():
        if alive is not None and alive.poll() is not None:
            raise AssertionError(f"{what}: the process exited ({alive.returncode}) first")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        time.sleep(0.02)


class LiveRun:
    """`relaynat run --stats` with the guest command `argv`, running in the background.
    The relay is this process itself (the guest command is its child)."""

    def __init__(self, argv: Sequence[str], options: Sequence[str] = (),
                 log_level: str = "warning") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relaynat", "run", "--stats", "--log-level", log_level,
             *options, "--", *argv],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        self.stdout = self.stderr = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_file(self, path: Path, timeout_s: float = 30) -> str:
        wait_until(path.exists, timeout_s, f"guest file {path.name}", self.proc)
        return path.read_text()

    def finish(self, timeout_s: float = 120) -> tuple[int, dict[str, int]]:
        """Wait for the guest command; its exit status and the relay's counters."""
        try:
            self.stdout, self.stderr = self.proc.communicate(timeout=timeout_s)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.stdout, self.stderr = self.proc.communicate()
        return self.proc.returncode, parse_stats(self.stderr)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


class OneShotPeer:
    """A TCP server on 127.0.0.1 for one client. `send=True`: it sends random bytes,
    else it reads; with `reset_after` it closes with a RST after that many bytes,
    else it goes on until its kernel reports EOF or an error. `outcome` is then
    "reset-sent", "eof" or the errno's name, `moved` the byte count."""

    def __init__(self, send: bool, reset_after: int | None = None,
                 limit: int = 1 << 30) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.send, self.reset_after, self.limit = send, reset_after, limit
        self.moved, self.outcome = 0, ""
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self._listener.settimeout(60)
        try:
            conn, _ = self._listener.accept()
        except OSError as exc:
            self.outcome = "no client: " + str(exc)
            return
        finally:
            self._listener.close()
        conn.settimeout(60)
        self.outcome, self.moved = move_bytes(conn, self.send, self.reset_after, self.limit)

    def result(self, timeout_s: float = 30) -> tuple[str, int]:
        self._thread.join(timeout_s)
        return self.outcome, self.moved


class HoldingPeer:
    """A TCP server on 127.0.0.1 that accepts up to `count` clients, sends nothing,
    and records how each connection ends: `ended[i]` is ("eof" | errno name, the
    monotonic time it was seen)."""

    def __init__(self, count: int) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=count)
        self.port = self._listener.getsockname()[1]
        self.count = count
        self.accepted = 0
        self.ended: list[tuple[str, float]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ)
        deadline = time.monotonic() + 300  # bounded even if a test forgets close()
        while not self._stop and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._listener:
                    conn, _ = sock.accept()
                    self.accepted += 1
                    sel.register(conn, selectors.EVENT_READ)
                    if self.accepted == self.count:
                        sel.unregister(sock)
                    continue
                try:
                    outcome = "eof" if not sock.recv(65536) else ""
                except OSError as exc:
                    outcome = errno_name(exc)
                if outcome:
                    self.ended.append((outcome, time.monotonic()))
                    sel.unregister(sock)
                    sock.close()
        sel.close()

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self._listener.close()
