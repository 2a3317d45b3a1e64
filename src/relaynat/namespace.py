"""Namespace mode (`relaynat run -- CMD`): a command in a new network namespace whose
only link is the relay's TAP, pasta-style.

The relay process stays in its own (host) network namespace, where its host sockets
must live. A child process (`python -m relaynat.namespace_child`) unshares a new network
namespace (plus a user namespace when not root, mapping the caller to root inside so
that it may configure its links), creates the TAP there, configures address, route
and MTU, and passes the TAP fd back over a unix socket with SCM_RIGHTS: a TAP fd keeps
working from any namespace once opened. The child then waits for the relay to be
attached before it execs the command, so the command's first packet is never lost.
The child also gets a private mount namespace in which /etc/resolv.conf names the
relay's DNS address, so the command resolves names through the relay.
"""

from __future__ import annotations

import array
import asyncio
import json
import signal
import socket
import sys
from collections.abc import Callable, Sequence

from relaynat.config import RelayConfig
from relaynat.policy import Policy
from relaynat.relay import Relay
from relaynat.tap import TapTransport

_READY_TIMEOUT_S = 30.0


class NamespaceSetupError(RuntimeError):
    """The namespace child could not set the guest up; the message says why."""


async def run_command(config: RelayConfig, command: list[str], *, tap_name: str = "tap0",
                      offload: bool = True,
                      relay_ready: Callable[[Relay], object] | None = None,
                      policy: Policy | None = None, hide_paths: Sequence[str] = ()) -> int:
    """Run `command` as a namespace guest of a new relay; return its exit status
    (128 + N if a signal N ended it), as a shell would report it. `relay_ready` is
    called with the relay once the guest's link is attached (e.g. to add forwards);
    `policy` is the egress policy for the guest's flows; `hide_paths` (the control
    socket) are covered by /dev/null in the guest's mount namespace."""
    if not command:
        raise ValueError("no command to run")
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
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relaynat.namespace_child", spec, str(child_sock.fileno()), "--",
        *command, pass_fds=[child_sock.fileno()])
    child_sock.close()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, proc.send_signal, signum)
    try:
        parent_sock.settimeout(_READY_TIMEOUT_S)
        try:
            msg, ancdata, _, _ = await asyncio.to_thread(
                parent_sock.recvmsg, 4096, socket.CMSG_SPACE(4))
        except TimeoutError:
            proc.kill()
            raise NamespaceSetupError("namespace child did not report in time") from None
        fds = array.array("i")
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        if not fds:
            await proc.wait()
            raise NamespaceSetupError(msg.decode(errors="replace") or "namespace setup failed")
        info = json.loads(msg)
        async with Relay(config, policy) as relay:
            relay.attach(TapTransport(fds[0], info["vnet_hdr_len"], info["offload"]))
            if relay_ready is not None:
                relay_ready(relay)
            parent_sock.send(b"go")
            returncode = await proc.wait()
    finally:
        parent_sock.close()
        for signum in (signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return 128 - returncode if returncode < 0 else returncode
