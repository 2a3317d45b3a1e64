"""The `relaynat` command: `run` (namespace guest), `serve` (qemu/libkrun socket) and
`demo`. The options and what they stand for are cli/options.py's; bad values are
refused with a message naming the option and the problem (exit 2).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import resource
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from relaynat.cli.confining import LoopThreads, confine_relay, register_taken, unlink_on_close
from relaynat.cli.event_loop import new_loop, stop_on_signals, until_stopped
from relaynat.cli.options import (
    UNIXGRAM_UNCONFINED,
    build_parser,
    config_from_args,
    forwards_from_args,
    loopback_forwards_from_args,
    policy_from_args,
    resolve_confinement,
)
from relaynat.config import MAX_MTU, ConfigError, RelayConfig
from relaynat.confinement import ConfinementError
from relaynat.control.server import ControlServer
from relaynat.counters import GAUGES
from relaynat.host.forward import ForwardError
from relaynat.policy import Policy
from relaynat.portspec import Forward as PortForward
from relaynat.transports.interface import InterfaceError, InterfaceTransport

if TYPE_CHECKING:
    from relaynat.audit import AuditLog
    from relaynat.confinement.janitor import Janitor
    from relaynat.netns.join import JoinTarget
    from relaynat.netns.ns_sockets import NamespaceSockets
    from relaynat.relay import Relay

log = logging.getLogger("relaynat")


def _attach_audit(args: argparse.Namespace, relay: Relay) -> None:
    """`--audit`: write `relay`'s events to the audit log (opened by `main`)."""
    audit: AuditLog | None = getattr(args, "audit_log", None)
    if audit is not None:
        audit.attach(relay)


def _print_stats(stats: dict[str, int]) -> None:
    """The counters that counted something, and the gauges (docs/stats.md lists every
    name; `relaynat ctl stats` gives them all, zeros included)."""
    for key in sorted(stats):
        if stats[key] or key in GAUGES:
            print(f"{key:32} {stats[key]}", file=sys.stderr)


def _socket_type(fd: int) -> int:
    """SOCK_STREAM or SOCK_DGRAM of an inherited fd (OSError if it is not a socket)."""
    sock = socket.socket(fileno=fd)  # reads SO_DOMAIN/SO_TYPE; ENOTSOCK otherwise
    kind = sock.type
    sock.detach()
    return kind


def add_forwards(relay: Relay, forwards: list[PortForward]) -> None:
    """Listen on every forwarded port; say on stderr which port a 0 became."""
    for fwd in forwards:
        address = str(fwd.address) if fwd.address is not None else None
        for host_port, guest_port in fwd.pairs():
            try:
                added = relay.add_forward(fwd.proto, address, host_port, guest_port,
                                          interface=fwd.interface)
            except OSError as exc:
                if exc.errno != errno.EMFILE:
                    raise
                ports = sum(len(f) for f in forwards)
                limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
                raise ForwardError(f"forwarding {ports} ports takes a descriptor each, "
                                   f"beyond the limit of {limit} open files (ulimit -n; "
                                   "the hard limit could not be raised)") from None
            if host_port == 0:
                print(f"relaynat: forwarding {fwd.proto} {address or '*'} port {added.host_port} "
                      f"to guest port {guest_port}", file=sys.stderr, flush=True)


async def _serve_handed_over(config: RelayConfig, args: argparse.Namespace,
                             policy: Policy | None) -> int:
    """`serve --receive-handover PATH`: wait for a relay's handover, then serve what it
    handed over, until it ends or is handed over in turn (moving/handover.py)."""
    from relaynat.moving.handover_receive import Receiver, serve_taken
    from relaynat.relay import Relay

    stop = stop_on_signals()
    receiver = Receiver(args.receive_handover,
                        {"unixgram": UNIXGRAM_UNCONFINED} if args.confine else None)
    transport_stats: Callable[[], dict[str, int]] = dict
    async with Relay(config, policy) as relay:
        _attach_audit(args, relay)
        confine_relay(args, relay)
        taking = asyncio.ensure_future(receiver.take_over(relay))
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({taking, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        receiver.close()
        janitor: Janitor | None = getattr(args, "janitor", None)
        if janitor is not None:
            janitor.remove(args.receive_handover)
        if not taking.done():
            taking.cancel()
        else:
            taken = taking.result()
            register_taken(args, relay, taken)
            handed = (await serve_taken(relay, taken, stop)).done
            if taken.control is not None:
                taken.control.close(unlink=unlink_on_close(args, taken.control.path,
                                                            handed))
            if (taken.stream_path is not None
                    and unlink_on_close(args, taken.stream_path, handed)):
                with contextlib.suppress(OSError):
                    os.unlink(taken.stream_path)
            if taken.unixgram is not None:
                taken.unixgram.close(unlink=unlink_on_close(args, taken.unixgram.path,
                                                             handed))
            transport_stats = taken.transport_stats
        if args.stats:
            _print_stats({**relay.stats(), **transport_stats()})
    return 0


async def _serve(config: RelayConfig, args: argparse.Namespace,
                 interface: InterfaceTransport | None, policy: Policy | None,
                 forwards: list[PortForward]) -> int:
    from relaynat.moving.handover import Source
    from relaynat.relay import Relay
    from relaynat.transports.unixgram import attach_unixgram_fd, serve_unixgram

    extra_stats: Callable[[], dict[str, int]] = dict

    stop = stop_on_signals()
    control = ControlServer(args.control_socket) if args.control_socket else None
    handed = asyncio.Event() if control is None else control.handed_over
    async with Relay(config, policy) as relay:
        _attach_audit(args, relay)
        add_forwards(relay, forwards)
        source = Source(relay, control, stream_path=args.socket)
        if control is not None:
            control.on_quit = stop.set
            await control.start(relay)
            control.on_handover = source.hand_over  # every transport of serve moves
        watch = asyncio.ensure_future(handed.wait())
        watch.add_done_callback(lambda _: stop.set())
        if args.socket:
            relay.serve_stream(args.socket)
            log.info("listening on %s", args.socket)
            confine_relay(args, relay)
            await stop.wait()
            if (unlink_on_close(args, args.socket, handed.is_set())
                    and os.path.exists(args.socket)):
                os.unlink(args.socket)
        elif args.unixgram:
            server = source.unixgram = serve_unixgram(relay, args.unixgram)
            extra_stats = server.stats
            log.info("bound %s", args.unixgram)
            confine_relay(args, relay)
            await stop.wait()
            # After a handover the path is the new relay's.
            server.close(unlink=unlink_on_close(args, args.unixgram, handed.is_set()))
        else:
            attached: list[Callable[[], dict[str, int]]] = []

            def attach() -> None:
                if interface is not None:
                    relay.attach(interface)
                    attached.append(interface.stats)
                elif _socket_type(args.fd) == socket.SOCK_DGRAM:
                    attached.append(attach_unixgram_fd(relay, args.fd).stats)
                else:
                    relay.attach_stream_fd(args.fd)

            _attach_or_wait(control, attach, args.incoming)
            confine_relay(args, relay)
            await until_stopped(relay, stop)
            extra_stats = attached[0] if attached else dict
        watch.cancel()
        if control is not None:
            control.close(unlink=unlink_on_close(args, control.path, handed.is_set()))
        if args.stats:
            _print_stats({**relay.stats(), **extra_stats()})
    return 0


def _attach_or_wait(control: ControlServer | None, attach: Callable[[], None],
                    incoming: bool) -> None:
    """Attach the guest now, or (`--incoming`) once flows moving here are imported:
    a guest frame of a flow not imported yet would be answered with a RST."""
    if incoming:
        assert control is not None  # main() refuses --incoming without it
        control.after_import = attach
        log.info("waiting for `relaynat ctl import` before serving the guest")
    else:
        attach()


#: What a terminal's ^C and ^\ send, to its whole foreground process group.
_TERMINAL_KEYS = (signal.SIGINT, signal.SIGQUIT)


def _controlling_tty() -> int | None:
    """The controlling terminal, opened while paths still lead to it (confinement
    leaves the filesystem); None without one (ENXIO)."""
    try:
        return os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None


def _terminal_may_have_sent(tty: int | None) -> bool:
    """This process's group is the foreground group of its controlling terminal `tty`,
    whose ^C and ^\\ then reached it: the command has them from the terminal too."""
    if tty is None:
        return False
    try:
        return os.tcgetpgrp(tty) == os.getpgrp()
    except OSError:
        return False


async def _let_control_go(control: ControlServer) -> None:
    """Once a handover is answered, the control socket is the new relay's, which serves
    it on the same path: close this copy, while this process waits for the command."""
    await control.handed_over.wait()
    control.close(unlink=False)


#: A `-T`/`-U` forward: (proto, family 4 or 6, guest port, host port).
LoopbackForward = tuple[str, int, int, int]


def _start_splicing(args: argparse.Namespace, loopback: list[LoopbackForward],
                    pid: int | None, target: JoinTarget | None,
                    forwards: list[PortForward]) -> NamespaceSockets | None:
    """The guest namespace's socket factory (netns/ns_sockets.py) for spliced forwards
    and -T/-U, started before the relay confines itself; None with --no-splice or with
    neither a TCP forward nor a control socket (that may add one), or,
    when there are no -T/-U, if it cannot start (the forwards then take the guest's
    link, with a warning). A -T/-U port that cannot be bound is warned about."""
    if args.no_splice or not (loopback or args.control_socket
                              or any(f.proto == "tcp" for f in forwards)):
        return None  # nothing to splice, now or later (ctl add)
    from relaynat.netns.ns_sockets import GuestListener, for_guest

    listen = [GuestListener(proto, family, guest) for proto, family, guest, _ in loopback]
    if target is not None:
        joined = target
        return open_splice_factory("relaynat run", lambda: for_guest(
            None, joined.netns_fd, joined.userns_fd, listen), bool(loopback))
    return open_splice_factory("relaynat run", lambda: for_guest(pid, listen=listen),
                               bool(loopback))


def open_splice_factory(prog: str, start: Callable[[], NamespaceSockets],
                        needed: bool) -> NamespaceSockets | None:
    """`start()`: a namespace's socket factory, each of its errors warned about under
    `prog`'s name. One that cannot start is a NamespaceSetupError when -T/-U need it
    (`needed`), else a warning and None (forwarded ports take the guest's link)."""
    from relaynat.netns.guest import NamespaceSetupError
    from relaynat.netns.ns_sockets import NamespaceSocketsError

    try:
        factory = start()
    except NamespaceSocketsError as exc:
        if needed:
            raise NamespaceSetupError(f"-T/-U: {exc}") from None
        print(f"{prog}: warning: {exc}; forwarded ports go through the guest's link",
              file=sys.stderr)
        return None
    for error in factory.errors:
        print(f"{prog}: warning: {error}", file=sys.stderr)
    return factory


def _serve_spliced(relay: Relay, factory: NamespaceSockets | None,
                   loopback: list[LoopbackForward]) -> None:
    if factory is None:
        return
    from relaynat.netns.ns_sockets import GuestListener, serve

    serve(relay, factory, [(GuestListener(proto, family, guest), host)
                           for proto, family, guest, host in loopback])


async def _run(config: RelayConfig, args: argparse.Namespace, policy: Policy | None,
               forwards: list[PortForward], target: JoinTarget | None = None,
               loopback: list[LoopbackForward] | None = None) -> int:
    from relaynat.moving.handover import Source
    from relaynat.netns.guest import NamespaceGuest, NamespaceSetupError, run_command

    # This process is the command's stand-in: a service manager's SIGTERM or a
    # terminal's SIGHUP meant for it is passed on (forward_signals), so the command
    # ends as it would on its own and its status is ours.
    holder: list[Relay] = []
    guests: list[NamespaceGuest] = []
    # Bound before the guest starts, so a bad path fails first; served once the relay is.
    control = ControlServer(args.control_socket) if args.control_socket else None
    started: set[asyncio.Task[None]] = set()
    loopback = loopback or []
    factories: list[NamespaceSockets] = []

    def ready(relay: Relay) -> None:
        holder.append(relay)
        _attach_audit(args, relay)
        _serve_spliced(relay, factories[0] if factories else None, loopback)
        add_forwards(relay, forwards)
        if control is not None:
            started.add(asyncio.ensure_future(control.start(relay)))
            control.on_handover = Source(relay, control, guest=guests[0]).hand_over
            started.add(asyncio.ensure_future(_let_control_go(control)))
        confine_relay(args, relay)

    # A terminal's ^C and ^\ go to its whole foreground process group: the command
    # has them from the terminal and decides what they do (a REPL or a shell's prompt
    # goes on). This process stays until the command exits, as `unshare --fork` does,
    # rather than die of them and leave the command running without a network, or
    # kill a command that meant to go on. Sent by anything else, they are passed on.
    pending: list[int] = []

    def guest_ready(guest: NamespaceGuest) -> None:
        guests.append(guest)
        factory = _start_splicing(args, loopback, guest.proc.pid, target, forwards)
        if factory is not None:
            factories.append(factory)
        for signum in pending:
            guest.send_signal(signum)

    tty = _controlling_tty()

    def terminal_key(signum: int) -> None:
        if _terminal_may_have_sent(tty):
            return
        if guests:
            guests[0].send_signal(signum)
        else:
            pending.append(signum)

    loop = asyncio.get_running_loop()
    for signum in _TERMINAL_KEYS:
        loop.add_signal_handler(signum, terminal_key, signum)
    try:
        code = await run_command(config, args.command, tap_name=args.tap_name,
                                 offload=not args.no_offload, relay_ready=ready,
                                 policy=policy,
                                 hide_paths=[os.path.abspath(args.control_socket)]
                                 if args.control_socket else (), guest_ready=guest_ready,
                                 runas=args.runas, forward_signals=True, join=target,
                                 configure=not args.no_configure)
    except NamespaceSetupError as exc:
        print(f"relaynat run: {exc}", file=sys.stderr)
        return 1
    finally:
        if tty is not None:
            os.close(tty)
        for signum in _TERMINAL_KEYS:
            loop.remove_signal_handler(signum)
        for task in started:  # a start still pending would serve a closed socket
            task.cancel()
        for factory in factories:
            factory.close()
        if control is not None:
            handed = guests and guests[0].released
            if handed:  # the command is the new relay's: the handover was answered
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(control.handed_over.wait(), 5)
            control.close(unlink=unlink_on_close(args, control.path, bool(handed)))
    if args.stats and holder:
        _print_stats(holder[0].stats())
    return code


async def _run_joined(config: RelayConfig, args: argparse.Namespace, policy: Policy | None,
                      forwards: list[PortForward], target: JoinTarget,
                      loopback: list[LoopbackForward] | None = None) -> int:
    """`run --netns TARGET` without a command: serve a TAP in TARGET's network namespace
    until SIGINT or SIGTERM, `relaynat ctl quit`, a handover, or (a PID TARGET) the
    target process's exit, seen on its pidfd (readable once it exits, pidfd_open(2))."""
    from relaynat.moving.handover import Source
    from relaynat.netns.guest import NamespaceSetupError, open_joined_tap
    from relaynat.relay import Relay

    # Before the TAP exists, so a signal sent once it shows ends the relay cleanly.
    stop = stop_on_signals()
    control = ControlServer(args.control_socket) if args.control_socket else None
    try:
        transport = await open_joined_tap(config, target, tap_name=args.tap_name,
                                          offload=not args.no_offload,
                                          configure=not args.no_configure)
    except NamespaceSetupError as exc:
        print(f"relaynat run: {exc}", file=sys.stderr)
        if control is not None:
            control.close()
        return 1
    loopback = loopback or []
    try:
        factory = _start_splicing(args, loopback, None, target, forwards)
    except NamespaceSetupError as exc:
        print(f"relaynat run: {exc}", file=sys.stderr)
        transport.close()
        if control is not None:
            control.close()
        return 1
    loop = asyncio.get_running_loop()
    if target.pidfd is not None:
        loop.add_reader(target.pidfd, stop.set)
    handed = asyncio.Event() if control is None else control.handed_over
    try:
        async with Relay(config, policy) as relay:
            _attach_audit(args, relay)
            relay.attach(transport)
            _serve_spliced(relay, factory, loopback)
            add_forwards(relay, forwards)
            if control is not None:
                control.on_quit = stop.set
                await control.start(relay)
                # The TAP, the forwards and the control socket move; the watch on the
                # target process does not (the new relay serves until it is stopped).
                control.on_handover = Source(relay, control).hand_over
            confine_relay(args, relay)
            watch = asyncio.ensure_future(handed.wait())
            watch.add_done_callback(lambda _: stop.set())
            await until_stopped(relay, stop)
            watch.cancel()
            if control is not None:
                control.close(unlink=unlink_on_close(args, control.path,
                                                      handed.is_set()))
            if args.stats:
                _print_stats(relay.stats())
    finally:
        if target.pidfd is not None:
            loop.remove_reader(target.pidfd)
        if factory is not None:
            factory.close()
    return 0


def _open_interface(args: argparse.Namespace,
                    config: RelayConfig) -> tuple[InterfaceTransport, RelayConfig]:
    """Attach to `--interface` and fit the guest MTU to it: without `--mtu` the
    interface's own MTU (the VMM gave the guest a NIC of that size); a larger `--mtu`
    is refused, as the kernel refuses plain frames over the MTU (EMSGSIZE)."""
    interface = InterfaceTransport.open(args.interface, vnet_hdr=not args.no_vnet_hdr)
    try:
        if args.mtu is None:
            config = dataclasses.replace(config, mtu=min(interface.mtu, MAX_MTU)).validate()
        elif args.mtu > interface.mtu:
            raise ConfigError(f"--mtu {args.mtu} is larger than the MTU of interface "
                              f"{args.interface} ({interface.mtu}): give --mtu "
                              f"{interface.mtu} or raise the interface's MTU")
    except ConfigError:
        interface.close()
        raise
    return interface, config


def _check_incoming(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.interface is None and args.fd is None:
        parser.error("--incoming needs --interface or --fd (a guest link that exists "
                     "before the import); with --socket or --unixgram, import before the "
                     "guest connects")
    if not args.control_socket:
        parser.error("--incoming needs --control-socket (the import comes through it)")


#: Descriptors beside the flows and forwards: transports, epoll, timers, the DNS
#: server, stdio, the control socket.
_FD_HEADROOM = 256


def raise_fd_limit(config: RelayConfig, forwards: list[PortForward]) -> None:
    """Make RLIMIT_NOFILE cover what the options ask for: one socket per forwarded
    port (`-t all` alone is 49151) and per flow at the configured maxima. passt raises
    its limit the same way; a process that may not (no CAP_SYS_RESOURCE past the hard
    limit) keeps what it has, and a bind or flow beyond it is refused with EMFILE."""
    need = (sum(len(f) for f in forwards) + config.max_tcp_flows + config.max_udp_flows
            + config.max_icmp_flows + _FD_HEADROOM)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                ceiling = int(f.read())
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, ceiling),
                                                        min(need, ceiling)))
            return
        except (OSError, ValueError):
            need = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cmd == "ctl":
        from relaynat.control.client import main as ctl_main

        return ctl_main(args)
    logging.basicConfig(level=args.log_level.upper(),
                        format="relaynat %(levelname)s %(name)s: %(message)s")
    if args.cmd == "demo":
        from relaynat.cli.demo import run_demo

        return run_demo(args.size_mib)
    if args.cmd == "run":
        if args.command and args.command[0] == "--":
            args.command = args.command[1:]
        if not args.command and args.netns is None:
            parser.error("run: give the command to run after --, e.g. relaynat run -- curl URL")
        if args.no_configure and args.netns is None:
            parser.error("--no-configure needs --netns (a namespace relaynat makes is "
                         "always configured)")
        if args.runas is not None and args.netns is not None:
            parser.error("--runas: with --netns, CMD runs with your own ids, as ip netns "
                         "exec runs it")
        if args.runas is not None and os.geteuid() != 0:
            parser.error("--runas needs root: without it the command's root is you outside "
                         "its namespace")
    try:
        unconfined = resolve_confinement(args)
        config = config_from_args(args)
        policy = policy_from_args(args, config)
        forwards = forwards_from_args(args)
        loopback = loopback_forwards_from_args(args) if args.cmd == "run" else []
    except ConfigError as exc:
        parser.error(str(exc))
    if loopback and args.no_splice:
        parser.error("-T and -U are spliced: not with --no-splice")
    if unconfined is not None:
        log.warning("this relay is not confined (give --no-confine to say so): %s",
                    unconfined)
    raise_fd_limit(config, forwards)
    if args.cmd == "serve" and args.receive_handover and (forwards or args.control_socket):
        parser.error("--receive-handover: the forwards and the control socket come from "
                     "the relay that hands over (change forwards with relaynat ctl after)")
    if args.cmd == "serve" and args.fd is not None and args.fd < 0:
        parser.error(f"--fd {args.fd}: not a file descriptor")
    if args.cmd == "serve" and args.incoming:
        _check_incoming(args, parser)
    interface = None
    if args.cmd == "serve" and args.interface is not None:
        try:
            interface, config = _open_interface(args, config)
        except InterfaceError as exc:
            print(f"relaynat serve: {exc.strerror}", file=sys.stderr)
            return 1
        except ConfigError as exc:
            parser.error(str(exc))
    target = None
    if args.cmd == "run" and args.netns is not None:
        from relaynat.netns.join import resolve_target

        try:
            target = resolve_target(args.netns)
        except ConfigError as exc:
            parser.error(str(exc))
    if args.audit:
        from relaynat.audit import AuditLog

        try:
            args.audit_log = AuditLog(args.audit)
        except OSError as exc:
            parser.error(f"--audit {args.audit}: {exc.strerror}")
    confining = args.cmd in ("run", "serve") and args.confine
    threads = LoopThreads.confining() if confining else LoopThreads(new_loop())
    args.loop_threads, loop = threads, threads.loop
    try:
        if target is not None and not args.command:
            coro = _run_joined(config, args, policy, forwards, target, loopback)
        elif args.cmd == "run":
            coro = _run(config, args, policy, forwards, target, loopback)
        elif args.receive_handover:
            coro = _serve_handed_over(config, args, policy)
        else:
            coro = _serve(config, args, interface, policy, forwards)
        return loop.run_until_complete(coro)
    except (OSError, ForwardError, ConfinementError) as exc:
        print(f"relaynat {args.cmd}: {exc}", file=sys.stderr)
        return 1
    finally:
        loop.close()
        if target is not None:
            target.close()
        if args.audit:
            args.audit_log.close()
        janitor: Janitor | None = getattr(args, "janitor", None)
        if janitor is not None:  # the sockets are closed: their files go now
            janitor.finish()
