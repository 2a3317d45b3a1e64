"""The child side of namespace mode: set up the guest's namespaces, hand over the TAP,
start the command and see it to its end. Run as `python -m relaynat.netns.child
SPEC FD -- CMD...` by `guest.NamespaceGuest.spawn` (the command's environment, when it is
given one, comes in a descriptor SPEC names); kept apart from the relay so it starts
without importing it.

The namespaces are made in two steps, in this order:

1. A private mount namespace of the caller's user namespace (the host's when the relay
   runs as root; else a new one mapping the caller to root, the one map an
   unprivileged process may write). Here /dev/null covers the hidden paths (the control
   socket) and /etc/resolv.conf names the relay's DNS address.
2. One unshare of a user namespace with network, mount, IPC and UTS namespaces (and
   later a PID namespace): the kernel makes the user namespace first and it owns the
   others (user_namespaces(7)), so root in it has every capability over the command's
   own network (ip, ping, tcpdump work) and none over anything the host's user
   namespace owns: no setns(2) into the relay's network namespace, no ptrace access
   to the relay (/proc/PID/root). Root inside maps to an unprivileged id outside:
   `nobody` or --runas when the relay is root (the relay writes that map, as only a
   process with CAP_SETUID outside may), the caller otherwise (step 1's root, which
   we map ourselves). Host files are open to the command as to that id. Its mount
   namespace is copied from step 1's, which a more privileged user namespace owns,
   so step 1's mounts are locked (mount_namespaces(7)): root inside cannot unmount
   the /dev/null that covers the control socket.

This process then stays in the host's PID namespace, passing the relay's signals on,
while its child is PID 1 of the command's PID namespace with a fresh /proc: the command
sees no process of the host (pid_namespaces(7)). That init starts the command, passes
signals on (PID 1 gets only the signals it has a handler for), reaps orphans, and exits
with the command's status; the kernel then kills whatever the command left behind.
Asked by the relay to end the guest (END_SIGNAL), this process kills that init and
exits once the kernel has ended every process of the namespace. The relay's death,
however it comes (SIGKILL, its seccomp filter's SIGSYS), asks the same: END_SIGNAL is
this process's parent-death signal, so no guest runs on with a link nobody serves.

A command given a user other than root runs in a user namespace of its own, nested in
the guest's, whose only ids are that user and group, mapped to the guest's root (the
one map a process may write for itself). The guest's network, mount and PID namespaces
are owned by the guest's user namespace, in which the command then holds no
capability: it uses the network as any unprivileged process does and cannot change
it; on the host its files are those of the guest's root outside, as before. A second
level is needed because the guest's user namespace maps root alone (the relay may map
no other id of its own, user_namespaces(7)).
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
from typing import Any

from relaynat.errors import Error
from relaynat.netns.syscalls import (
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUSER,
    CLONE_NEWUTS,
    limit_capabilities,
    map_ids,
    map_root,
    set_dumpable,
    set_parent_death_signal,
    setns,
    unshare,
)
from relaynat.transports.tap import open_tap


class NamespaceSetupError(Error, RuntimeError):
    """A namespace guest could not be set up; the message says which step failed and why.

    Defined here, where the setup runs, so that this process need not import the relay;
    `relaynat.netns.guest` raises the same class with the child's message."""


# mount(2) flags (include/uapi/linux/mount.h).
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_NOEXEC = 8
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18

#: Signals passed on to the command. Those the kernel itself sent (si_code SI_KERNEL:
#: a terminal's ^C, ^\ or hangup) are not: they went to the whole foreground process
#: group, the command included, and passing them on would deliver them twice.
_FORWARDED = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
                        signal.SIGUSR1, signal.SIGUSR2})
_SI_KERNEL = 0x80

#: Sent by the relay (`NamespaceGuest.close`) to end the command's PID namespace: this
#: process then kills the namespace's init, whose exit the kernel holds until every
#: other process of the namespace is gone (pid_namespaces(7)), reaps it and only then
#: dies, so that whoever waits for this process knows nothing of the guest is left.
#: Killing this process outright would not: its death kills init (the parent death
#: signal), but it is reaped before the kernel has ended the rest, and init, orphaned,
#: waits for the host's init to reap it. A real-time signal, which nothing sends this
#: process by chance; until the namespace exists it kills this process at once.
END_SIGNAL = signal.SIGRTMIN

#: The command's user namespace and the namespaces it owns (step 2 above), but for the
#: PID namespace: the first process forked after that unshare is its init, so it comes
#: once `ip` has run.
_GUEST_NAMESPACES = CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _mount(source: str | None, target: str, flags: int, fstype: str | None = None) -> None:
    if _libc.mount(source.encode() if source else None, target.encode(),
                   fstype.encode() if fstype else None, ctypes.c_ulong(flags), None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source or ''} on {target}: {os.strerror(err)}")


def _point_resolv_conf_at(servers: list[str]) -> None:
    """Bind-mount a file naming the relay's DNS address over /etc/resolv.conf."""
    fd, path = tempfile.mkstemp(prefix="relaynat-resolv-")
    try:
        lines = "".join(f"nameserver {server}\n" for server in servers)
        os.write(fd, f"# written by relaynat run\n{lines}".encode())
        os.fchmod(fd, 0o644)
        os.close(fd)
        _mount(path, "/etc/resolv.conf", _MS_BIND)
    finally:
        os.unlink(path)  # the bind mount keeps the inode alive


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode:
        raise NamespaceSetupError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _warn(text: str) -> None:
    print(f"relaynat run: warning: {text}", file=sys.stderr)


def _host_side_mounts(spec: dict[str, Any], host_root: bool) -> None:
    """Step 1: a mount namespace, private (as `mount --make-rprivate /`, so nothing
    propagates back to the host's), where /dev/null covers each hidden path and
    /etc/resolv.conf names the relay. Done before the command's user namespace exists,
    with the caller's own ids: a hidden path under a directory only the caller may
    search is still found. `host_root`: we are root of the host's user namespace."""
    if host_root:
        unshare(CLONE_NEWNS)
    else:
        unshare(CLONE_NEWUSER | CLONE_NEWNS)
        map_root("self", os.getuid(), os.getgid())
    _mount(None, "/", _MS_REC | _MS_PRIVATE)
    for path in spec["hide"]:
        # connect(2) on a character device fails (ECONNREFUSED).
        _mount("/dev/null", path, _MS_BIND)
    if spec["dns"]:
        try:
            _point_resolv_conf_at(spec["dns"])
        except OSError as exc:
            _warn(f"cannot point /etc/resolv.conf at {', '.join(spec['dns'])}: {exc}")


def _enter_guest_namespaces(sock: socket.socket, host_root: bool) -> None:
    """Step 2: the command's user namespace and those it owns. `host_root`: we are root
    of the host's user namespace (when not, step 1 made us root of a new one, so our
    euid says nothing any more)."""
    if host_root:
        # Supplementary groups are kept across unshare as host groups (root's include
        # gid 0) and would still open files by group; setgroups(2) is denied after.
        os.setgroups([])
    unshare(_GUEST_NAMESPACES)
    if host_root:
        # Mapping root inside to another id outside takes CAP_SETUID in the parent user
        # namespace, which this process has just left: the relay writes the map.
        sock.send(b"map")
        if sock.recv(16) != b"mapped":
            raise NamespaceSetupError("the relay did not map the user namespace")
    else:
        map_root("self", 0, 0)  # root of step 1's namespace, i.e. the caller


def _become_root() -> None:
    """Take the ids of the command's root: those the map gave it outside. Until now our
    credentials were the host ids we started with (unmapped in here, so we acted on
    files as them); the capabilities stay, as the new uid is the namespace's root, and
    only with it do they pass through execve(2) to `ip` and the command."""
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def _configure_link(spec: dict[str, Any], verb: str = "add") -> None:
    """Address the TAP and bring it and `lo` up. `verb` "replace": in a namespace that
    may have them already (a joined one, a TAP that existed), set rather than add."""
    tap = spec["tap"]
    if not spec["address6"]:
        # -4: keep the kernel from autoconfiguring and soliciting on the link.
        with open(f"/proc/sys/net/ipv6/conf/{tap}/disable_ipv6", "w") as f:
            f.write("1")
    _ip("link", "set", "lo", "up")
    _ip("link", "set", "dev", tap, "mtu", str(spec["mtu"]), "up")
    if spec["address"]:
        _ip("addr", verb, spec["address"], "dev", tap)
        _ip("route", verb, "default", "via", spec["gateway"], "dev", tap)
    if spec["address6"]:
        # Configured statically so the command's first packet has an address (as
        # pasta does); the kernel still autoconfigures its own SLAAC address from
        # the relay's router advertisement. No DAD: the relay owns the link.
        _ip("-6", "addr", verb, spec["address6"], "dev", tap, "nodad")
        _ip("-6", "route", verb, "default", "via", spec["gateway6"], "dev", tap)


def _shell_status(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _reap(child: int) -> int | None:
    """Reap every child that has exited (as PID 1, orphans of the command too); the
    status of `child` as a shell reports it, if it was among them."""
    found = None
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return found
        if pid == 0:
            return found
        if pid == child:
            found = _shell_status(status)


def _die() -> None:
    """Die by SIGKILL: a guest that `NamespaceGuest.close` ended reports what one
    killed outright does (-9 from `proc`, 137 from `wait`)."""
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _pass_signals_until_exit(child: int, outer: bool = False) -> int:
    """Wait for `child`, passing on the signals of _FORWARDED that a process sent; its
    status as a shell reports it. The signals and SIGCHLD (and END_SIGNAL) are
    blocked (since before the fork) and taken with sigwaitinfo, which tells who sent
    them. `outer`: this is the namespace's outer process and `child` its init, which
    END_SIGNAL kills; this process then dies once init is reaped."""
    waited = {*_FORWARDED, signal.SIGCHLD} | ({END_SIGNAL} if outer else set())
    ending = False
    while True:
        info = signal.sigwaitinfo(waited)
        if info.si_signo == signal.SIGCHLD:
            status = _reap(child)
            if status is not None:
                if ending:
                    _die()
                return status
        elif info.si_signo == END_SIGNAL:
            ending = True
            with contextlib.suppress(ProcessLookupError):  # exited: SIGCHLD is pending
                os.kill(child, signal.SIGKILL)
        elif info.si_code != _SI_KERNEL:
            with contextlib.suppress(ProcessLookupError):  # exited: SIGCHLD is pending
                os.kill(child, info.si_signo)


def _become_user(uid: int, gid: int) -> None:
    """Enter a user namespace of our own whose only ids are `uid` and `gid`, mapped to
    the ids we have (the guest's root): from here on we are that user, and what we
    execute holds no capability of the guest's user namespace (the module docstring)."""
    unshare(CLONE_NEWUSER)
    # Our ids changed in _become_root, so /proc/self is the host root's until this.
    set_dumpable()
    map_ids("self", (uid, gid), (0, 0))
    # Already our ids through the map; set so a wrong map fails here, not later.
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def _exec(command: list[str], spec: dict[str, Any], env: dict[str, str] | None) -> int:
    """Become the command (returns only if that failed): as spec["user"] (uid, gid) if
    given, with at most the capabilities spec["caps"] if given, with `env` if given."""
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    # Python ignores these at startup, and an ignored signal stays ignored across
    # execve(2): give the command the defaults a shell would.
    for signum in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(signum, signal.SIG_DFL)
    try:
        if spec["user"] is not None:
            _become_user(*spec["user"])
        if spec["caps"] is not None:
            limit_capabilities(spec["caps"])
    except OSError as exc:
        print(f"relaynat run: cannot drop the command's privileges: {exc}", file=sys.stderr)
        return 126
    try:
        if env is None:
            os.execvp(command[0], command)
        else:
            os.execvpe(command[0], command, env)
    except OSError as exc:
        print(f"relaynat run: cannot execute {command[0]!r}: {exc.strerror}", file=sys.stderr)
    return 127


def _init(command: list[str], spec: dict[str, Any], env: dict[str, str] | None,
          parent_alive: int) -> int:
    """PID 1 of the command's PID namespace: mount its /proc, start the command, pass
    signals on, reap, and return the command's status."""
    # Our parent (in the host's PID namespace) is the process the relay watches and
    # kills: its death must end the namespace, whose processes all die with PID 1.
    set_parent_death_signal(signal.SIGKILL)
    if select.select([parent_alive], [], [], 0)[0]:
        return 1  # EOF: the parent died before the death signal was set
    os.close(parent_alive)
    # A proc of this PID namespace (proc mounts show the mounter's), covering the
    # host's, which is locked beneath it.
    _mount("proc", "/proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "proc")
    child = os.fork()
    if child == 0:
        os._exit(_exec(command, spec, env))
    return _pass_signals_until_exit(child)


def _start(command: list[str], spec: dict[str, Any], env: dict[str, str] | None) -> int:
    """Fork the init of the PID namespace made last, pass signals to it, and return
    its status."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {*_FORWARDED, signal.SIGCHLD, END_SIGNAL})
    sys.stdout.flush()
    sys.stderr.flush()
    alive_r, alive_w = os.pipe()
    init = os.fork()  # PID 1 of the new namespace
    if init == 0:
        os.close(alive_w)
        try:
            code = _init(command, spec, env, alive_r)
        except OSError as exc:
            print(f"relaynat run: cannot start the command's init: {exc}", file=sys.stderr)
            code = 1
        sys.stderr.flush()
        os._exit(code)
    os.close(alive_r)
    return _pass_signals_until_exit(init, outer=True)


def _join(spec: dict[str, Any], sock: socket.socket, command: list[str],
          env: dict[str, str] | None, parent: int) -> int:
    """`relaynat run --netns`: enter the target's network namespace (by the descriptor
    the relay opened and checked, join.py), after the user namespace owning it when
    spec["join"]["userns"] names one (an unprivileged caller's: only there does it hold
    CAP_SYS_ADMIN over that network namespace, setns(2)); create or open the TAP there,
    configure it unless told not to, and hand it over. With a command: a private mount
    namespace, as `ip netns exec` makes, where /etc/resolv.conf names the relay and
    /dev/null covers the control socket, then, once the relay says go, become the
    command (no PID, user or other namespace of its own: it shares the target's
    network and nothing else). Without one: exit once the TAP is handed over; a TAP
    made here goes when the relay closes it (the last descriptor of a TAP that was not
    made persistent)."""
    join = spec["join"]
    try:
        if join["userns"] is not None:
            setns(join["userns"], CLONE_NEWUSER)
            # Root of that namespace, if it maps our ids to root (rootlesskit's and
            # `unshare -Ur`'s do), so `ip` keeps its capabilities across execve(2).
            try:
                _become_root()
            except OSError:
                raise NamespaceSetupError("the user namespace that owns the target maps "
                                          "no root for this user") from None
        setns(join["netns"], CLONE_NEWNET)
        if command:
            _host_side_mounts(spec, host_root=True)
        try:
            fd, vnet_hdr_len, offload = open_tap(spec["tap"], spec["vnet"])
        except OSError as exc:
            # TUNSETIFF: EINVAL for an interface of that name that is no TAP (a veth,
            # lo), EBUSY for a TAP another process has open (not multi-queue).
            raise NamespaceSetupError(f"cannot make or open TAP {spec['tap']!r} there: "
                                      f"{exc.strerror}" + (
                                          " (an interface of that name that is not a TAP?)"
                                          if exc.errno == errno.EINVAL else "")) from None
        if spec["configure"]:
            _configure_link(spec, "replace")
        if spec["cwd"] is not None:
            try:
                os.chdir(spec["cwd"])
            except OSError as exc:
                raise NamespaceSetupError(f"cwd {spec['cwd']}: {exc.strerror}") from None
    except (OSError, NamespaceSetupError) as exc:
        sock.send(f"cannot set up in the target network namespace: {exc}".encode())
        return 1
    if command:
        _end_with_parent(parent)  # the command is this process, past its ids' changes
    info = json.dumps({"vnet_hdr_len": vnet_hdr_len, "offload": offload}).encode()
    sock.sendmsg([info], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
    os.close(fd)
    if not command:
        return 0
    if sock.recv(16) != b"go":
        return 1
    sock.close()
    for ns_fd in (join["netns"], join["userns"]):
        if ns_fd is not None:
            os.close(ns_fd)
    return _exec(command, spec, env)


def _end_with_parent(parent: int) -> None:
    """Have the kernel send END_SIGNAL to this process when `parent` (the relay) dies,
    however it dies (SIGKILL, its seccomp filter's SIGSYS): the guest then ends with
    it, as `NamespaceGuest.close` would end it, instead of running on with a dead link
    and the relay's stdout and stderr held open. Set after the last change of this
    process's ids: the kernel clears the parent-death signal when the effective or
    filesystem uid or gid changes (prctl(2), PR_SET_PDEATHSIG), and root of the
    guest's user namespace is another id outside. A parent gone before it was set is
    seen by its pid: this process has been given to a reaper."""
    set_parent_death_signal(END_SIGNAL)
    if os.getppid() != parent:
        _die()


def _child_main(argv: list[str]) -> int:
    parent = os.getppid()
    signal.signal(END_SIGNAL, lambda _signum, _frame: _die())
    spec = json.loads(argv[0])
    sock = socket.socket(fileno=int(argv[1]))
    env = None
    if spec["env"] is not None:
        with open(spec["env"], encoding="utf-8") as f:
            env = json.load(f)
    command = argv[3:]
    if spec.get("join") is not None:
        return _join(spec, sock, command, env, parent)
    try:
        host_root = os.geteuid() == 0
        _host_side_mounts(spec, host_root)
        _enter_guest_namespaces(sock, host_root)
        # Opened with the caller's ids (/dev/net/tun may be root's, mode 0600) but in
        # the new network namespace: a TAP belongs to the namespace it was opened in.
        fd, vnet_hdr_len, offload = open_tap(spec["tap"], spec["vnet"])
        _become_root()
        _end_with_parent(parent)
        _configure_link(spec)
        if spec["cwd"] is not None:
            # Here rather than in the command's process, so a directory the command may
            # not enter fails the setup, with its reason, not the command later; the
            # ids are the command's as far as files go (the module docstring).
            try:
                os.chdir(spec["cwd"])
            except OSError as exc:
                raise NamespaceSetupError(f"cwd {spec['cwd']}: {exc.strerror}") from None
        # Owned by the user namespace we are in; not entered: its init is the next
        # process we fork (`_start`).
        unshare(CLONE_NEWPID)
    except (OSError, NamespaceSetupError) as exc:
        sock.send(f"cannot set up the guest namespace: {exc}".encode())
        return 1
    info = json.dumps({"vnet_hdr_len": vnet_hdr_len, "offload": offload}).encode()
    sock.sendmsg([info], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
    os.close(fd)
    if sock.recv(16) != b"go":
        return 1
    sock.close()
    return _start(command, spec, env)


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
