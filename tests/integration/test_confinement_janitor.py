"""A confined relay's socket files are removed when it exits (confinement/janitor.py),
however it exits: the relay, `nobody` with an empty root, cannot remove them itself
(they are root's, in a directory only root may write), so the janitor it started
before confining itself does.

Real `relaynat` processes started as root, in a directory of the test's made 0700
(only root may write it, as /run would be):
- `serve --socket` with `--control-socket`: the files are gone once the relay's exit
  is seen after SIGTERM, and within a bounded wait after SIGKILL (`--unixgram` is not
  confined: its guest is answered at a path, docs/confinement.md);
- a file bound at the same path after the relay was killed, before its janitor ran
  (the janitor held stopped meanwhile), stays: a new relay's live socket, and a socket
  file no one serves any more whose inode number is the one the old file freed;
- `run --control-socket`, when the command exits and when the relay is killed;
- `serve --receive-handover`: the paths it takes over from an unconfined relay are
  removed at its exit, its own receiving socket at once.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.dropin_kit import nobody_env
from support.faultkit import wait_until
from support.procfs import seccomp_mode

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0, reason="confinement starts as root")]

#: How long the janitor may take to remove the files once the relay was killed.
KILLED_WAIT_S = 10.0
NOBODY = 65534


@pytest.fixture
def root_dir(tmp_path: Path) -> Path:
    """A directory only root may write (nobody cannot remove a file in it)."""
    path = tmp_path / "run"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def _relaynat(procs: list[subprocess.Popen[str]], log: Path,
              *args: str) -> subprocess.Popen[str]:
    with open(log, "a") as out:
        proc = subprocess.Popen([sys.executable, "-m", "relaynat", *args],
                                stdout=out, stderr=out, text=True)
    procs.append(proc)
    return proc


def _wait_confined(proc: subprocess.Popen[str], *paths: Path) -> None:
    """Until the relay's seccomp filter is on (its janitor was started before) and
    `paths` are bound."""
    wait_until(lambda: seccomp_mode(proc.pid) == "2" and all(p.exists() for p in paths), 30,
               "the relay confined with its socket files", proc)


def _janitor_of(relay: int) -> int:
    """The relay's one child once it serves `serve`: its janitor."""
    children = Path(f"/proc/{relay}/task/{relay}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def _janitor_ready(janitor: int) -> None:
    """Until the janitor has dropped its privileges (its interpreter is up)."""
    def ready() -> bool:
        with open(f"/proc/{janitor}/status") as f:
            return "NoNewPrivs:\t1\n" in f.read()

    wait_until(ready, 30, "the janitor started")


def _wait_gone(pid: int, timeout_s: float = KILLED_WAIT_S) -> None:
    """Until process `pid` (not our child) has exited."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        assert select.select([pidfd], [], [], timeout_s)[0], f"{pid} still runs"
    finally:
        os.close(pidfd)


def _clean_log(log: Path) -> None:
    """The relay said nothing of a failed removal and raised nothing."""
    text = log.read_text()
    assert "Traceback" not in text and "janitor" not in text, text


def test_sigterm_removes_the_socket_files(root_dir: Path, tmp_path: Path,
                                          procs: list[subprocess.Popen[str]]) -> None:
    sock, ctl, log = root_dir / "vm.sock", root_dir / "ctl.sock", tmp_path / "relay.log"
    proc = _relaynat(procs, log, "serve", "--confine", "--socket", str(sock),
                     "--control-socket", str(ctl))
    _wait_confined(proc, sock, ctl)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, log.read_text()
    # Gone when the exit is seen, as when an unconfined relay removes them itself.
    assert not sock.exists() and not ctl.exists(), os.listdir(root_dir)
    _clean_log(log)


def test_sigkill_removes_the_socket_files(root_dir: Path, tmp_path: Path,
                                          procs: list[subprocess.Popen[str]]) -> None:
    sock, ctl, log = root_dir / "vm.sock", root_dir / "ctl.sock", tmp_path / "relay.log"
    proc = _relaynat(procs, log, "serve", "--confine", "--socket", str(sock),
                     "--control-socket", str(ctl))
    _wait_confined(proc, sock, ctl)
    janitor = _janitor_of(proc.pid)
    proc.kill()
    assert proc.wait(timeout=30) == -signal.SIGKILL
    wait_until(lambda: not sock.exists() and not ctl.exists(), KILLED_WAIT_S,
               "the killed relay's socket files removed")
    _wait_gone(janitor)  # and the janitor ends with its work


def test_a_relay_killed_by_its_seccomp_filter_is_cleaned_up(
        root_dir: Path, tmp_path: Path, procs: list[subprocess.Popen[str]]) -> None:
    sock, ctl, log = root_dir / "vm.sock", root_dir / "ctl.sock", tmp_path / "relay.log"
    with open(log, "a") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relaynat", "serve", "--confine", "--socket", str(sock),
             "--control-socket", str(ctl)], stdout=out, stderr=out, text=True,
            env={**os.environ, "RELAYNAT_TEST_FORBIDDEN_CALL_S": "1"})
    procs.append(proc)
    assert proc.wait(timeout=30) == -signal.SIGSYS, log.read_text()
    wait_until(lambda: not sock.exists() and not ctl.exists(), KILLED_WAIT_S,
               "the socket files of the relay its filter killed removed")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_whole_group_leaves_the_janitor_to_clean_up(
        root_dir: Path, tmp_path: Path, procs: list[subprocess.Popen[str]],
        signum: signal.Signals) -> None:
    """A terminal's ^C, or a service manager's SIGTERM, reaches the relay's whole
    process group: the janitor must outlive the relay it ends."""
    sock, ctl, log = root_dir / "vm.sock", root_dir / "ctl.sock", tmp_path / "relay.log"
    with open(log, "a") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relaynat", "serve", "--confine", "--socket", str(sock),
             "--control-socket", str(ctl)], stdout=out, stderr=out, text=True,
            start_new_session=True)
    procs.append(proc)
    _wait_confined(proc, sock, ctl)
    janitor = _janitor_of(proc.pid)
    assert os.getpgid(janitor) == proc.pid  # in the relay's group (no setsid)
    os.killpg(proc.pid, signum)
    assert proc.wait(timeout=30) == 0, log.read_text()
    assert not sock.exists() and not ctl.exists(), os.listdir(root_dir)
    _wait_gone(janitor)


def _socket_inodes(pid: int) -> set[str]:
    fds = Path(f"/proc/{pid}/fd")
    return {link for fd in fds.iterdir()
            if (link := os.readlink(fd)).startswith("socket:")}


def test_the_janitor_holds_nothing_of_the_relay(root_dir: Path, tmp_path: Path,
                                                procs: list[subprocess.Popen[str]]) -> None:
    """Its descriptors are stdio, its end of the socket pair and the relay's pidfd (no
    socket of the relay's: a listening socket it held would go on accepting); it keeps
    CAP_DAC_OVERRIDE and CAP_FOWNER only, and no_new_privs."""
    sock, ctl = root_dir / "vm.sock", root_dir / "ctl.sock"
    proc = _relaynat(procs, tmp_path / "relay.log", "serve", "--confine", "--socket",
                     str(sock), "--control-socket", str(ctl))
    _wait_confined(proc, sock, ctl)
    with socket.socket(socket.AF_UNIX) as guest:
        guest.connect(str(sock))  # the guest's connection exists in the relay
        wait_until(lambda: len(_socket_inodes(proc.pid)) >= 4, 30, "the guest accepted")
        janitor = _janitor_of(proc.pid)
        _janitor_ready(janitor)
        fds = sorted(int(fd) for fd in os.listdir(f"/proc/{janitor}/fd"))
        assert len(fds) == 5 and fds[:3] == [0, 1, 2], fds
        ours = _socket_inodes(janitor)
        assert len(ours) == 1 and not ours & _socket_inodes(proc.pid), ours
    with open(f"/proc/{janitor}/status") as f:
        st = {k: v.strip() for k, _, v in (line.partition(":") for line in f)}
    assert int(st["CapEff"], 16) == int(st["CapPrm"], 16) == int(st["CapBnd"], 16) == 0b1010
    assert st["NoNewPrivs"] == "1"


def _killed_with_janitor_stopped(root_dir: Path, tmp_path: Path,
                                 procs: list[subprocess.Popen[str]]) -> tuple[Path, int]:
    """A confined relay on root_dir/vm.sock killed while its janitor is stopped: the
    path (its stale file still there) and the janitor's pid."""
    sock = root_dir / "vm.sock"
    old = _relaynat(procs, tmp_path / "old.log", "serve", "--confine", "--socket", str(sock))
    _wait_confined(old, sock)
    janitor = _janitor_of(old.pid)
    os.kill(janitor, signal.SIGSTOP)
    old.kill()
    old.wait(timeout=30)
    time.sleep(0.2)
    assert sock.exists()  # its janitor has not run
    return sock, janitor


def test_a_new_relays_file_at_the_path_is_left(root_dir: Path, tmp_path: Path,
                                               procs: list[subprocess.Popen[str]]) -> None:
    sock, janitor = _killed_with_janitor_stopped(root_dir, tmp_path, procs)
    before = os.lstat(sock).st_ctime_ns

    def replaced() -> bool:
        try:  # the new relay unlinks the stale file, then binds its own
            return os.lstat(sock).st_ctime_ns != before
        except FileNotFoundError:
            return False

    new = _relaynat(procs, tmp_path / "new.log", "serve", "--no-confine", "--socket",
                    str(sock))
    # The new relay replaced the stale file (transports/stream.py) with its own.
    wait_until(replaced, 30, "the new relay's socket file", new)
    os.kill(janitor, signal.SIGCONT)
    _wait_gone(janitor)
    assert sock.exists(), "the old relay's janitor removed the new relay's file"
    with socket.socket(socket.AF_UNIX) as guest:
        guest.connect(str(sock))  # the new relay still serves it


def test_a_file_bound_since_is_left_though_no_one_serves_it(
        root_dir: Path, tmp_path: Path, procs: list[subprocess.Popen[str]]) -> None:
    """No live socket holds the file: only its identity (device, inode and change
    time; ext4 gives the new file the inode number the old one freed) tells it apart."""
    sock, janitor = _killed_with_janitor_stopped(root_dir, tmp_path, procs)
    os.unlink(sock)
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(str(sock))
    os.kill(janitor, signal.SIGCONT)
    _wait_gone(janitor)
    assert sock.exists(), "the old relay's janitor removed a file bound since"


def test_run_removes_its_control_socket(root_dir: Path, tmp_path: Path,
                                        procs: list[subprocess.Popen[str]]) -> None:
    ctl, log = root_dir / "ctl.sock", tmp_path / "run.log"
    proc = _relaynat(procs, log, "run", "--confine", "--control-socket", str(ctl), "--",
                     "sleep", "3")
    _wait_confined(proc, ctl)
    assert proc.wait(timeout=60) == 0, log.read_text()  # the command's status
    assert not ctl.exists()
    _clean_log(log)


def test_a_relay_without_socket_files_starts_no_janitor(
        tmp_path: Path, procs: list[subprocess.Popen[str]]) -> None:
    proc = _relaynat(procs, tmp_path / "run.log", "run", "--confine", "--", "sleep", "3")
    _wait_confined(proc)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    commands = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in children]
    assert children and not [c for c in commands if b"confinement.janitor" in c], commands
    assert proc.wait(timeout=60) == 0


def test_run_killed_has_its_control_socket_removed(
        root_dir: Path, tmp_path: Path, procs: list[subprocess.Popen[str]]) -> None:
    ctl, log = root_dir / "ctl.sock", tmp_path / "run.log"
    proc = _relaynat(procs, log, "run", "--confine", "--control-socket", str(ctl), "--",
                     "sleep", "60")
    _wait_confined(proc, ctl)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    proc.kill()
    proc.wait(timeout=30)
    try:
        wait_until(lambda: not ctl.exists(), KILLED_WAIT_S,
                   "the killed run's control socket removed")
    finally:
        # Whatever outlived the relay (the namespace ends with it: test_confinement's
        # concern, not this test's) is ended, the namespace and the command with it.
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(child), signal.SIGKILL)


@pytest.mark.parametrize(("old_confined", "ending"),
                         [("--no-confine", "sigterm"), ("--no-confine", "sigkill"),
                          ("--confine", "sigterm")])
def test_receive_handover_removes_what_it_took(root_dir: Path, tmp_path: Path,
                                               procs: list[subprocess.Popen[str]],
                                               old_confined: str, ending: str) -> None:
    """A relay hands its stream socket and control socket over to a confined `serve
    --receive-handover`, whose janitor removes them at its exit (they were bound by
    the other process: the janitor checks the sockets sent with the paths are bound to
    those files). A confined old relay's janitor leaves them to the new relay."""
    sock, ctl, to = root_dir / "vm.sock", root_dir / "ctl.sock", root_dir / "to.sock"
    new = _relaynat(procs, tmp_path / "new.log", "serve", "--confine",
                    "--receive-handover", str(to))
    _wait_confined(new, to)
    old = _relaynat(procs, tmp_path / "old.log", "serve", old_confined, "--socket",
                    str(sock), "--control-socket", str(ctl))
    wait_until(lambda: sock.exists() and ctl.exists(), 30, "the old relay's sockets", old)
    done = subprocess.run([sys.executable, "-m", "relaynat", "ctl", "-s", str(ctl),
                           "handover", "--to", str(to)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert old.wait(timeout=30) == 0, (tmp_path / "old.log").read_text()
    # The old relay left them to the new one, which took them; its own receiving
    # socket is closed and removed now.
    assert sock.exists() and ctl.exists()
    _clean_log(tmp_path / "old.log")
    wait_until(lambda: not to.exists(), KILLED_WAIT_S, "the receiving socket removed")
    with socket.socket(socket.AF_UNIX) as guest:
        guest.connect(str(sock))
    if ending == "sigterm":
        new.send_signal(signal.SIGTERM)
        assert new.wait(timeout=30) == 0, (tmp_path / "new.log").read_text()
        assert not sock.exists() and not ctl.exists(), os.listdir(root_dir)
        _clean_log(tmp_path / "new.log")
    else:
        new.kill()
        new.wait(timeout=30)
        wait_until(lambda: not sock.exists() and not ctl.exists(), KILLED_WAIT_S,
                   "the killed relay's taken socket files removed")


_REGISTERS = """
import socket, sys
from relaynat.confinement.janitor import Janitor

victim, regular, mine = sys.argv[1:]
janitor = Janitor.start([])
sock = socket.socket(socket.AF_UNIX)
sock.bind(mine)
sock.listen()
# What a relay taken over by its guest could ask: files that are not its socket's.
janitor.register(victim, sock)
janitor.register(regular, sock)
janitor.register(mine, sock)
sock.close()
janitor.finish()
"""


def test_the_janitor_removes_only_the_files_of_the_sockets_sent(root_dir: Path) -> None:
    """The janitor is root and the relay is not trusted: a path registered after
    confinement is removed only if the socket sent with it is bound to that file."""
    victim, regular, mine = root_dir / "other.sock", root_dir / "file", root_dir / "mine.sock"
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(str(victim))  # another program's socket file, no longer served
    regular.write_text("data")
    done = subprocess.run([sys.executable, "-c", _REGISTERS, str(victim), str(regular),
                           str(mine)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert not mine.exists()
    assert victim.exists() and regular.exists(), done.stderr
    assert done.stderr.count("is not the file of the socket sent with it") == 2, done.stderr



_FORKS_AND_EXITS = """
import os, socket, sys, time
from relaynat.confinement.janitor import Janitor

path = sys.argv[1]
sock = socket.socket(socket.AF_UNIX)
sock.bind(path)
janitor = Janitor.start([path])
child = os.fork()
if child == 0:  # holds a copy of the relay's end of the pair, and lives on
    sock.close()
    time.sleep(60)
    os._exit(0)
print(janitor.pid, child, flush=True)
os._exit(0)  # gone without a word, the pair's end still open in the child
"""


def test_the_janitor_cleans_up_when_the_relay_is_gone_though_a_child_holds_its_end(
        root_dir: Path) -> None:
    """The relay's exit is seen on its pidfd too: a process the relay forked would
    otherwise keep the end of file from coming, for as long as it runs."""
    path = root_dir / "vm.sock"
    proc = subprocess.Popen([sys.executable, "-c", _FORKS_AND_EXITS, str(path)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    janitor, child = map(int, proc.stdout.readline().split())
    try:
        proc.wait(timeout=30)
        wait_until(lambda: not path.exists(), KILLED_WAIT_S,
                   "the socket file removed once the relay is gone")
        _wait_gone(janitor)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(janitor, signal.SIGKILL)


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory of nobody's, 0700, that nobody can reach (/tmp, not the test's own
    tmp_path, which is under root's 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="relaynat-nobody-", dir="/tmp"))
    os.chown(path, NOBODY, NOBODY)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("confined", [True, False], ids=["confined", "not-confined"])
def test_an_unprivileged_relay_s_socket_files_go_when_it_is_killed(
        nobody_dir: Path, tmp_path: Path, procs: list[subprocess.Popen[str]],
        confined: bool) -> None:
    """`serve` started as nobody (a rootless container tool's relay): its janitor holds
    no capability, and needs none to remove files in nobody's own directory. Killed,
    the confined relay's files go; the unconfined one has no janitor and its files stay
    (a SIGKILLed process removes nothing), which shows the check sees them."""
    env = {**os.environ, **nobody_env()}
    sock, ctl, log = nobody_dir / "vm.sock", nobody_dir / "ctl.sock", tmp_path / "relay.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "env",
             f"PYTHONPATH={env['RELAYNAT_PATH']}", env["GUEST_PYTHON"], "-m", "relaynat",
             "serve", "--confine" if confined else "--no-confine", "--socket", str(sock),
             "--control-socket", str(ctl)], stdout=out, stderr=out, text=True, cwd="/")
    procs.append(proc)
    if confined:
        _wait_confined(proc, sock, ctl)
        janitor = _janitor_of(proc.pid)
        assert Path(f"/proc/{janitor}").stat().st_uid == NOBODY
    else:
        wait_until(lambda: sock.exists() and ctl.exists(), 30, "the relay's sockets", proc)
    proc.kill()
    assert proc.wait(timeout=30) == -signal.SIGKILL
    if confined:
        wait_until(lambda: not sock.exists() and not ctl.exists(), KILLED_WAIT_S,
                   "the killed relay's socket files removed")
        _wait_gone(janitor)
    else:
        time.sleep(KILLED_WAIT_S / 5)
        assert sock.exists() and ctl.exists()
    assert "Traceback" not in log.read_text(), log.read_text()
