#!/usr/bin/env python3
"""A microVM launcher with relaynat in-process: the relay runs on this process's asyncio
loop, qemu is a child, and the two share one end each of a socketpair.

    python3 examples/qemu_launcher.py --kernel vmlinuz --initrd initrd.img \\
        --append "console=ttyS0 quiet" [--accel tcg] [-- EXTRA QEMU ARGS...]

qemu's serial console is this process's stdout. The guest's DHCP lease and the loss of
its link are reported on stderr as they happen (`Relay.subscribe`). When qemu exits, the
relay's counters that are not zero are printed on stderr (`name value`, one a line, as
`relaynat serve --stats` prints them) and the launcher exits with qemu's status (128+N
if signal N ended it).

Why a socketpair and not `relaynat serve --socket PATH`: no socket file to create,
name or clean up, no window in which qemu (7.2 connects once, at startup) could start
before the relay listens, and the guest's link lives exactly as long as this process.
qemu takes the inherited descriptor with `-netdev stream,addr.type=fd,addr.str=N`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys

from relaynat import Event, GuestReady, Relay, RelayConfig, TransportLost


def qemu_argv(args: argparse.Namespace, fd: int) -> list[str]:
    """One virtio-net NIC on the relay's stream socket, serial console on stdout."""
    argv: list[str] = [args.qemu,
            "-machine", f"q35,accel={args.accel}", "-cpu", "max",
            "-m", str(args.memory), "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
            "-serial", "stdio", "-no-reboot",
            "-kernel", args.kernel, "-append", args.append]
    if args.initrd:
        argv += ["-initrd", args.initrd]
    # server=off: qemu is the client of a socket that is already connected; romfile=
    # skips the PXE option ROM, which a direct kernel boot never uses.
    argv += ["-netdev", f"stream,id=n0,server=off,addr.type=fd,addr.str={fd}",
             "-device", f"virtio-net-pci,netdev=n0,mac={args.mac},romfile="]
    extra: list[str] = args.qemu_args
    return argv + extra


def report(event: Event) -> None:
    """What a launcher's user wants to see of the guest's network: when the guest took
    its address, and when its link went away."""
    if isinstance(event, GuestReady) and event.source == "dhcp":
        print(f"relaynat: guest ready at {event.ipv4} ({event.mac})", file=sys.stderr)
    elif isinstance(event, TransportLost):
        print(f"relaynat: guest link lost: {event.reason}", file=sys.stderr)


async def launch(args: argparse.Namespace) -> int:
    config = RelayConfig(mtu=args.mtu)  # defaults as slirp: 10.0.2.15/24 via 10.0.2.2
    async with Relay(config) as relay:
        relay.subscribe(report)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        relay.attach_stream_fd(ours.detach())  # the relay owns this end from now on
        with theirs:
            qemu = await asyncio.create_subprocess_exec(
                *qemu_argv(args, theirs.fileno()), stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),))
        # Closed here, so the relay sees the link end (EOF) when qemu exits.
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):  # stop the VM, then report
            loop.add_signal_handler(signum, qemu.send_signal, signum)
        status = await qemu.wait()
        stats = relay.stats()
    for name in sorted(name for name, value in stats.items() if value):
        print(f"{name:32} {stats[name]}", file=sys.stderr)
    return 128 - status if status < 0 else status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernel", required=True, help="guest kernel (qemu -kernel)")
    p.add_argument("--initrd", help="initramfs (qemu -initrd)")
    p.add_argument("--append", default="console=ttyS0",
                   help="kernel command line (default %(default)s)")
    p.add_argument("--qemu", default="qemu-system-x86_64", help="qemu binary")
    p.add_argument("--accel", default="kvm:tcg",
                   help="qemu accelerators, first that works (default %(default)s)")
    p.add_argument("--memory", type=int, default=256, help="guest RAM, MiB")
    p.add_argument("--mac", default="52:54:00:12:34:56", help="guest MAC address")
    p.add_argument("--mtu", type=int, default=65520,
                   help="MTU the relay offers by DHCP (default %(default)s)")
    p.add_argument("qemu_args", nargs=argparse.REMAINDER,
                   help="after --: more qemu arguments (disks, CPUs, ...)")
    args = p.parse_args(argv)
    if args.qemu_args[:1] == ["--"]:
        args.qemu_args = args.qemu_args[1:]
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(launch(args))
    return 130


if __name__ == "__main__":
    sys.exit(main())
