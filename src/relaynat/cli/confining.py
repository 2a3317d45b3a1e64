"""How the command line's relays confine themselves (relaynat.confinement, docs/
confinement.md): `confine_relay` for `run` and `serve` (which capabilities the options'
features keep, the socket file janitor, handing paths over to it), `confine_now` for
the relaynat-slirp4netns and relaynat-pasta front ends, the loop's replaceable executor
(confinement applies to a process of one thread), and the test and tracing hooks.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relaynat.confinement import Confined
    from relaynat.confinement.janitor import Janitor
    from relaynat.moving.handover_receive import Taken
    from relaynat.relay import Relay

log = logging.getLogger("relaynat")

#: Test-only (tests/integration/test_confinement.py): this many seconds after a relay
#: confined itself, it makes a call its seccomp filter forbids (a netlink socket, what
#: a hijacked relay would open to rewrite the host's routes), to show the filter ends it.
FORBIDDEN_CALL_ENV = "RELAYNAT_TEST_FORBIDDEN_CALL_S"


#: Set (to anything), the seccomp filter logs a call outside its list instead of killing
#: the process: how the list is traced (confinement/seccomp_filter.py); not confinement.
TRACE_ENV = "RELAYNAT_CONFINE_TRACE"


class LoopThreads:
    """The loop's default executor, replaceable: asyncio's executor threads outlive
    their work, and confinement applies to a process of one thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pool = ThreadPoolExecutor()
        loop.set_default_executor(self.pool)

    @classmethod
    def confining(cls) -> LoopThreads:
        """A new loop, with its executor, for a relay that will confine itself: made
        without libuv's io_uring, which the seccomp filter refuses
        (confinement/seccomp_filter.py, without_io_uring)."""
        from relaynat.cli.event_loop import new_loop
        from relaynat.confinement.seccomp_filter import without_io_uring

        return cls(without_io_uring(new_loop))

    def stop(self) -> None:
        """End the idle threads; later work starts new ones, confined as the process."""
        self.pool.shutdown(wait=True)
        self.pool = ThreadPoolExecutor()
        self.loop.set_default_executor(self.pool)


def kept_capabilities(args: argparse.Namespace) -> list[str]:
    """The capabilities a confined relay keeps for the features its options ask for
    (docs/confinement.md has the table); an unprivileged relay has none to keep."""
    if os.geteuid() != 0:
        return []
    keep = []
    if (args.control_socket or getattr(args, "incoming", False)
            or getattr(args, "receive_handover", None)):
        # ctl export/import (and serve --incoming) put sockets in TCP_REPAIR mode;
        # ctl add_hostfwd may bind a port below net.ipv4.ip_unprivileged_port_start.
        # A relay that receives a handover confines itself before it learns whether a
        # control socket comes with it, and capabilities cannot be had back after.
        keep += ["CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"]
    if (getattr(args, "receive_handover", None)
            or (args.cmd == "run" and args.command and args.netns is not None)):
        # A command run in a joined namespace (--netns) has the ids of whoever started
        # the relay, root: passing signals on to it and ending it need CAP_KILL once the
        # relay is nobody; so may a command a handover brings. A namespace of the
        # command's own needs none: its outer process's ids outside are the relay's
        # own (netns/guest.py, command_ids: --runas or nobody), which kill(2) allows.
        keep.append("CAP_KILL")
    return keep


def _forbidden_call() -> None:
    log.warning("%s: making a call the seccomp filter forbids", FORBIDDEN_CALL_ENV)
    socket.socket(socket.AF_NETLINK, socket.SOCK_RAW).close()


def _socket_paths(args: argparse.Namespace) -> list[str]:
    """The socket files the options had this process bind."""
    paths = (args.control_socket, getattr(args, "socket", None),
             getattr(args, "unixgram", None), getattr(args, "receive_handover", None))
    return [path for path in paths if path]


def confine_relay(args: argparse.Namespace, *relays: Relay) -> None:
    """Confine this process (relaynat.confinement) now that the relays' guests,
    sockets and files are set up, if --confine; ConfinementError if it could not be
    done (the relay must not serve then). A confined relay cannot remove its socket
    files: the janitor started first (confinement/janitor.py) removes them once this
    process has exited (`args.janitor`)."""
    if not args.confine:
        return
    from relaynat.confinement.janitor import Janitor

    # Started while the process still has its privileges and the paths.
    args.confined = True
    paths = _socket_paths(args)
    try:
        # None without a socket file: later ones come only with --receive-handover's.
        args.janitor = Janitor.start(paths) if paths else None
    except OSError as exc:  # no reason not to serve: the files stay, as before
        log.warning("cannot start the socket file janitor (%s): the socket files stay "
                    "after the relay exits", exc)
    confine_now(relays, runas=args.runas, keep=kept_capabilities(args),
                threads=getattr(args, "loop_threads", None))
    delay = os.environ.get(FORBIDDEN_CALL_ENV)
    if delay:
        asyncio.get_running_loop().call_later(float(delay), _forbidden_call)


def unlink_on_close(args: argparse.Namespace, path: str, handed: bool) -> bool:
    """Whether closing the socket bound at `path` removes its file here: not after a
    handover (the path is the new relay's), and never confined (the filesystem is out
    of reach: the janitor removes it at exit, and is told to leave it if handed)."""
    janitor: Janitor | None = getattr(args, "janitor", None)
    if janitor is None:
        return not handed and not getattr(args, "confined", False)
    if handed:
        janitor.release(path)
    return False


def register_taken(args: argparse.Namespace, relay: Relay, taken: Taken) -> None:
    """The socket files a handover gave this relay are removed at its exit too: its
    janitor is sent each bound socket with its path (it checks they match)."""
    janitor: Janitor | None = getattr(args, "janitor", None)
    if janitor is None:
        return
    if taken.control is not None:
        janitor.register(taken.control.path, taken.control.sock)
    stream = relay.stream_server
    if taken.stream_path is not None and stream is not None:
        janitor.register(taken.stream_path, stream.sock)
    if taken.unixgram is not None:
        janitor.register(taken.unixgram.path, taken.unixgram.sock)


def confine_now(relays: Sequence[Relay], *, runas: str | None, keep: Collection[str],
                threads: LoopThreads | None) -> Confined:
    """Confine this process now (relaynat.confine), its loop's idle executor threads
    ended first (`threads`), and log what it holds; ConfinementError if it could not be
    done. RELAYNAT_CONFINE_TRACE makes the filter log instead of kill."""
    from relaynat.confinement import confine

    if threads is not None:
        threads.stop()
    # Tracing the allowlist: the kernel logs a call outside it and lets it run.
    action = "log" if os.environ.get(TRACE_ENV) else "kill"
    done = confine(*relays, runas=runas, keep=keep, on_violation=action)
    log.info("%s", done.describe())
    return done
