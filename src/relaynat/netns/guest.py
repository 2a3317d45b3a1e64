"""Namespace mode (`relaynat run -- CMD`): a command in a new network namespace whose
only link is the relay's TAP, pasta-style.

The relay process stays in its own (host) network namespace, where its host sockets
must live. A child process (`python -m relaynat.netns.child`, which says how)
makes the command's namespaces: a user namespace whose root is an unprivileged id
outside (`nobody`, or `runas`, when the relay is root; the caller otherwise), and the
network, mount, PID, IPC and UTS namespaces it owns. The command is root in there and
nothing more than that id on the host: it reaches neither the relay's process (its PID
namespace shows no host process) nor its network namespace, nor files that id may not
open. The child creates the TAP, configures address, route and MTU, and passes the TAP
fd back over a unix socket with SCM_RIGHTS: a TAP fd keeps working from any namespace
once opened. The child then waits for the relay to be attached before it starts the
command, so the command's first packet is never lost. In the command's mount namespace
/etc/resolv.conf names the relay's DNS address, so the command resolves names through
the relay, and /dev/null covers the control socket.

What the command gets is as subprocess gives it: stdin, stdout and stderr, env and cwd;
and it may run as a user other than root in its namespace (`user`, `group`) or with
fewer capabilities (`capabilities`). Bad values are refused with `ConfigError` before
anything starts; a failed setup step raises `NamespaceSetupError`.

Signals are the embedding program's: nothing here installs a handler unless
`run_command(..., forward_signals=True)` asks it to (the `relaynat run` command does).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import grp
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import IO, Any

from relaynat.config import ConfigError, RelayConfig
from relaynat.netns.child import END_SIGNAL
from relaynat.netns.child import NamespaceSetupError as NamespaceSetupError
from relaynat.netns.join import JoinTarget
from relaynat.netns.syscalls import CAPABILITIES, map_root, may_start_processes
from relaynat.policy import Policy
from relaynat.relay import Relay
from relaynat.transports.tap import TapTransport

_READY_TIMEOUT_S = 30.0
#: `nobody`'s ids where the user database has no `nobody` (passt falls back the same).
_NOBODY = (65534, 65534)
#: The highest uid or gid: (uid_t) -1 means "no change" to the kernel.
_MAX_ID = 2**32 - 2
#: What `forward_signals` passes on to the command: a service manager's stop (SIGTERM)
#: and a terminal's hangup (SIGHUP).
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGHUP)

#: A standard stream of the command, as subprocess takes it: None (this process's own),
#: `subprocess.PIPE`, `subprocess.DEVNULL`, a file descriptor, or a file that has one
#: (and `subprocess.STDOUT` for stderr).
Stdio = int | IO[Any] | None


def command_ids(runas: tuple[int, int] | None = None) -> tuple[int, int]:
    """The uid and gid outside that root of the command's user namespace maps to.

    When this process is root: `runas`, or else `nobody` (the user passt runs as) --
    never root, whose files it could then open and whose processes would pass ptrace's
    same-uid check. Otherwise this process's own ids: user_namespaces(7) lets an
    unprivileged process map no other."""
    if os.geteuid() != 0:
        own = (os.getuid(), os.getgid())
        if runas is not None and runas != own:
            raise ConfigError("runas: mapping the command's root to another user needs root")
        return own
    if runas is None:
        try:
            entry = pwd.getpwnam("nobody")
        except KeyError:
            return _NOBODY
        return entry.pw_uid, entry.pw_gid
    if 0 in runas:
        raise ConfigError("runas: the command's root may not be root outside its namespace")
    return runas


def python_for_command(runas: tuple[int, int] | None = None) -> str:
    """A Python 3.11+ interpreter that the command of `run_command` may execute: this
    one, unless it lives where the command's id outside may not go (a venv or an
    interpreter under /root, mode 0700), else the system's. Each candidate is tried by
    running it as that id, since access(2) answers for this process's ids, not its.
    NamespaceSetupError (a RuntimeError) if none runs."""
    uid, gid = command_ids(runas)
    candidates = [sys.executable, os.path.realpath(sys.executable),
                  shutil.which("python3", path="/usr/local/bin:/usr/bin")]
    for candidate in dict.fromkeys(c for c in candidates if c):
        try:
            tried = subprocess.run(
                [candidate, "-c", "import sys; sys.exit(sys.version_info < (3, 11))"],
                user=uid, group=gid, extra_groups=[], cwd="/", capture_output=True,
                timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if tried.returncode == 0:
            return candidate
    raise NamespaceSetupError(f"no Python 3.11 that uid {uid} may run (the command's id "
                              "outside its user namespace)")


def _map_command_root(pid: int, uid: int, gid: int) -> None:
    """Write the map of the user namespace the child `pid` has just made (only a
    process with CAP_SETUID and CAP_SETGID in the parent user namespace may map root
    inside to an id other than its own)."""
    try:
        map_root(pid, uid, gid)
    except OSError as exc:
        raise NamespaceSetupError(f"cannot map the command's user namespace: {exc}") from None


def _check_stdio(name: str, value: object) -> None:
    """Refuse what subprocess would not take as the stream `name`, saying why."""
    special = {subprocess.PIPE, subprocess.DEVNULL} | (
        {subprocess.STDOUT} if name == "stderr" else set())
    if value is None or (type(value) is int and value in special):
        return
    fd: object = value
    fileno = getattr(value, "fileno", None)
    if callable(fileno):
        try:
            fd = fileno()
        except (OSError, ValueError) as exc:  # io.UnsupportedOperation is both
            raise ConfigError(f"{name}: {value!r} has no file descriptor ({exc})") from None
    if type(fd) is int and fd >= 0:
        try:
            os.fstat(fd)
        except OSError as exc:
            raise ConfigError(f"{name}: file descriptor {fd}: {exc.strerror}") from None
        return
    raise ConfigError(f"{name}: {value!r} is none of None, subprocess.PIPE, subprocess.DEVNULL, "
                      "a file descriptor or a file that has one")


def _checked_env(env: Mapping[str, str] | None) -> dict[str, str] | None:
    """`env` checked as execve(2) would take it, or None to inherit."""
    if env is None:
        return None
    if not isinstance(env, Mapping):
        raise ConfigError(f"env: give a mapping of names to values, not {type(env).__name__}")
    entries = {}
    for name, value in env.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise ConfigError(f"env: {name!r}: names and values must be str")
        if not name or "=" in name or "\0" in name:
            raise ConfigError(f"env: {name!r} is not a variable name (empty, or has = or NUL)")
        if "\0" in value:
            raise ConfigError(f"env: the value of {name} has a NUL character")
        entries[name] = value
    return entries


def _env_file(env: dict[str, str]) -> int:
    """A memfd holding `env` as JSON, for the namespace child to read: not its command
    line, which any host user may read in /proc/PID/cmdline (a token in the
    environment would show in `ps`); a descriptor is its owner's alone."""
    fd = os.memfd_create("relaynat-env", os.MFD_CLOEXEC)
    try:
        data = json.dumps(env).encode()
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _one_id(kind: str, value: object) -> tuple[int, int | None]:
    """The uid (`kind` "user") or gid ("group") that `value`, a name or a number,
    stands for, and for a user its primary group if the user database has it."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f"{kind}: give a name or a number, not {value!r}")
    if isinstance(value, int):
        if not 0 <= value <= _MAX_ID:
            raise ConfigError(f"{kind}: {value} is not a {kind} id (0 to {_MAX_ID})")
        if kind == "group":
            return value, None
        try:
            return value, pwd.getpwuid(value).pw_gid
        except KeyError:
            return value, None
    try:
        if kind == "user":
            entry = pwd.getpwnam(value)
            return entry.pw_uid, entry.pw_gid
        return grp.getgrnam(value).gr_gid, None
    except KeyError:
        database = "user" if kind == "user" else "group"
        raise ConfigError(f"{kind}: no {kind} named {value!r} in the {database} database "
                          "(this process's, which the command's namespace shares)") from None


def _command_user(user: int | str | None, group: int | str | None) -> tuple[int, int] | None:
    """The uid and gid inside its namespace the command runs as, or None for root (its
    namespace's root, the default)."""
    if user is None:
        if group is not None:
            raise ConfigError("group: give user too: a command that stays root keeps group "
                              "root, the one group its namespace maps")
        return None
    uid, primary = _one_id("user", user)
    gid = primary if group is None else _one_id("group", group)[0]
    if uid == 0:
        if gid not in (0, None):
            raise ConfigError("group: a command that stays root keeps group root, the one "
                              "group its namespace maps")
        return None
    if gid is None:
        raise ConfigError(f"user {user}: the user database has no entry to take the group "
                          "from: give group too")
    return uid, gid


def _capability_numbers(capabilities: Iterable[str] | None,
                        user: tuple[int, int] | None) -> list[int] | None:
    """The capability numbers the command may keep, or None to leave them as they are."""
    if capabilities is None:
        return None
    if isinstance(capabilities, str | bytes):
        raise ConfigError("capabilities: give a collection of names, e.g. ['CAP_NET_RAW'], "
                          "or [] for none, not one string")
    numbers = set()
    try:
        names = list(capabilities)
    except TypeError:
        raise ConfigError(f"capabilities: {capabilities!r} is not a collection of names") \
            from None
    for name in names:
        if not isinstance(name, str):
            raise ConfigError(f"capabilities: {name!r} is not a capability name")
        key = name.upper() if name.upper().startswith("CAP_") else f"CAP_{name.upper()}"
        if key not in CAPABILITIES:
            raise ConfigError(f"capabilities: unknown capability {name!r} (names as in "
                              "capabilities(7): CAP_NET_RAW, or net_raw)")
        numbers.add(CAPABILITIES[key])
    if numbers and user is not None:
        raise ConfigError("capabilities: a command run as a user other than root holds no "
                          "capability over its namespace (it has a user namespace of its own): "
                          "give [] or None, or leave user unset to keep some")
    return sorted(numbers)


def _child_spec(config: RelayConfig, tap_name: str, offload: bool, join: JoinTarget | None,
                configure: bool, hide_paths: Sequence[str]) -> dict[str, Any]:
    """What the namespace child (child.py) is to set up, but for the command's own
    settings (cwd, user, caps, env), which the caller adds."""
    dns = ([str(config.dns_ipv4)] if config.ipv4 else []) + \
        ([str(config.dns_ipv6)] if config.ipv6 else [])
    return {
        "tap": tap_name,
        "address": f"{config.guest_ipv4}/{config.prefix_len_v4}" if config.ipv4 else None,
        "gateway": str(config.gateway_ipv4),
        "address6": f"{config.guest_ipv6}/64" if config.ipv6 else None,
        "gateway6": str(config.gateway_ipv6),
        "mtu": config.mtu,
        "vnet": offload,
        "dns": dns,
        "hide": list(hide_paths),
        "join": None if join is None else {"netns": join.netns_fd, "userns": join.userns_fd},
        "configure": configure,
        "cwd": None, "user": None, "caps": None, "env": None,
    }


async def _start_child(spec: dict[str, Any], command: list[str], pass_fds: list[int],
                       ids: tuple[int, int] | None, stdin: Stdio = None, stdout: Stdio = None,
                       stderr: Stdio = None,
                       ) -> tuple[asyncio.subprocess.Process, socket.socket, TapTransport]:
    """Start the namespace child with `spec` and `command` (none: it exits once the TAP
    is handed over), map its user namespace to `ids` when it asks, and take the TAP it
    passes back over SCM_RIGHTS. The descriptors of `pass_fds` are the child's too
    (closed here once it has them, but for those of the JoinTarget, its owner's)."""
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    owned = [fd for fd in pass_fds if fd == spec["env"]]
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relaynat.netns.child", json.dumps(spec),
            str(child_sock.fileno()), "--", *command,
            pass_fds=[child_sock.fileno(), *pass_fds],
            stdin=stdin, stdout=stdout, stderr=stderr)
    except BaseException:
        parent_sock.close()
        raise
    finally:
        child_sock.close()
        for fd in owned:
            os.close(fd)
    try:
        parent_sock.settimeout(_READY_TIMEOUT_S)
        try:
            msg, ancdata, _, _ = await asyncio.to_thread(
                parent_sock.recvmsg, 4096, socket.CMSG_SPACE(4))
            if msg == b"map" and not ancdata:
                assert ids is not None  # asked only by a child that makes a user namespace
                _map_command_root(proc.pid, *ids)
                parent_sock.send(b"mapped")
                msg, ancdata, _, _ = await asyncio.to_thread(
                    parent_sock.recvmsg, 4096, socket.CMSG_SPACE(4))
        except TimeoutError:
            raise NamespaceSetupError("namespace child did not report in time") from None
        fds = array.array("i")
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        if not fds:
            await proc.wait()
            raise NamespaceSetupError(msg.decode(errors="replace")
                                      or "namespace setup failed")
        info = json.loads(msg)
    except BaseException:
        parent_sock.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    return proc, parent_sock, TapTransport(fds[0], info["vnet_hdr_len"], info["offload"])


async def open_joined_tap(config: RelayConfig, join: JoinTarget, *, tap_name: str = "tap0",
                          offload: bool = True, configure: bool = True) -> TapTransport:
    """The TAP `tap_name` made (or opened) in the network namespace of `join` and, unless
    not `configure`, addressed from `config` with its routes, for a relay to serve
    with no command of its own (`relaynat run --netns TARGET` alone). A TAP made here
    goes away with the transport's descriptor; one that was there stays. Raises
    NamespaceSetupError saying what failed."""
    spec = _child_spec(config, tap_name, offload, join, configure, ())
    proc, sock, transport = await _start_child(spec, [], join.fds(), None)
    sock.close()
    await proc.wait()
    return transport


class NamespaceGuest:
    """A command in a new network namespace whose only link is a TAP, not started yet.

    `spawn` creates it and hands back its link as `transport`; attach that to a
    `Relay`, then call `go()` so the command starts (its first packet then finds the
    relay listening), and `wait()` for its exit status. Many may run in one loop, each
    attached to its own relay (`relaynat.guests.Guests`).

    `proc` is the namespace's outer process (the command's is inside its PID namespace,
    out of this process's sight): its `stdin`, `stdout` and `stderr` (also here as
    properties) are the command's where `spawn` was given `subprocess.PIPE`. In a
    joined namespace (`spawn(..., join=...)`) there is no PID namespace: `proc` becomes
    the command itself once it starts, and `close` ends it alone, not what it left
    running in the background.
    """

    def __init__(self, proc: asyncio.subprocess.Process, sock: socket.socket,
                 transport: TapTransport) -> None:
        self.proc = proc
        self.transport = transport
        self._sock = sock
        #: Resolved by `release`: the command is another relay's now (moving/handover.py).
        self._released: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def stdin(self) -> asyncio.StreamWriter | None:
        """The command's stdin, if `spawn` was given `stdin=subprocess.PIPE`."""
        return self.proc.stdin

    @property
    def stdout(self) -> asyncio.StreamReader | None:
        """The command's stdout, if `spawn` was given `stdout=subprocess.PIPE`."""
        return self.proc.stdout

    @property
    def stderr(self) -> asyncio.StreamReader | None:
        """The command's stderr, if `spawn` was given `stderr=subprocess.PIPE` (with
        relaynat's own messages about it: a failure to execute it, for one)."""
        return self.proc.stderr

    @property
    def released(self) -> bool:
        """`release` was called: the command is no longer this process's to end."""
        return self._released.done()

    def release(self) -> None:
        """Let the command go on without this process's relay (it handed the guest to
        another process): `wait` returns 0 at once, `close` no longer kills it; the
        command is still this process's child, `exit_status` says how it ends."""
        if not self._released.done():
            self._released.set_result(None)

    def send_signal(self, signum: int) -> None:
        """Pass signal `signum` on to the command (through the namespace's outer
        process and init, which forward SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and
        SIGUSR2; any other signal ends the whole namespace as it would that process).
        Nothing once the command has exited; a `release`d one still gets it (another
        relay serves it, but this process is still where a service manager or a
        terminal sends its signals)."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # exited: wait() says how
                self.proc.send_signal(signum)

    @classmethod
    async def spawn(cls, config: RelayConfig, command: Sequence[str], *, tap_name: str = "tap0",
                    offload: bool = True, hide_paths: Sequence[str] = (),
                    runas: tuple[int, int] | None = None, stdin: Stdio = None,
                    stdout: Stdio = None, stderr: Stdio = None,
                    env: Mapping[str, str] | None = None,
                    cwd: str | os.PathLike[str] | None = None, user: int | str | None = None,
                    group: int | str | None = None,
                    capabilities: Iterable[str] | None = None,
                    join: JoinTarget | None = None,
                    configure: bool = True) -> NamespaceGuest:
        """Create the namespaces, the TAP (addressed from `config`) and a private
        resolv.conf, ready to run `command` (a program and its arguments, found on the
        PATH of its environment); `hide_paths` (the control socket) are covered by
        /dev/null in the guest's mount namespace.

        Who the command is: root of its own user namespace, which is `command_ids(runas)`
        outside (`runas`, a (uid, gid) of the host, only when this process is root;
        `nobody` by default). It holds every capability over its namespace's network,
        as root there, unless:

        - `user` (a name or uid of the user database, which the namespace shares with
          this process) other than root: it runs as that user and `group` (a name or
          gid; by default the user's own group from the database) instead, with no
          supplementary group (when this process is root; an unprivileged caller's
          own groups cannot be dropped, user_namespaces(7)) and no capability over
          its namespace. Its files on the host are still those of `command_ids(runas)`.
        - `capabilities`: the only ones it may hold, by capabilities(7) name
          (`["CAP_NET_RAW"]`, or `"net_raw"`); `[]` for none at all. The others
          leave its bounding set too and no_new_privs is set, so nothing it executes
          (set-user-ID programs included) gets them back. Only `[]` or None with `user`.
          None (the default) leaves them as they are.

        What it gets, as `subprocess.Popen` takes them: `stdin`, `stdout`, `stderr`
        (None: this process's; `subprocess.PIPE`: the streams are `self.stdin`...,
        read them while it runs or it blocks once a pipe is full; `subprocess.DEVNULL`,
        a descriptor or a file); `env`, its whole environment (None: this process's);
        `cwd`, where it starts (None: this process's working directory; a relative
        path is from there).

        `join` (join.resolve_target's): no new namespaces but for a mount namespace,
        as `ip netns exec` makes: the TAP is made (or opened, if one of that name is
        there) in that network namespace, configured unless `configure` is false, and
        the command runs there with this process's own ids (no `runas`), after
        entering the user namespace that owns it when this process is not root.

        The guest ends with this process however it ends (the namespace's outer
        process has END_SIGNAL as its parent-death signal): more exactly with the
        thread that calls this, the one the kernel counts as the parent (prctl(2),
        PR_SET_PDEATHSIG), so spawn from a thread that outlives the guest, as the
        event loop's own thread does.

        Raises ConfigError (a ValueError) for a bad value before anything starts, and
        NamespaceSetupError saying what failed (a `cwd` the command may not enter,
        say)."""
        if not may_start_processes():
            raise NamespaceSetupError("this process is confined (relaynat.confine): its "
                                      "seccomp filter would end it at the namespace's "
                                      "first process; spawn namespace guests before "
                                      "confine()")
        if isinstance(command, str) or not command:
            raise ConfigError("command: give the program and its arguments as a list, "
                              f"not {command!r}")
        if any(not isinstance(arg, str) or "\0" in arg for arg in command):
            raise ConfigError(f"command: {list(command)!r}: each argument is a str without NUL")
        for name, stream in (("stdin", stdin), ("stdout", stdout), ("stderr", stderr)):
            _check_stdio(name, stream)
        checked_env = _checked_env(env)
        as_user = _command_user(user, group)
        caps = _capability_numbers(capabilities, as_user)
        where = None if cwd is None else os.path.abspath(os.fspath(cwd))
        if where is not None and "\0" in where:
            raise ConfigError(f"cwd: {where!r} has a NUL character")
        if join is not None and runas is not None:
            raise ConfigError("runas: a command in a joined namespace runs with this "
                              "process's own ids, as ip netns exec runs it")
        ids = None if join is not None else command_ids(runas)
        env_fd = None if checked_env is None else _env_file(checked_env)
        spec = _child_spec(config, tap_name, offload, join, configure, hide_paths)
        spec.update(cwd=where, user=as_user, caps=caps, env=env_fd)
        proc, parent_sock, transport = await _start_child(
            spec, list(command), ([] if env_fd is None else [env_fd]) + (
                [] if join is None else join.fds()), ids, stdin, stdout, stderr)
        return cls(proc, parent_sock, transport)


    def go(self) -> None:
        """Let the command start: call once its relay has the transport attached. If
        the namespace is already gone (a signal ended it), `wait` says how."""
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._sock.send(b"go")

    async def wait(self) -> int:
        """The command's exit status as a shell reports it (128 + N for signal N); 0
        once `release`d (its status is no longer ours to learn)."""
        exited = asyncio.ensure_future(self.proc.wait())
        either: set[asyncio.Future[Any]] = {exited, self._released}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not exited.done():
                exited.cancel()
            self.close()
        if not exited.done() or exited.cancelled():
            return 0
        returncode = exited.result()
        return 128 - returncode if returncode < 0 else returncode

    async def exit_status(self) -> int:
        """The command's exit status as a shell reports it (128 + N for signal N), once
        it exits, `release`d or not: whichever relay serves its network, the namespace's
        outer process is this process's child, and only this process can learn it."""
        returncode = await self.proc.wait()
        return 128 - returncode if returncode < 0 else returncode

    def close(self) -> None:
        """Kill the command and every other process of its namespace if it still runs
        (unless released): daemons that forked twice or left its session, and jobs in
        the background, are in its PID namespace all the same. The namespace's outer
        process, `proc`, kills the namespace's init, the kernel then kills the rest
        (pid_namespaces(7)), and `proc` exits only once they are all gone: await
        `proc.wait()` to know nothing of the guest is left. The TAP goes with its
        relay's transport."""
        self._sock.close()
        if self.proc.returncode is None and not self.released:
            with contextlib.suppress(ProcessLookupError):  # exited: wait() says how
                self.proc.send_signal(END_SIGNAL)
                # A stopped process (SIGSTOP, a terminal's ^Z) acts on no signal until
                # it is continued: continue the outer process (alone, not the command).
                self.proc.send_signal(signal.SIGCONT)


class _SignalForwarding:
    """FORWARDED_SIGNALS passed on to one guest while `run_command` runs it, through
    handlers of the running loop; a signal that comes before the guest exists is
    passed on once it does. Refused where this process already handles one of them:
    asyncio has no public way to give a replaced loop handler back."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._saved: dict[int, Any] = {}
        self._installed: list[int] = []
        self._guest: NamespaceGuest | None = None
        self._pending: list[int] = []
        for signum in FORWARDED_SIGNALS:
            current = signal.getsignal(signum)
            if current not in (signal.SIG_DFL, signal.SIG_IGN):
                raise NamespaceSetupError(
                    f"forward_signals: {signal.Signals(signum).name} already has a handler in "
                    "this process (its event loop's or signal.signal's, perhaps another "
                    "run_command's), which forwarding would replace: pass the signal on from "
                    "that handler instead (guest_ready gives the guest: guest.send_signal)")
            self._saved[signum] = current
        try:
            for signum in FORWARDED_SIGNALS:
                self._loop.add_signal_handler(signum, self._forward, signum)
                self._installed.append(signum)
        except BaseException:
            self.restore()
            raise

    def _forward(self, signum: int) -> None:
        if self._guest is None:
            self._pending.append(signum)
        else:
            self._guest.send_signal(signum)

    def attach(self, guest: NamespaceGuest) -> None:
        self._guest = guest
        for signum in self._pending:
            guest.send_signal(signum)
        self._pending.clear()

    def restore(self) -> None:
        """Each signal's disposition back as it was: the default action, or ignored."""
        for signum in self._installed:
            self._loop.remove_signal_handler(signum)  # leaves SIG_DFL
            if self._saved[signum] == signal.SIG_IGN:
                signal.signal(signum, signal.SIG_IGN)
        self._installed.clear()


async def run_command(config: RelayConfig, command: Sequence[str], *, tap_name: str = "tap0",
                      offload: bool = True,
                      relay_ready: Callable[[Relay], object] | None = None,
                      policy: Policy | None = None, hide_paths: Sequence[str] = (),
                      guest_ready: Callable[[NamespaceGuest], object] | None = None,
                      runas: tuple[int, int] | None = None, forward_signals: bool = False,
                      stdin: Stdio = None, stdout: Stdio = None, stderr: Stdio = None,
                      env: Mapping[str, str] | None = None,
                      cwd: str | os.PathLike[str] | None = None, user: int | str | None = None,
                      group: int | str | None = None,
                      capabilities: Iterable[str] | None = None,
                      join: JoinTarget | None = None, configure: bool = True) -> int:
    """Run `command` as a namespace guest of a new relay; return its exit status
    (128 + N if a signal N ended it), as a shell would report it. `relay_ready` is
    called with the relay once the guest's link is attached (e.g. to add forwards);
    `policy` is the egress policy for the guest's flows; `hide_paths` (the control
    socket) are covered by /dev/null in the guest's mount namespace. `guest_ready` is
    called with the guest as soon as it exists: releasing it (after a handover) closes
    this relay at once, and the run goes on until the command, served by the new
    relay, exits, with its status.

    Signals are left to the caller: with `forward_signals`, SIGTERM and SIGHUP
    (`FORWARDED_SIGNALS`) that reach this process are passed on to the command while
    it runs, through handlers of the running loop, and their dispositions are restored
    after (the default action, or ignored, as they were). That is refused with
    NamespaceSetupError, before anything starts, if this process already handles one
    of them (a loop handler of its own, another run_command forwarding): forward
    from that handler instead (`guest_ready` gives the guest, `guest.send_signal`).

    `runas`, `stdin`, `stdout`, `stderr`, `env`, `cwd`, `user`, `group` and
    `capabilities`, `join` and `configure`: as `NamespaceGuest.spawn`. With
    `subprocess.PIPE`, read the stream from `guest_ready`'s guest while the command
    runs."""
    forwarding = _SignalForwarding() if forward_signals else None
    try:
        guest = await NamespaceGuest.spawn(
            config, command, tap_name=tap_name, offload=offload, hide_paths=hide_paths,
            runas=runas, stdin=stdin, stdout=stdout, stderr=stderr, env=env, cwd=cwd,
            user=user, group=group, capabilities=capabilities, join=join,
            configure=configure)
        try:
            if forwarding is not None:
                forwarding.attach(guest)
            if guest_ready is not None:
                guest_ready(guest)
            async with Relay(config, policy) as relay:
                relay.attach(guest.transport)
                if relay_ready is not None:
                    relay_ready(relay)
                guest.go()
                code = await guest.wait()
            if guest.released:
                # Handed over (moving/handover.py): another process serves the command's
                # network now, and this one, its parent, waits to learn how it ends.
                code = await guest.exit_status()
            return code
        finally:
            guest.close()
            if guest.proc.returncode is None and not guest.released:
                await guest.proc.wait()
    finally:
        if forwarding is not None:
            forwarding.restore()
