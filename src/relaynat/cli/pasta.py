"""`relaynat-pasta`: the part of pasta's command line that podman 4.4 to 5.x builds, served
by relaynat (`relaynat run --netns` underneath: netns/join.py, netns/guest.py).

podman runs pasta as `pasta --config-net [-t SPEC]... [-u SPEC]... [OPTIONS]
[--dns-forward ADDR] [-t none] [-u none] [-T none] [-U none] [--no-map-gw] [--quiet]
--netns PATH [--map-guest-addr ADDR]` and waits for it to exit: pasta forks into the
background once the namespace is served, and ends when PATH goes away (podman unmounts
and removes it when the container stops). This does the same. With `-f` (or `-d`) it
stays in the foreground.

Once the TAP is open in the namespace, the splice factory started and the forwards
bound, and before it reports ready (the parent's exit, in the background), the relay
confines itself as pasta isolates itself (passt's isolation.c) and as `relaynat run`
does (relaynat.confinement, docs/confinement.md): an empty read-only root, `--runas`'s
user (`nobody` as root; root of a user namespace that maps no other user, as rootless
podman's without subordinate ids, stays that user), no capability, no_new_privs, the
seccomp allowlist. pasta has no option to leave its sandbox off; relaynat's own
`--no-confine` does. The namespace's path is then looked up through a descriptor of
its directory opened before (pasta's own fallback to inotify), and the `-P` file is
left in place at exit, as pasta leaves it: the confined relay has no path to it.

The command line, what it takes and what each option becomes, is cli/pasta_options.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from relaynat.cli.pasta_options import (
    PROG,
    USAGE,
    PastaOptions,
    PastaUsageError,
    Translated,
    parse,
    target_text,
    translate,
)
from relaynat.config import ConfigError
from relaynat.netns.join import JoinTarget, resolve_target

if TYPE_CHECKING:
    from relaynat.cli.confining import LoopThreads
    from relaynat.netns.ns_sockets import NamespaceSockets
    from relaynat.relay import Relay

log = logging.getLogger("relaynat.pasta")


#: How often the namespace's path is looked at (pasta watches it with inotify).
_PATH_POLL_S = 0.5


class _NamespacePath:
    """The namespace's path, looked up through a descriptor of its directory opened
    while the process still has the filesystem: a confined relay has no path left, as
    pasta, which looks its namespace up the same way where inotify is not enough."""

    def __init__(self, path: str, netns_fd: int) -> None:
        self.base = os.path.basename(path)
        self.netns_fd = netns_fd
        self.dir_fd = os.open(os.path.dirname(path) or ".",
                              os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def present(self) -> bool:
        """Whether the path still names the namespace (podman unmounts and removes it
        when the container stops). EACCES: the entry is there, closed to the user the
        relay became (/proc/PID/ns of another user's live process, as pasta reads it)."""
        try:
            st = os.stat(self.base, dir_fd=self.dir_fd)
        except PermissionError:
            return True
        except OSError:
            return False
        own = os.fstat(self.netns_fd)
        return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)

    def close(self) -> None:
        os.close(self.dir_fd)


async def _watch_path(path: _NamespacePath, stop: asyncio.Event) -> None:
    while path.present():
        await asyncio.sleep(_PATH_POLL_S)
    stop.set()


@contextlib.contextmanager
def _stdio_to_null(enabled: bool) -> Iterator[None]:
    """With `enabled`, stdout and stderr point at /dev/null while the block runs: a
    helper process started then must not hold the caller's output open (podman waits
    for its end), the relay's own messages go through the restored stderr."""
    if not enabled:
        yield
        return
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def _start_splicing(translated: Translated, target: JoinTarget,
                    detached: bool) -> NamespaceSockets | None:
    """The namespace's socket factory (netns/ns_sockets.py) for spliced -t clients and
    -T/-U listeners; None when nothing is forwarded, or (a warning) when it cannot start
    and no -T/-U needs it. Raises NamespaceSetupError for -T/-U."""
    if not translated.forwards and not translated.loopback:
        return None
    from relaynat.cli.main import open_splice_factory
    from relaynat.netns.ns_sockets import GuestListener, for_guest

    listen = [GuestListener(proto, family, port)
              for proto, family, port, _ in translated.loopback]

    def start() -> NamespaceSockets:
        with _stdio_to_null(detached):
            return for_guest(None, target.netns_fd, target.userns_fd, listen)

    return open_splice_factory(PROG, start, bool(translated.loopback))


def _confine(opts: PastaOptions, relay: Relay, threads: LoopThreads) -> None:
    """Confine this process now that the TAP, the splice factory and the forwards are
    set up (relaynat.confinement): no capability is kept, as for `relaynat run --netns`
    without a control socket (the forwards are bound already; no command to signal).
    ConfinementError if it could not be done."""
    from relaynat.cli.confining import confine_now

    # open_joined_tap's executor thread ends first: confinement takes one thread.
    confine_now([relay], runas=opts.runas, keep=[], threads=threads)


async def serve(translated: Translated, opts: PastaOptions, target: JoinTarget,
                ready: Callable[[], None], detached: bool = False,
                threads: LoopThreads | None = None) -> int:
    """Serve the TAP in the target namespace; `ready` is called once the guest can be
    served, after the relay confined itself when `threads` (the loop's, made for a
    confined relay) are given. Ends on SIGINT/SIGTERM, the target process's exit, or
    its path's removal. `detached`: in the background, where no helper may inherit the
    caller's output."""
    from relaynat.cli.event_loop import stop_on_signals, until_stopped
    from relaynat.cli.main import add_forwards
    from relaynat.confinement import ConfinementError
    from relaynat.host.forward import ForwardError
    from relaynat.netns.guest import NamespaceSetupError, open_joined_tap
    from relaynat.netns.ns_sockets import GuestListener
    from relaynat.netns.ns_sockets import serve as serve_spliced
    from relaynat.relay import Relay

    config = translated.config

    loop = asyncio.get_running_loop()
    stop = stop_on_signals()
    try:
        transport = await open_joined_tap(config, target, tap_name=opts.ifname,
                                          configure=opts.config_net)
    except NamespaceSetupError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    try:
        factory = _start_splicing(translated, target, detached)
    except NamespaceSetupError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        transport.close()
        return 1
    watchers: list[asyncio.Future[None]] = []
    path: _NamespacePath | None = None
    if target.pidfd is not None:
        loop.add_reader(target.pidfd, stop.set)
    elif opts.netns is not None:
        name = opts.netns if "/" in opts.netns else os.path.join("/run/netns", opts.netns)
        try:
            path = _NamespacePath(name, target.netns_fd)
        except OSError as exc:
            print(f"{PROG}: --netns {opts.netns}: {exc.strerror}", file=sys.stderr)
            transport.close()
            if factory is not None:
                factory.close()
            return 1
        watchers.append(asyncio.ensure_future(_watch_path(path, stop)))
    try:
        async with Relay(config, None) as relay:
            relay.attach(transport)
            if factory is not None:
                serve_spliced(relay, factory, [
                    (GuestListener(proto, family, port), host_port)
                    for proto, family, port, host_port in translated.loopback])
            try:
                add_forwards(relay, translated.forwards)
            except (OSError, ForwardError) as exc:
                print(f"{PROG}: {exc}", file=sys.stderr)
                return 1
            if threads is not None:
                try:
                    _confine(opts, relay, threads)
                except (ConfinementError, ConfigError) as exc:
                    print(f"{PROG}: {exc}", file=sys.stderr)
                    return 1
            ready()
            await until_stopped(relay, stop)
    finally:
        for watcher in watchers:
            watcher.cancel()
        if target.pidfd is not None:
            loop.remove_reader(target.pidfd)
        if path is not None:
            path.close()
        if factory is not None:
            factory.close()
    return 0


def _detach_stdio(null: int) -> None:
    """Leave the caller's output: podman reads pasta's until it is closed. `null`:
    /dev/null, opened before confinement (no path leads to it after)."""
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _background() -> Callable[[], None]:
    """Fork as pasta does: the parent exits once the child is ready (status 0) or has
    failed (its status); the child gets the `ready` that tells the parent."""
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        os.close(null)
        with os.fdopen(read_end, "rb") as pipe:
            if pipe.read(1) == b"1":
                sys.exit(0)
        _, status = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(status) or 1)
    os.close(read_end)
    os.setsid()

    def ready() -> None:
        with contextlib.suppress(OSError):
            os.write(write_end, b"1")
        os.close(write_end)
        _detach_stdio(null)

    return ready


def main(argv: Sequence[str] | None = None) -> int:
    opts: PastaOptions | None = None
    try:
        opts = parse(sys.argv[1:] if argv is None else argv)
        if opts.help:
            print(USAGE, end="")
            return 0
        if opts.version:
            from importlib.metadata import version

            print(f"{PROG} (relaynat {version('relaynat')}), pasta's command line as "
                  "podman runs it")
            return 0
        translated = translate(opts)
        if opts.runas is not None:
            if opts.no_confine:
                raise PastaUsageError("--runas: the user a confined relay becomes; not "
                                      "with --no-confine")
            from relaynat.confinement.privileges import runas_ids

            runas_ids(opts.runas)
        target = resolve_target(target_text(opts))
    except PastaUsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        # resolve_target names relaynat run's --netns, which is pasta's option too; a
        # PID operand is no option.
        by_option = opts is not None and opts.netns is not None
        text = str(exc) if by_option else str(exc).removeprefix("--netns ")
        print(f"{PROG}: {text}", file=sys.stderr)
        return 1
    logging.basicConfig(level="DEBUG" if opts.debug else "WARNING",
                        format=f"{PROG} %(levelname)s: %(message)s")
    ready: Callable[[], None] = lambda: None  # noqa: E731
    detached = not (opts.foreground or opts.debug)
    if detached:
        ready = _background()
    if opts.pid_file is not None:
        try:
            with open(opts.pid_file, "w") as f:
                f.write(f"{os.getpid()}\n")
        except OSError as exc:
            print(f"{PROG}: -P {opts.pid_file}: {exc.strerror}", file=sys.stderr)
            target.close()
            return 1
    from relaynat.cli.event_loop import new_loop, run_to_end

    threads: LoopThreads | None = None
    if opts.no_confine:
        loop = new_loop()
    else:
        from relaynat.cli.confining import LoopThreads

        threads = LoopThreads.confining()
        loop = threads.loop
    try:
        return run_to_end(PROG, serve(translated, opts, target, ready, detached, threads),
                          loop)
    finally:
        target.close()
        # Confined, the relay has no path to the file: it stays, as pasta leaves it.
        if opts.pid_file is not None and opts.no_confine:
            with contextlib.suppress(OSError):
                os.unlink(opts.pid_file)


if __name__ == "__main__":
    sys.exit(main())
