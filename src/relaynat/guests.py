"""`Guests`: many guests in one process and one event loop.

A sandbox runtime serves tens of guests from one process, as gvproxy serves its VMs,
rather than one relay process per guest as passt does. Each guest here is a whole
`Relay` of its own: its addressing, forwards, egress policy, limits, pcap file and
counters are per guest, and so are its flow tables. What the guests share is the loop
and the process's limits, and that is what this module keeps in view:

- Loop time. Every transport reads a bounded batch per wakeup (128 frames for a TAP,
  and no longer than `transport.WAKEUP_SLICE_S`), so a guest that floods gets its
  turn like the others and no more; frames it sends
  that are malformed, spoofed or over its limits are dropped and counted in its own
  stats. `Relay.handle_frame` confines an internal error to the frame that caused it.
- File descriptors. Each flow holds a host socket, and RLIMIT_NOFILE is the process's:
  a guest allowed 16,384 TCP flows (the default) could take the descriptors the other
  guests need for theirs. `add` warns when the guests' flow maxima together exceed the
  soft limit; give untrusted guests maxima (and a new-flow rate) that fit.

Embedding::

    async with Guests() as guests:
        a = guests.add("a", RelayConfig(), policy=sandbox)
        a.attach(TapTransport(fd_a, vnet_hdr_len, offload))
        b = guests.add("b", RelayConfig(max_tcp_flows=512, new_flow_rate=100))
        b.serve_stream("/run/vm-b.sock")
        ...
        guests.remove("a")          # resets a's flows toward their host peers
        print(guests.stats()["b"])
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

from relaynat.config import RelayConfig
from relaynat.event_hub import DEFAULT_MAXSIZE, EventHub, EventStream
from relaynat.events import Event
from relaynat.policy import Policy
from relaynat.relay import Relay

log = logging.getLogger("relaynat")

#: The RelayConfig maxima of flows that each hold a host socket. A guest's other
#: descriptors (transport, listeners, pcap file) are few; flows are what count.
_FLOW_LIMITS = ("max_tcp_flows", "max_udp_flows", "max_icmp_flows")


class Guests:
    """A set of named guests, each a `Relay`, served by one event loop.

    Use it as an async context manager (or call `start()` inside the running loop and
    `close()` at the end). Guests may be added and removed at any time in between.
    """

    def __init__(self) -> None:
        self._relays: dict[str, Relay] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._warned_fds = False
        # The guests' events, merged: each relay feeds the hub while it has subscribers.
        self._hub = EventHub(None, Counter(), self._listening)
        self._feeds: dict[str, Callable[[], None]] = {}

    async def __aenter__(self) -> Guests:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Bind to the running loop; guests added before this start with it."""
        self._loop = asyncio.get_running_loop()
        for relay in self._relays.values():
            relay.start()

    def add(self, name: str, config: RelayConfig | None = None,
            policy: Policy | None = None, *,
            allow_domains: Iterable[str] | None = None) -> Relay:
        """A new guest called `name`, started; attach its transport to the returned
        relay (`attach`, `serve_stream`, `attach_stream_fd`). `allow_domains` instead of
        `policy`: only those names (`Policy.allow_domains`, `--allow-domain`). Raises
        ValueError if the name is taken and ConfigError if `config` is inconsistent."""
        if not name:
            raise ValueError("a guest needs a non-empty name")
        if name in self._relays:
            raise ValueError(f"a guest named {name!r} already exists")
        relay = Relay(config, policy, name=name, allow_domains=allow_domains)
        if self._loop is not None:
            relay.start()
        self._relays[name] = relay
        if self._hub.listening:
            self._feed(name, relay)
        self._check_descriptors()
        return relay

    def remove(self, name: str) -> None:
        """Close guest `name`: its transport, forwards and flows (reset toward host
        peers, as when a single relay exits; their events are delivered). Raises
        KeyError for an unknown name."""
        relay = self._relays.pop(name)
        relay.close()
        self._unfeed(name)

    def close(self) -> None:
        """Close every guest; `events()` iterations end."""
        while self._relays:
            name, relay = self._relays.popitem()
            relay.close()
            self._unfeed(name)
        self._hub.close()

    # -- events --------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Call `callback(event)` for every guest's events (each names its guest in
        `event.guest`), guests added later included; returns the callable that
        unsubscribes. As `Relay.subscribe`: quick, no blocking, no calls back."""
        return self._hub.subscribe(callback)

    def events(self, maxsize: int = DEFAULT_MAXSIZE) -> EventStream:
        """Every guest's events, merged, as an async iterator (guests added later
        included), ending when `close()` is called. A consumer that falls behind loses
        events, counted as `events_dropped` in the stats of the guest they were about."""
        return self._hub.events(maxsize)

    def _listening(self, listening: bool) -> None:
        # The hub gained its first subscriber or lost its last: the relays feed it or stop.
        for name, relay in self._relays.items():
            if listening:
                self._feed(name, relay)
            else:
                self._unfeed(name)

    def _feed(self, name: str, relay: Relay) -> None:
        hub = self._hub

        def forward(event: Event) -> None:
            dropped = hub.deliver(event)
            if dropped:
                relay.count("events_dropped", dropped)

        self._feeds[name] = relay.subscribe(forward)

    def _unfeed(self, name: str) -> None:
        unsubscribe = self._feeds.pop(name, None)
        if unsubscribe is not None:
            unsubscribe()

    def __getitem__(self, name: str) -> Relay:
        return self._relays[name]

    def __contains__(self, name: object) -> bool:
        return name in self._relays

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._relays))

    def __len__(self) -> int:
        return len(self._relays)

    def stats(self) -> dict[str, dict[str, int]]:
        """Each guest's own counters (`Relay.stats()`), by name."""
        return {name: relay.stats() for name, relay in self._relays.items()}

    def flow_budget(self) -> int:
        """Host sockets the guests' flow maxima allow together: what they may hold of
        the process's descriptors at worst."""
        return sum(getattr(relay.config, limit) for relay in self._relays.values()
                   for limit in _FLOW_LIMITS)

    def _check_descriptors(self) -> None:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        budget = self.flow_budget()
        # One guest alone is a single relay's case (the CLI raises the limit for it).
        if (len(self._relays) > 1 and soft != resource.RLIM_INFINITY and budget > soft
                and not self._warned_fds):
            self._warned_fds = True
            log.warning("the %d guests may hold %d flows together but the process may open "
                        "%d descriptors (RLIMIT_NOFILE): one guest's flows can then starve "
                        "the others' new ones; lower max_tcp_flows/max_udp_flows/"
                        "max_icmp_flows per guest or raise the limit",
                        len(self._relays), budget, soft)
