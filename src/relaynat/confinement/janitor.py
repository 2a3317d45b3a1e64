"""The janitor: a small process that removes a confined relay's socket files once the
relay has exited, however it exited.

A confined relay cannot remove the socket files it bound (the control socket, `serve
--socket`, `--receive-handover`): it has left the filesystem, and as
`nobody` it could not write their directories anyway. So before it confines itself
the relay starts the janitor (`Janitor.start`: a fresh interpreter running `main`),
which keeps the privileges and the filesystem the relay had and waits on a socket
pair. A relay that ends cleanly asks it to remove the files and waits for the answer
(`finish`), so that its exit is seen with the files gone. Otherwise end of file comes
when the relay's last descriptor of the pair is closed, that is when the relay dies
(SIGKILL, its seccomp filter), or its pidfd says it is gone (a process it forked may
hold a copy of its end); once the relay is gone (its pidfd: by then the kernel has
released every socket the relay held) the janitor removes each socket file it was
given, unless

- the path is no longer the file recorded (device, inode and change time): a new
  relay has bound the same path since (the stale-file logic of transports/stream.py
  and unixgram.py replaces a file nobody serves), and its file is not ours to remove;
- a live socket is still bound to the file (unix_diag of the kernel, `UDIAG_SHOW_VFS`):
  another process serves it, as the new relay after a handover;
- the relay released it (`release`: after a handover the path is the new relay's).

Trust: the janitor is root and the relay it serves is the process confinement
assumes may be taken over by the guest, so nothing the relay says can make the janitor
remove more than the relay's own files. The paths given to `start` are recorded on the
janitor's command line, before the relay has read anything from the guest. Later
(`register`, a relay that took over another's sockets in a handover) the relay must
send the bound socket itself with the path (SCM_RIGHTS): the janitor asks the kernel
which file that socket is bound to and records the path only if it names that file.
`release` and `remove` only ever take a path off the list.

What the janitor gives up: every descriptor but its socket pair, the relay's pidfd and
stderr is closed when it starts (it must not hold the guest's TAP or socket, nor a
listening socket, which would go on accepting); every capability but CAP_DAC_OVERRIDE
and CAP_FOWNER (removing a file in a directory another user owns, or in a sticky
directory such as /tmp); no_new_privs. It ignores SIGINT, SIGQUIT, SIGTERM and
SIGHUP: a terminal's ^C, a hangup or a service manager's SIGTERM reach the relay's
whole process group, and the janitor must outlive the relay they end. It stays in the
relay's process group and session (no setsid): whoever kills the whole group with
SIGKILL means to end it all. It does not use PR_SET_PDEATHSIG: the end of file is
the signal, and it comes only once the relay's descriptors are closed.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
from collections.abc import Iterable
from typing import NoReturn

from relaynat.confinement import privileges
from relaynat.netns import syscalls

#: Capability numbers (include/uapi/linux/capability.h).
CAP_DAC_OVERRIDE = 1
CAP_FOWNER = 3
#: What the janitor keeps: removing a file in another user's directory
#: (CAP_DAC_OVERRIDE) or another user's file in a sticky directory (CAP_FOWNER).
KEEP = (CAP_DAC_OVERRIDE, CAP_FOWNER)
#: The signals that end a relay cleanly, sent to its process group by a terminal or a
#: service manager: the janitor must outlive the relay they end.
IGNORED = (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP)
#: How long the janitor waits, after the end of file, for the relay's process to be
#: gone (its descriptors, and so its sockets, released) before it looks anyway.
EXIT_WAIT_S = 10.0

_REGISTER = b"register"
_RELEASE = b"release"
_REMOVE = b"remove"
_FINISH = b"finish"
_DONE = b"done"
#: How long a relay ending cleanly waits for the janitor's answer to `finish`.
FINISH_WAIT_S = 5.0
#: A path message: the word, NUL, the path (a path has no NUL).
_MAX_MESSAGE = 8 + 1 + 4096

# unix_diag (include/uapi/linux/sock_diag.h, unix_diag.h, netlink.h).
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_UDIAG_SHOW_VFS = 0x2
_UNIX_DIAG_VFS = 1
_NLMSG_HDR = struct.Struct("=IHHII")
_UNIX_DIAG_REQ = struct.Struct("=BBHIIIII")
_UNIX_DIAG_MSG = struct.Struct("=BBBBIII")
_RTATTR = struct.Struct("=HH")
_NO_COOKIE = 0xFFFFFFFF

#: A socket file as the kernel names it: (st_dev, st_ino).
FileId = tuple[int, int]
#: A socket file as recorded: (st_dev, st_ino, st_ctime_ns). The change time tells a
#: file bound at the path since from the recorded one when the filesystem gives the new
#: file the inode number the old one freed (ext4 does, at once).
Recorded = tuple[int, int, int]


def _kernel_dev(dev: int) -> int:
    """A kernel-internal dev_t (unix_diag's udiag_vfs_dev: major << 20 | minor) as
    stat(2) gives it."""
    return os.makedev(dev >> 20, dev & 0xFFFFF)


def bound_files(ino: int | None = None) -> dict[int, FileId]:
    """The file each bound unix socket of this network namespace is bound to, by the
    socket's own inode (fstat of a descriptor of it): (st_dev, st_ino) as lstat gives
    them for the path. `ino`: only that socket (OSError ENOENT if it is not one)."""
    exact = ino is not None
    request = _UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, ino or 0,
                                  _UDIAG_SHOW_VFS, _NO_COOKIE, _NO_COOKIE)
    flags = _NLM_F_REQUEST | (0 if exact else _NLM_F_DUMP)
    found: dict[int, FileId] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        nl.send(_NLMSG_HDR.pack(_NLMSG_HDR.size + len(request), _SOCK_DIAG_BY_FAMILY,
                                flags, 1, 0) + request)
        while True:
            data = nl.recv(1 << 16)
            offset = 0
            while offset + _NLMSG_HDR.size <= len(data):
                length, kind = _NLMSG_HDR.unpack_from(data, offset)[:2]
                if length < _NLMSG_HDR.size:
                    raise OSError(0, "unix_diag: malformed answer")
                if kind == _NLMSG_DONE:
                    return found
                if kind == _NLMSG_ERROR:
                    err = -struct.unpack_from("=i", data, offset + _NLMSG_HDR.size)[0]
                    if err:
                        raise OSError(err, f"unix_diag: {os.strerror(err)}")
                    return found
                if kind == _SOCK_DIAG_BY_FAMILY:
                    _parse(data[offset + _NLMSG_HDR.size:offset + length], found)
                    if exact:
                        return found
                offset += (length + 3) & ~3


def _parse(body: bytes, found: dict[int, FileId]) -> None:
    sock_ino = _UNIX_DIAG_MSG.unpack_from(body)[4]
    offset = _UNIX_DIAG_MSG.size
    while offset + _RTATTR.size <= len(body):
        length, kind = _RTATTR.unpack_from(body, offset)
        if length < _RTATTR.size:
            return
        if kind == _UNIX_DIAG_VFS and length >= _RTATTR.size + 8:
            vfs_ino, vfs_dev = struct.unpack_from("=II", body, offset + _RTATTR.size)
            found[sock_ino] = (_kernel_dev(vfs_dev), vfs_ino)
        offset += (length + 3) & ~3


def _file_of(path: str) -> Recorded | None:
    """The socket file at `path` (not following a symbolic link), or None."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_ctime_ns) if stat.S_ISSOCK(st.st_mode) else None


#: The janitor's program: this module's `main`, in a fresh interpreter (`-I`: no
#: PYTHON* variable of the environment steers a root process) that imports this
#: package and its dependencies from where the relay imported them: the relay's own
#: import path, which `-I` would otherwise leave out where it came from PYTHONPATH
#: (pyseccomp not found: the janitor died at start and the files stayed).
_BOOT = ("import json, sys; sys.path[:0] = json.loads(sys.argv[1]); "
         "from relaynat.confinement.janitor import main; main(sys.argv[2:])")


class Janitor:
    """The relay's side: `start` starts the janitor; `register`, `release`, `remove`
    and `finish` tell it about paths. Its socket pair's end here is closed only by the
    relay's exit (nothing else holds it: it is close-on-exec and the relay starts no
    process once confined)."""

    def __init__(self, channel: socket.socket, process: subprocess.Popen[bytes]) -> None:
        self._channel = channel
        self._process = process
        self.pid = process.pid

    @classmethod
    def start(cls, paths: Iterable[str]) -> Janitor:
        """Start the janitor, which will remove `paths` (the socket files bound so far:
        each is recorded as the file it is now) once this process has exited. Call it
        before this process confines itself (it executes a program).

        The janitor is a fresh interpreter rather than a fork of this one: a fork would
        hold on to the relay's heap as it was (26 MB of pages shared when measured,
        each the fork's own once the relay writes to it) for as long as the relay runs;
        and it inherits only the descriptors passed to it."""
        recorded = [[path, *file] for path in paths
                    if (file := _file_of(path)) is not None]
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pidfd = os.pidfd_open(os.getpid())
        package = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
            __file__))))
        path = [package, *(entry for entry in sys.path if entry and entry != package)]
        # Blocked from before the janitor exists until it ignores them (the mask is
        # inherited across fork and execve, signal(7)): one sent to the relay's group
        # while the interpreter starts must not end it. Here they wait for the
        # unblocking, not lost.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, IGNORED)
        try:
            process = subprocess.Popen(
                [sys.executable, "-I", "-c", _BOOT, json.dumps(path), str(theirs.fileno()),
                 str(pidfd), json.dumps(recorded)],
                pass_fds=(theirs.fileno(), pidfd), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            os.close(pidfd)
            theirs.close()
        return cls(ours, process)

    def _send(self, word: bytes, path: str, fds: list[int] | None = None) -> None:
        message = word + b"\0" + os.fsencode(path)
        try:
            if fds:
                socket.send_fds(self._channel, [message], fds)
            else:
                self._channel.send(message)
        except OSError as exc:
            print(f"relaynat: the socket file janitor is gone ({exc.strerror}): {path} "
                  "stays after this relay exits", file=sys.stderr)

    def register(self, path: str, sock: socket.socket) -> None:
        """Remove `path` too when this process exits: `sock` is the socket bound there
        (the janitor checks that the file at `path` is the one it is bound to)."""
        self._send(_REGISTER, path, [sock.fileno()])

    def release(self, path: str) -> None:
        """Leave `path` in place: another process serves it now (a handover)."""
        self._send(_RELEASE, path)

    def remove(self, path: str) -> None:
        """Remove `path` now, as at exit (if it is still the file recorded and no
        socket is bound to it any more): its socket is closed and the path not needed."""
        self._send(_REMOVE, path)

    def finish(self) -> None:
        """This process is about to exit, its sockets closed: remove the files now and
        return once they are gone, so that whoever sees the exit sees them gone too, as
        with a relay that removes its own. (A file that cannot go yet is tried again
        at the exit; a relay that dies without calling this is cleaned up after.)"""
        self._send(_FINISH, "")
        self._channel.settimeout(FINISH_WAIT_S)
        with contextlib.suppress(OSError):
            self._channel.recv(len(_DONE))


def main(argv: list[str]) -> NoReturn:
    """The janitor process (`Janitor.start` runs it): argv is its end of the socket
    pair, the relay's pidfd, and the paths recorded as JSON ([path, dev, ino, ctime])."""
    # Blocked since the relay started this process (Janitor.start): one that came
    # meanwhile is pending, and discarded once ignored.
    for signum in IGNORED:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, IGNORED)
    channel, pidfd = int(argv[0]), int(argv[1])
    files = {path: (dev, ino, ctime) for path, dev, ino, ctime in json.loads(argv[2])}
    try:
        _drop_privileges()
        _serve(channel, pidfd, files)
    except Exception as exc:
        print(f"relaynat: socket file janitor: {exc}", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)


def _drop_privileges() -> None:
    """Keep only what removing the files needs (module docstring)."""
    holds = privileges.permitted()
    if privileges.CAP_SETPCAP in holds:
        privileges.drop_bounding_set(KEEP, syscalls.last_capability())
    privileges.keep_only(KEEP)
    syscalls.set_no_new_privs()


def _serve(channel: int, pidfd: int, files: dict[str, Recorded]) -> None:
    """Follow the relay's messages until it is gone, then remove what is left."""
    chan = socket.socket(fileno=channel)
    chan.setblocking(False)
    ready = select.poll()
    ready.register(chan, select.POLLIN)
    ready.register(pidfd, select.POLLIN)
    while True:
        events = dict(ready.poll())
        if events.get(chan.fileno()) and not _handle(chan, files):
            break  # end of file: the relay's end is closed, it is exiting
        if events.get(pidfd) and not events.get(chan.fileno()):
            # The relay is gone, yet its end of the pair is open: another process
            # holds a copy (one the relay forked). What it had said is all read.
            break
    ready.unregister(chan)
    ready.poll(int(EXIT_WAIT_S * 1000))
    _remove(files)


def _handle(chan: socket.socket, files: dict[str, Recorded]) -> bool:
    """Act on one message of the relay; False at end of file."""
    try:
        message, fds, _, _ = socket.recv_fds(chan, _MAX_MESSAGE, 1)
    except BlockingIOError:
        return True
    if not message:
        return False
    word, _, raw = message.partition(b"\0")
    path = os.fsdecode(raw)
    if word == _REGISTER:
        _register(files, path, fds)
    elif word == _RELEASE:
        files.pop(path, None)
    elif word == _REMOVE and path in files:
        _remove(files, path)
    elif word == _FINISH:
        _remove(files)
        with contextlib.suppress(OSError):
            chan.send(_DONE)
    for fd in fds:
        os.close(fd)
    return True


def _register(files: dict[str, Recorded], path: str, fds: list[int]) -> None:
    """Record `path` if the socket sent with it (the relay's) is bound to that file."""
    st = os.fstat(fds[0]) if len(fds) == 1 else None
    if st is None or not stat.S_ISSOCK(st.st_mode):
        print(f"relaynat: socket file janitor: {path}: no socket sent with it; it "
              "stays after the relay exits", file=sys.stderr)
        return
    sock_ino = st.st_ino
    try:
        bound = bound_files(sock_ino).get(sock_ino)
    except OSError:
        bound = None
    file = _file_of(path)
    if bound is None or file is None or bound != file[:2]:
        print(f"relaynat: socket file janitor: {path} is not the file of the socket sent "
              "with it; it stays after the relay exits", file=sys.stderr)
        return
    files[path] = file


def _remove(files: dict[str, Recorded], only: str | None = None) -> None:
    """Remove each path (or `only` that one) that is still the file recorded and that
    no socket is bound to any more, and forget it; a file another process serves, or
    bound since, is left alone (and forgotten); one whose socket is still bound (the
    relay has not closed it yet) is kept for a later try."""
    paths = [only] if only is not None else list(files)
    if not paths:
        return
    try:
        live = set(bound_files().values())
    except OSError as exc:
        print(f"relaynat: socket file janitor: unix_diag: {exc.strerror}; the socket "
              f"files stay: {', '.join(paths)}", file=sys.stderr)
        return
    for path in paths:
        file = files[path]
        if file[:2] in live:
            continue
        del files[path]
        if _file_of(path) != file:
            continue
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            print(f"relaynat: socket file janitor: cannot remove {path}: {exc.strerror}",
                  file=sys.stderr)
