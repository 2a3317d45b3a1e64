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
"""

from __future__ import annotations

import array
import asyncio
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

from relaynat.config import RelayConfig
from relaynat.netns.syscalls import map_root
from relaynat.policy import Policy
from relaynat.relay import Relay
from relaynat.transports.tap import TapTransport

_READY_TIMEOUT_S = 30.0
#: `nobody`'s ids where the user database has no `nobody` (passt falls back the same).
_NOBODY = (65534, 65534)


class NamespaceSetupError(RuntimeError):
    """The namespace child could not set the guest up; the message says why."""


def command_ids(runas: tuple[int, int] | None = None) -> tuple[int, int]:
    """The uid and gid outside that root of the command's user namespace maps to.

    When this process is root: `runas`, or else `nobody` (the user passt runs as) --
    never root, whose files it could then open and whose processes would pass ptrace's
    same-uid check. Otherwise this process's own ids: user_namespaces(7) lets an
    unprivileged process map no other."""
    if os.geteuid() != 0:
        own = (os.getuid(), os.getgid())
        if runas is not None and runas != own:
            raise ValueError("running the command as another user needs root")
        return own
    if runas is None:
        try:
            entry = pwd.getpwnam("nobody")
        except KeyError:
            return _NOBODY
        return entry.pw_uid, entry.pw_gid
    if 0 in runas:
        raise ValueError("the command's root may not be root outside its namespace")
    return runas


def python_for_command(runas: tuple[int, int] | None = None) -> str:
    """A Python 3.11+ interpreter that the command of `run_command` may execute: this
    one, unless it lives where the command's id outside may not go (a venv or an
    interpreter under /root, mode 0700), else the system's. Each candidate is tried by
    running it as that id, since access(2) answers for this process's ids, not its.
    RuntimeError if none runs."""
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
    raise RuntimeError(f"no Python 3.11 that uid {uid} may run (the command's id outside "
                       "its user namespace)")


def _map_command_root(pid: int, uid: int, gid: int) -> None:
    """Write the map of the user namespace the child `pid` has just made (only a
    process with CAP_SETUID and CAP_SETGID in the parent user namespace may map root
    inside to an id other than its own)."""
    try:
        map_root(pid, uid, gid)
    except OSError as exc:
        raise NamespaceSetupError(f"cannot map the command's user namespace: {exc}") from None


class NamespaceGuest:
    """A command in a new network namespace whose only link is a TAP, not started yet.

    `spawn` creates it and hands back its link as `transport`; attach that to a
    `Relay`, then call `go()` so the command starts (its first packet then finds the
    relay listening), and `wait()` for its exit status. Many may run in one loop, each
    attached to its own relay (`relaynat.guests.Guests`).
    """

    def __init__(self, proc: asyncio.subprocess.Process, sock: socket.socket,
                 transport: TapTransport) -> None:
        self.proc = proc
        self.transport = transport
        self._sock = sock
        #: Resolved by `release`: the command is another relay's now (moving/handover.py).
        self._released: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def released(self) -> bool:
        """`release` was called: the command is no longer this process's to end."""
        return self._released.done()

    def release(self) -> None:
        """Let the command go on without this process (its relay handed the guest to
        another process): `wait` returns 0 at once, `close` no longer kills it."""
        if not self._released.done():
            self._released.set_result(None)

    @classmethod
    async def spawn(cls, config: RelayConfig, command: Sequence[str], *, tap_name: str = "tap0",
                    offload: bool = True, hide_paths: Sequence[str] = (),
                    runas: tuple[int, int] | None = None) -> NamespaceGuest:
        """Create the namespaces, the TAP (addressed from `config`) and a private
        resolv.conf; `hide_paths` (the control socket) are covered by /dev/null in the
        guest's mount namespace; the command's root is `command_ids(runas)` outside.
        Raises NamespaceSetupError saying what failed, ValueError for a bad `runas`."""
        if not command:
            raise ValueError("no command to run")
        uid, gid = command_ids(runas)
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        dns = ([str(config.dns_ipv4)] if config.ipv4 else []) + \
            ([str(config.dns_ipv6)] if config.ipv6 else [])
        spec = json.dumps({
            "tap": tap_name,
            "address": f"{config.guest_ipv4}/{config.prefix_len_v4}" if config.ipv4 else None,
            "gateway": str(config.gateway_ipv4),
            "address6": f"{config.guest_ipv6}/64" if config.ipv6 else None,
            "gateway6": str(config.gateway_ipv6),
            "mtu": config.mtu,
            "vnet": offload,
            "dns": dns,
            "hide": list(hide_paths),
        })
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "relaynat.netns.child", spec,
                str(child_sock.fileno()), "--", *command, pass_fds=[child_sock.fileno()])
        except BaseException:
            parent_sock.close()
            raise
        finally:
            child_sock.close()
        try:
            parent_sock.settimeout(_READY_TIMEOUT_S)
            try:
                msg, ancdata, _, _ = await asyncio.to_thread(
                    parent_sock.recvmsg, 4096, socket.CMSG_SPACE(4))
                if msg == b"map" and not ancdata:
                    _map_command_root(proc.pid, uid, gid)
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
        return cls(proc, parent_sock, TapTransport(fds[0], info["vnet_hdr_len"], info["offload"]))

    def go(self) -> None:
        """Let the command start: call once its relay has the transport attached."""
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

    def close(self) -> None:
        """Kill the command if it still runs (unless released): killing `proc`, the
        namespace child, ends the command's whole PID namespace. The TAP goes with its
        relay's transport."""
        self._sock.close()
        if self.proc.returncode is None and not self.released:
            self.proc.kill()


async def run_command(config: RelayConfig, command: list[str], *, tap_name: str = "tap0",
                      offload: bool = True,
                      relay_ready: Callable[[Relay], object] | None = None,
                      policy: Policy | None = None, hide_paths: Sequence[str] = (),
                      guest_ready: Callable[[NamespaceGuest], object] | None = None,
                      runas: tuple[int, int] | None = None) -> int:
    """Run `command` as a namespace guest of a new relay; return its exit status
    (128 + N if a signal N ended it), as a shell would report it. `relay_ready` is
    called with the relay once the guest's link is attached (e.g. to add forwards);
    `policy` is the egress policy for the guest's flows; `hide_paths` (the control
    socket) are covered by /dev/null in the guest's mount namespace. `guest_ready` is
    called with the guest as soon as it exists: releasing it (after a handover) ends
    the run at once with 0, the command left running. `runas`: as `command_ids`."""
    guest = await NamespaceGuest.spawn(config, command, tap_name=tap_name, offload=offload,
                                       hide_paths=hide_paths, runas=runas)
    if guest_ready is not None:
        guest_ready(guest)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, guest.proc.send_signal, signum)
    try:
        async with Relay(config, policy) as relay:
            relay.attach(guest.transport)
            if relay_ready is not None:
                relay_ready(relay)
            guest.go()
            return await guest.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        guest.close()
        if guest.proc.returncode is None and not guest.released:
            await guest.proc.wait()
