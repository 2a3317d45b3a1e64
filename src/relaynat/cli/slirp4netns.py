"""`relaynat-slirp4netns`: slirp4netns 1.2's command line, as rootlesskit and podman run
it (`[OPTIONS] PID|PATH [TAPNAME]`), served by relaynat.

It joins the target's network namespace as `relaynat run --netns` does (netns/join.py),
makes the TAP there (configured with `-c`), and serves it with slirp4netns' addressing:
guest 10.0.2.100, gateway 10.0.2.2 (standing for the host's loopback unless
`--disable-host-loopback`), DNS 10.0.2.3; `--cidr` moves them to .100, .2 and .3 of
that network. `--ready-fd` gets "1" once the guest can be served, `--exit-fd` ends it
when it becomes readable (written to or closed), and `--api-socket` speaks slirp4netns'
API (control/slirp4netns_api.py `Slirp4netnsApi`).

`--enable-sandbox` and `--enable-seccomp` both turn on relaynat's confinement
(relaynat.confinement, docs/confinement.md) once the TAP is served and before
`--ready-fd` is written: slirp4netns' sandbox (a mount namespace with an empty root,
capabilities dropped) and its seccomp filter are two parts of what relaynat does as
one unit, so either flag, or both, confines the relay wholly. Without them the relay
is confined when confinement is relaynat's default (`relaynat run`'s), unless
`--no-confine` (relaynat's own option) says otherwise. Both are named in `--help`:
rootlesskit and podman read it and pass them when it names them.

Options relaynat cannot honour are refused at start, saying why, never ignored:
`--disable-dns`, `--outbound-addr`, `--outbound-addr6`, `--macaddress`,
`--target-type=bess`. They are left out of `--help`, which rootlesskit reads to tell
what the binary supports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from ipaddress import IPv4Address, IPv4Network
from typing import TYPE_CHECKING, Any

from relaynat.config import MAX_MTU, ConfigError, RelayConfig
from relaynat.netns.join import JoinTarget, resolve_target

if TYPE_CHECKING:
    from relaynat.confinement.janitor import Janitor
    from relaynat.relay import Relay

log = logging.getLogger("relaynat.slirp4netns")

PROG = "relaynat-slirp4netns"

#: What each refused option would need, for the message.
_REFUSED = {
    "disable_dns": "--disable-dns: relaynat always serves DNS at the DNS address (10.0.2.3)",
    "outbound_addr": "--outbound-addr: relaynat cannot bind outbound connections to an "
                     "address",
    "outbound_addr6": "--outbound-addr6: relaynat cannot bind outbound connections to an "
                      "address",
    "macaddress": "--macaddress: relaynat cannot set the TAP's MAC address",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, usage=f"{PROG} [OPTION]... PID|PATH [TAPNAME]", allow_abbrev=False,
        description="User-mode networking for unprivileged network namespaces, "
                    "slirp4netns-compatible, served by relaynat.")
    p.add_argument("-c", "--configure", action="store_true", help="bring up the interface")
    p.add_argument("-e", "--exit-fd", type=int, metavar="FD",
                   help="specify the FD for terminating slirp4netns")
    p.add_argument("-r", "--ready-fd", type=int, metavar="FD",
                   help="specify the FD to write to when the network is configured")
    p.add_argument("-m", "--mtu", type=int, default=1500,
                   help=f"specify MTU (default=1500, max={MAX_MTU})")
    p.add_argument("-6", "--enable-ipv6", action="store_true", help="enable IPv6")
    p.add_argument("-a", "--api-socket", metavar="PATH", help="specify API socket path")
    p.add_argument("--cidr", default="10.0.2.0/24",
                   help="specify network address CIDR (default=10.0.2.0/24)")
    p.add_argument("--disable-host-loopback", action="store_true",
                   help="prohibit connecting to 127.0.0.1:* on the host namespace")
    p.add_argument("--netns-type", choices=("path", "pid"), default="pid",
                   help="specify network namespace type ([path|pid], default=pid)")
    p.add_argument("--userns-path", metavar="PATH", help="specify user namespace path")
    p.add_argument("--target-type", choices=("netns", "bess"), default="netns",
                   help="specify the target type (netns only)")
    p.add_argument("--enable-sandbox", action="store_true",
                   help="confine the relay once set up: an empty read-only root, nobody "
                        "as root, only the capabilities it needs, and a seccomp "
                        "allowlist (relaynat confines as one unit: the same as "
                        "--enable-seccomp)")
    p.add_argument("--enable-seccomp", action="store_true",
                   help="the same as --enable-sandbox: confine the relay once set up")
    p.add_argument("--no-confine", action="store_true",
                   help="relaynat's own: do not confine the relay even where confinement "
                        "is relaynat's default (weaker); not with --enable-sandbox or "
                        "--enable-seccomp")
    p.add_argument("-v", "--version", action="store_true", help="show version and exit")
    hidden = argparse.SUPPRESS
    p.add_argument("--disable-dns", action="store_true", help=hidden)
    for flag in ("--outbound-addr", "--outbound-addr6", "--macaddress"):
        p.add_argument(flag, help=hidden)
    p.add_argument("target", nargs="?", metavar="PID|PATH")
    p.add_argument("tapname", nargs="?", default="tap0", metavar="TAPNAME")
    return p


def config_for(args: argparse.Namespace) -> RelayConfig:
    """slirp4netns' addressing from `--cidr`, `--mtu`, `-6`, `--disable-host-loopback`."""
    try:
        net = IPv4Network(args.cidr, strict=False)
    except ValueError as exc:
        raise ConfigError(f"--cidr {args.cidr}: not an IPv4 network ({exc})") from None
    if not 1 <= net.prefixlen <= 25:  # as slirp4netns: room for the guest's .100
        raise ConfigError(f"--cidr {args.cidr}: too small or too large (the prefix "
                          "length must be 1 to 25, leaving room for the guest's .100)")
    base = int(net.network_address)
    gateway = IPv4Address(base + 2)
    if not 0 < args.mtu <= MAX_MTU:
        raise ConfigError(f"--mtu {args.mtu}: relaynat serves MTUs up to {MAX_MTU} "
                          "(slirp4netns' 65521 is one more than relaynat allows)")
    config = RelayConfig(guest_ipv4=IPv4Address(base + 100), prefix_len_v4=net.prefixlen,
                         gateway_ipv4=gateway, dns_ipv4=IPv4Address(base + 3),
                         map_host_loopback_v4=None if args.disable_host_loopback else gateway,
                         mtu=args.mtu, ipv6=args.enable_ipv6)
    if args.disable_host_loopback:
        config = dataclasses.replace(config, map_host_loopback_v6=None)
    return config.validate()


def target_for(args: argparse.Namespace) -> JoinTarget:
    """Open the namespace: a PID (`--netns-type=pid`, the default) or a path, and the
    user namespace of `--userns-path` to enter first."""
    text = args.target
    if args.netns_type == "pid" and not text.isdigit():
        raise ConfigError(f"{text}: not a PID (give --netns-type=path for a path)")
    if args.netns_type == "path" and "/" not in text:
        text = os.path.join(".", text)
    try:
        target = resolve_target(text)
    except ConfigError as exc:  # its messages name relaynat run's --netns
        raise ConfigError(str(exc).removeprefix("--netns").lstrip(": ")
                          or f"{text}: not a network namespace") from None
    if args.userns_path is not None:
        try:
            fd = os.open(args.userns_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            target.close()
            raise ConfigError(f"--userns-path {args.userns_path}: {exc.strerror}") from None
        if target.userns_fd is not None:
            os.close(target.userns_fd)
        target.userns_fd = fd if os.geteuid() != 0 else None
        if target.userns_fd is None:
            os.close(fd)  # root of the host enters any network namespace as it is
    return target


def wants_confinement(args: argparse.Namespace, by_default: bool) -> bool:
    """Whether to confine: --enable-sandbox or --enable-seccomp (either, as relaynat
    confines as one unit), else relaynat's default unless --no-confine."""
    if args.enable_sandbox or args.enable_seccomp:
        return True
    return by_default and not args.no_confine


def _refusal(args: argparse.Namespace) -> str | None:
    for name, message in _REFUSED.items():
        if getattr(args, name):
            return message
    if args.no_confine and (args.enable_sandbox or args.enable_seccomp):
        return ("--no-confine: not with --enable-sandbox or --enable-seccomp, which ask "
                "for confinement")
    if args.target_type != "netns":
        return "--target-type=bess: relaynat serves a TAP in a network namespace only"
    return None


def _notify_ready(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, b"1")
    with contextlib.suppress(OSError):
        os.close(fd)


def _confine(args: argparse.Namespace, relay: Relay) -> Janitor | None:
    """Confine this process now that the TAP is served (relaynat.confinement, as
    `relaynat run --confine`): the caller's privileges as root dropped to nobody's with
    CAP_NET_BIND_SERVICE kept for the API's add_hostfwd (a port below
    net.ipv4.ip_unprivileged_port_start); an unprivileged caller keeps its ids and has
    none to keep. The API socket's file is then out of reach: the janitor started here
    removes it once this process has exited (none is started without an API socket:
    nothing to remove). ConfinementError if it could not be done."""
    from relaynat.cli.confining import confine_now
    from relaynat.confinement.janitor import Janitor

    janitor = Janitor.start([args.api_socket]) if args.api_socket else None
    keep = ["CAP_NET_BIND_SERVICE"] if os.geteuid() == 0 and args.api_socket else []
    # open_joined_tap's executor thread ends first: confinement takes one thread.
    confine_now([relay], runas=None, keep=keep, threads=args.loop_threads)
    return janitor


async def serve(config: RelayConfig, args: argparse.Namespace, target: JoinTarget) -> int:
    from relaynat.cli.event_loop import stop_on_signals, until_stopped
    from relaynat.control.slirp4netns_api import Slirp4netnsApi
    from relaynat.netns.guest import NamespaceSetupError, open_joined_tap
    from relaynat.relay import Relay

    loop = asyncio.get_running_loop()
    stop = stop_on_signals()
    api = Slirp4netnsApi(args.api_socket, str(config.guest_ipv4)) if args.api_socket else None
    try:
        transport = await open_joined_tap(config, target, tap_name=args.tapname,
                                          configure=args.configure)
    except NamespaceSetupError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        if api is not None:
            api.close()
        return 1
    watched = [fd for fd in (args.exit_fd, target.pidfd) if fd is not None]
    for fd in watched:
        loop.add_reader(fd, stop.set)
    try:
        async with Relay(config, None) as relay:
            relay.attach(transport)
            if api is not None:
                await api.start(relay)
            if args.confine:
                args.janitor = _confine(args, relay)
            if args.ready_fd is not None:
                _notify_ready(args.ready_fd)
            await until_stopped(relay, stop)
    finally:
        for fd in watched:
            loop.remove_reader(fd)
        if api is not None:
            api.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from importlib.metadata import version

        print(f"{PROG} (relaynat {version('relaynat')}), slirp4netns 1.2 command line")
        return 0
    logging.basicConfig(level="WARNING", format=f"{PROG} %(levelname)s: %(message)s")
    refused = _refusal(args)
    if refused is not None:
        parser.error(refused)
    if args.target is None:
        parser.error("give the PID (or, with --netns-type=path, the path) of the network "
                     "namespace")
    for name in ("exit_fd", "ready_fd"):
        fd = getattr(args, name)
        if fd is not None:
            try:
                os.fstat(fd)
            except OSError:
                parser.error(f"--{name.replace('_', '-')} {fd}: not an open descriptor")
    try:
        config = config_for(args)
        target = target_for(args)
    except ConfigError as exc:
        parser.error(str(exc))
    from relaynat.cli.options import CONFINE_BY_DEFAULT

    args.confine = wants_confinement(args, CONFINE_BY_DEFAULT)
    args.janitor = None
    return _run(args, lambda: serve(config, args, target), target)


def _run(args: argparse.Namespace, main: Callable[[], Coroutine[Any, Any, int]],
         target: JoinTarget) -> int:
    """`main()` on a new loop, closed after: its exit status, or 1 for an OSError or a
    confinement that failed (the message under PROG's name). A loop of a relay that
    confines itself is made without libuv's io_uring and with a default executor
    whose threads can be ended (confinement/seccomp_filter.py, cli/confining.py)."""
    from relaynat.cli.event_loop import new_loop
    from relaynat.confinement import ConfinementError

    if args.confine:
        from relaynat.cli.confining import LoopThreads

        threads = LoopThreads.confining()
        args.loop_threads, loop = threads, threads.loop
    else:
        loop = new_loop()
    try:
        return loop.run_until_complete(main())
    except (OSError, ConfinementError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    finally:
        loop.close()
        target.close()
        if args.janitor is not None:  # the API socket is closed: its file goes now
            args.janitor.finish()


if __name__ == "__main__":
    sys.exit(main())
