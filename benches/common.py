"""What the benchmark scripts share: processes in their own sessions, network namespaces
held by a process, `ip`/`nsenter` helpers, the stub uplink pasta needs, iperf3's JSON, and
clean-up on signals. The setups themselves are in setups.py, the workloads in
workloads.py, the runner in run.py.

Requirements: Linux, root, Python 3.11+, iproute2 (`ip`), util-linux (`unshare`,
`nsenter`), iperf3 (>= 3.1, for `-J`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

REPO_SRC = Path(__file__).resolve().parent.parent / "src"

SETUP_TIMEOUT = 15.0  # bringing a relay / namespace up
CMD_TIMEOUT = 10.0  # one-shot `ip` / `nsenter` commands
CLIENT_GRACE = 30.0  # iperf3 client timeout on top of --duration + --omit
STOP_GRACE = 2.0  # SIGTERM -> SIGKILL

VETH_HOST, VETH_GUEST, VETH_PREFIX = "10.123.0.1", "10.123.0.2", 24
STUB_ADDR, STUB_GATEWAY = "192.0.2.1/24", "192.0.2.254"  # TEST-NET-1, leads nowhere


class BenchError(Exception):
    """A measurement or setup failed; the message becomes the table cell."""


class Interrupted(BaseException):
    """Raised from the SIGTERM/SIGHUP handler so that `finally` blocks clean up."""


@dataclass
class Proc:
    """A child started in its own session (so its whole process group can be killed)."""

    popen: subprocess.Popen[bytes]
    log: IO[bytes]  # stderr (and stdout unless redirected), in an unlinked temporary file

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, limit: int = 300, grep: str = "") -> str:
        """The last few non-empty lines of the log (those containing `grep`), joined."""
        self.log.flush()
        self.log.seek(0)
        lines = self.log.read().decode(errors="replace").splitlines()
        kept = [ln.strip() for ln in lines if ln.strip() and grep in ln.lower()]
        return " | ".join(kept[-3:])[-limit:]


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the child's process group, SIGKILL it after a grace period, reap the child."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM if proc.poll() is None else signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=STOP_GRACE)
    # Whatever is left in the group (grandchildren of a relay, say) is killed outright.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=STOP_GRACE)


@contextlib.contextmanager
def spawned(argv: list[str], **popen_kw: Any) -> Iterator[Proc]:
    """Start `argv` in a new session; kill its process group on the way out."""
    with tempfile.TemporaryFile() as log:
        popen_kw.setdefault("stdout", log)
        try:
            popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stderr=log, start_new_session=True, **popen_kw
            )
        except OSError as exc:
            raise BenchError(f"cannot start {argv[0]}: {exc.strerror}") from exc
        try:
            yield Proc(popen, log)
        finally:
            stop_group(popen)


def run_cmd(argv: list[str]) -> None:
    """Run a short configuration command; raise BenchError with its stderr on failure."""
    try:
        res = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=CMD_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"timed out: {' '.join(argv)}") from exc
    except OSError as exc:
        raise BenchError(f"cannot run {argv[0]}: {exc.strerror}") from exc
    if res.returncode != 0:
        err = res.stderr.decode(errors="replace").strip()
        raise BenchError(f"{' '.join(argv)}: {err or f'exit status {res.returncode}'}")


def ip(args: str, netns_pid: int | None = None) -> None:
    """`ip <args>` here, or in the network namespace of `netns_pid`."""
    prefix = in_netns(netns_pid) if netns_pid is not None else []
    run_cmd([*prefix, "ip", *args.split()])


def wait_until(what: str, check: Callable[[], bool], proc: Proc, timeout: float) -> None:
    """Poll `check` until it holds; fail early if `proc` exits, or after `timeout`."""
    deadline = time.monotonic() + timeout
    while not check():
        if proc.popen.poll() is not None:
            raise BenchError(f"{what}: exited with {proc.popen.returncode}: {proc.log_tail()}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not ready after {timeout:.0f}s")
        time.sleep(0.02)


def require(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found in PATH")


def in_netns(pid: int) -> list[str]:
    return ["nsenter", "-t", str(pid), "-n", "--"]


@contextlib.contextmanager
def guest_netns() -> Iterator[int]:
    """A fresh network namespace held by a sleeping process; yields that process's PID."""
    require("unshare", "nsenter", "ip")
    ours = os.readlink("/proc/self/ns/net")
    with spawned(["unshare", "--net", "--", "sleep", "infinity"]) as holder:

        def unshared() -> bool:
            try:
                return os.readlink(f"/proc/{holder.pid}/ns/net") != ours
            except OSError:
                return False

        wait_until("unshare --net", unshared, holder, SETUP_TIMEOUT)
        ip("link set lo up", holder.pid)
        yield holder.pid


def tcp_listening(port: int, pid: int | None = None) -> bool:
    """Whether something listens on TCP `port` in this process's network namespace, or
    in that of process `pid` (a server started inside a guest with `nsenter`)."""
    proc = "self" if pid is None else str(pid)
    for table in (f"/proc/{proc}/net/tcp", f"/proc/{proc}/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            next(f)  # header
            for line in f:
                _, local, _, state, *_ = line.split()
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    return True
    return False


@contextlib.contextmanager
def stub_uplink() -> Iterator[None]:
    """A veth pair with a default route, inside the private namespace, leading nowhere."""
    ip("link add rnbstub0 type veth peer name rnbstub1")
    try:
        ip(f"addr add {STUB_ADDR} dev rnbstub0")
        ip("link set rnbstub1 up")
        ip("link set rnbstub0 up")
        ip(f"route add default via {STUB_GATEWAY} dev rnbstub0")
        yield
    finally:
        with contextlib.suppress(BenchError):
            ip("link del rnbstub0")


@dataclass(frozen=True)
class Sample:
    gbps: float  # end.sum_received over the measured (non-omitted) time
    intervals_gbps: list[float]  # the per-second reports after the warm-up


def parse_iperf3(stdout: bytes, returncode: int, stderr_tail: str) -> Sample:
    """Read `iperf3 -J` output; BenchError with a reason if it holds no figure.

    The JSON object is looked for from the first line starting with "{" so that a relay
    printing to the same stdout does not break parsing. A run that moved 0 bytes after
    the warm-up counts as failed (a stalled connection), not as 0 Gbit/s.
    """
    text = stdout.decode(errors="replace")
    start = re.search(r"^\{", text, re.MULTILINE)
    report: Any = None
    if start is not None:
        with contextlib.suppress(json.JSONDecodeError):
            report, _ = json.JSONDecoder().raw_decode(text, start.start())
    if not isinstance(report, dict):
        reason = stderr_tail or (text.strip().splitlines() or ["no output"])[-1]
        raise BenchError(f"exit status {returncode}: {reason}"[:300])
    if report.get("error"):
        raise BenchError(f"iperf3: {report['error']}")
    try:
        received = report["end"]["sum_received"]
        intervals = [i["sum"] for i in report.get("intervals", [])]
        sample = Sample(
            float(received["bits_per_second"]) / 1e9,
            [i["bits_per_second"] / 1e9 for i in intervals if not i.get("omitted")],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BenchError(f"unexpected iperf3 JSON: missing {exc}") from exc
    if received.get("bytes", 0) == 0:
        warmup = sum(i.get("bytes", 0) for i in intervals if i.get("omitted"))
        raise BenchError(f"stalled: 0 bytes after the warm-up ({warmup} bytes during it)")
    return sample


def tool_versions(pasta_bin: str | None = None) -> dict[str, str]:
    probes = {
        "iperf3": ["iperf3", "--version"],
        "slirp4netns": ["slirp4netns", "--version"],
        "passt": ["dpkg-query", "-W", "-f", "${Version}", "passt"],
        "nft": ["nft", "--version"],
    }
    if pasta_bin:  # a pasta built from source names its version (Debian's says "unknown")
        probes["pasta-new"] = [pasta_bin, "--version"]
    versions = {}
    for name, argv in probes.items():
        try:
            res = subprocess.run(argv, capture_output=True, timeout=CMD_TIMEOUT, check=False)
            versions[name] = (res.stdout.decode(errors="replace").splitlines() or ["?"])[0]
        except (OSError, subprocess.TimeoutExpired):
            versions[name] = "unavailable"
    return versions


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def raise_interrupted(signum: int, _frame: object) -> None:
    for sig in STOP_SIGNALS:  # a second Ctrl-C must not cut the clean-up short
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signal.Signals(signum).name)
