"""relaynat: a userspace network relay (NAT) for microVMs and network-namespace guests.

It reads a guest's raw Ethernet frames, answers ARP, NDP, DHCP, DHCPv6 and DNS itself,
and relays the guest's TCP, UDP and ICMP echo flows through ordinary host sockets, as
passt/pasta and slirp4netns do.

The names below are the public API; everything else in the package is internal and
may change. A `Relay` serves one guest, shaped by a `RelayConfig`, over one transport
at a time:

```python
import asyncio
from relaynat import Relay, RelayConfig, TapTransport, open_tap

async def main() -> None:
    config = RelayConfig(mtu=65520, max_tcp_flows=4096)  # ConfigError says what is wrong
    async with Relay(config) as relay:
        relay.serve_stream("/tmp/vm0.sock")               # qemu -netdev stream client
        # or a TAP in this namespace:
        #     relay.attach(TapTransport(*open_tap("tap0")))
        await asyncio.sleep(3600)
        print(relay.stats())

asyncio.run(main())
```

Transports: `StreamTransport` (qemu `-netdev stream`, libkrun, passt's framing; usually
through `Relay.serve_stream`), `UnixgramTransport` (qemu `-netdev dgram`, vfkit,
krunkit; through `serve_unixgram` or `attach_unixgram_fd`), `TapTransport` (a TAP fd,
from `open_tap` or a launcher) and `InterfaceTransport` (the host side of a TAP that
Firecracker or cloud-hypervisor opened). A transport of your own implements
`FrameTransport` and feeds the `FrameSink` it is started with.

`Policy` is the egress policy for the guest's new flows; `Relay.add_forward` opens an
inbound `Forward`. `run_command` runs a command as a namespace guest; `NamespaceGuest`
is such a guest apart from its relay. `Guests` serves many guests, each a `Relay`
with its own configuration, policy, forwards, limits and stats, from one event loop.

What happens to a guest (it is ready, a flow opened, was denied or closed, its link was
lost) arrives as `Event`s, through `Relay.subscribe` or the `Relay.events()` iterator
(`Guests` has both for all its guests); `event_dict` makes one JSON-ready.

Every exception relaynat raises on purpose is an `Error`, and keeps the builtin base it
had before `Error` existed (`ConfigError` and `ForwardError` are `ValueError`s,
`InterfaceError` and `RepairError` `OSError`s, `NamespaceSetupError`,
`ConfinementError` and `RelayClosedError` `RuntimeError`s): `except relaynat.Error`
catches them all, and an `except ValueError` written earlier goes on catching what it
caught.

`confine` is what `relaynat run` and `serve` do once their guests are set up: the
process drops to an unprivileged user and the capabilities it still needs, leaves the
filesystem, and installs a seccomp allowlist (docs/confinement.md). An embedder calls
it once its relays are started, or leaves it to its own sandbox.

`relaynat.testing` (the `testing` extra, which needs hypothesis) has an in-memory
guest and hypothesis strategies of guest frames for tests of your own integration. It
is imported on its own (`from relaynat.testing import InMemoryGuest`), so it is not in
`__all__`.

Importing `relaynat` is cheap: the names below load their modules (and numpy, dpkt,
asyncio) on first use, so a process that needs only the configuration or the CLI's
control client does not pay for the relay.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from relaynat.config import ConfigError, RelayConfig
from relaynat.errors import Error, RelayClosedError

if TYPE_CHECKING:
    # What the lazy __getattr__ below returns, spelled out for type checkers.
    from relaynat.audit import AuditLog
    from relaynat.confinement import Confined, ConfinementError, confine
    from relaynat.event_hub import EventStream
    from relaynat.events import (
        Endpoint,
        Event,
        FlowClosed,
        FlowDenied,
        FlowOpened,
        GuestReady,
        TransportLost,
        event_dict,
        event_from_dict,
    )
    from relaynat.flow_info import FlowInfo
    from relaynat.flow_state import FlowStateError
    from relaynat.guests import Guests
    from relaynat.host.forward import Forward, ForwardError
    from relaynat.moving.handover import HandoverError
    from relaynat.netns.guest import (
        NamespaceGuest,
        NamespaceSetupError,
        open_joined_tap,
        run_command,
    )
    from relaynat.netns.join import JoinTarget, resolve_target
    from relaynat.policy import Decision, Policy, Rule
    from relaynat.relay import Relay
    from relaynat.repair_state import RepairError
    from relaynat.transports.base import FrameSink, FrameTransport
    from relaynat.transports.interface import InterfaceError, InterfaceTransport
    from relaynat.transports.stream import StreamTransport
    from relaynat.transports.tap import TapTransport, open_tap
    from relaynat.transports.unixgram import (
        UnixgramServer,
        UnixgramTransport,
        attach_unixgram_fd,
        serve_unixgram,
    )

# Grouped by use, not sorted: pdoc lists the names in this order.
__all__ = [  # noqa: RUF022
    # One guest's relay, its configuration, and its open flows (`Relay.flows`).
    "Relay",
    "RelayConfig",
    "FlowInfo",
    # Many guests, one event loop.
    "Guests",
    # What happened to a guest: events (`Relay.subscribe`, `Relay.events`).
    "Event",
    "GuestReady",
    "FlowOpened",
    "FlowDenied",
    "FlowClosed",
    "TransportLost",
    "Endpoint",
    "EventStream",
    "event_dict",
    "event_from_dict",
    "AuditLog",
    # Egress policy and inbound forwards.
    "Decision",
    "Forward",
    "Policy",
    "Rule",
    # Transports.
    "FrameSink",
    "FrameTransport",
    "InterfaceTransport",
    "StreamTransport",
    "TapTransport",
    "UnixgramServer",
    "UnixgramTransport",
    "attach_unixgram_fd",
    "open_tap",
    "serve_unixgram",
    # Namespace guests.
    "NamespaceGuest",
    "run_command",
    "JoinTarget",
    "resolve_target",
    "open_joined_tap",
    # Confining the process once its guests are set up.
    "confine",
    "Confined",
    # Exceptions: each is an `Error` and keeps its builtin base (ConfigError is a
    # ValueError, InterfaceError an OSError, ...).
    "Error",
    "ConfigError",
    "ConfinementError",
    "FlowStateError",
    "ForwardError",
    "HandoverError",
    "InterfaceError",
    "NamespaceSetupError",
    "RelayClosedError",
    "RepairError",
]
__version__ = "0.1.0"
__docformat__ = "markdown"

#: Public name -> the module that defines it, imported on first access (PEP 562).
_LAZY = {
    "AuditLog": "relaynat.audit",
    "Confined": "relaynat.confinement",
    "ConfinementError": "relaynat.confinement",
    "confine": "relaynat.confinement",
    "Decision": "relaynat.policy",
    "Endpoint": "relaynat.events",
    "Event": "relaynat.events",
    "EventStream": "relaynat.event_hub",
    "FlowClosed": "relaynat.events",
    "FlowDenied": "relaynat.events",
    "FlowInfo": "relaynat.flow_info",
    "FlowOpened": "relaynat.events",
    "FlowStateError": "relaynat.flow_state",
    "Forward": "relaynat.host.forward",
    "ForwardError": "relaynat.host.forward",
    "FrameSink": "relaynat.transports.base",
    "FrameTransport": "relaynat.transports.base",
    "GuestReady": "relaynat.events",
    "Guests": "relaynat.guests",
    "HandoverError": "relaynat.moving.handover",
    "InterfaceError": "relaynat.transports.interface",
    "InterfaceTransport": "relaynat.transports.interface",
    "JoinTarget": "relaynat.netns.join",
    "NamespaceGuest": "relaynat.netns.guest",
    "NamespaceSetupError": "relaynat.netns.guest",
    "Policy": "relaynat.policy",
    "Relay": "relaynat.relay",
    "RepairError": "relaynat.repair_state",
    "Rule": "relaynat.policy",
    "StreamTransport": "relaynat.transports.stream",
    "TapTransport": "relaynat.transports.tap",
    "TransportLost": "relaynat.events",
    "UnixgramServer": "relaynat.transports.unixgram",
    "UnixgramTransport": "relaynat.transports.unixgram",
    "attach_unixgram_fd": "relaynat.transports.unixgram",
    "event_dict": "relaynat.events",
    "event_from_dict": "relaynat.events",
    "open_joined_tap": "relaynat.netns.guest",
    "open_tap": "relaynat.transports.tap",
    "resolve_target": "relaynat.netns.join",
    "run_command": "relaynat.netns.guest",
    "serve_unixgram": "relaynat.transports.unixgram",
}

if not TYPE_CHECKING:
    # Hidden from type checkers, which see the imports above instead: a module-level
    # __getattr__ would make every misspelt `relaynat.X` type-check as valid.
    def __getattr__(name: str) -> object:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module 'relaynat' has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value  # later lookups skip __getattr__ (and pdoc finds it)
        return value

    def __dir__() -> list[str]:
        return sorted(set(globals()) | set(__all__))
