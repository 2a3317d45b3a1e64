"""Coverage-guided fuzz target: arbitrary bytes as one guest frame into a live relay.

    python fuzz/fuzz_frames.py fuzz/corpus -max_total_time=600

(atheris/libFuzzer flags; `python fuzz/make_corpus.py fuzz/corpus` writes the seed
corpus first). The relay is a real `Relay` on the in-memory stream link
(relaynat.testing.InMemoryGuest) with small flow limits, so flows are opened, refused
and closed as the fuzzer finds SYNs. A crash is any input after which the relay counted
`drop_internal_error` (handle_frame swallows exceptions, so that counter is how "never
raises" shows) or logged an error.

Safety: the fuzzer invents destination addresses, so when run as root outside the test
suite the process first moves into a private network namespace with only `lo`
(netns_util.isolate_network), where every such connect() fails at once; unprivileged,
the relay would really try them, so run it as root or in a sandbox.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

import atheris

# Only the relay is instrumented: hypothesis (imported by relaynat.testing), dpkt and
# numpy would cost a minute of start-up and add no coverage signal about relaynat.
with atheris.instrument_imports(include=["relaynat"]):
    from relaynat.config import RelayConfig
    from relaynat.testing.guest import InMemoryGuest

from relaynat.netns.syscalls import isolate_network

#: Run the event loop (host sockets, timers) and drain the guest link every this many inputs.
LOOP_EVERY = 64


class _FailOnError(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        raise RuntimeError(f"the relay logged an error: {record.getMessage()}")


def make_target() -> tuple[asyncio.AbstractEventLoop, InMemoryGuest]:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    from ipaddress import IPv4Address

    config = RelayConfig(dns_upstream=IPv4Address("127.0.0.1"), max_tcp_flows=64,
                         max_pending_connects=16, max_udp_flows=64)
    guest = InMemoryGuest(config)

    async def start() -> None:
        guest.start()

    loop.run_until_complete(start())
    return loop, guest


def drain(loop: asyncio.AbstractEventLoop, guest: InMemoryGuest) -> None:
    """Let the relay's host side run, and discard what it sent toward the guest."""
    loop.run_until_complete(asyncio.sleep(0))
    sock = guest._sock
    assert sock is not None
    try:
        while sock.recv(1 << 20):
            pass
    except BlockingIOError:
        pass


def main() -> None:
    if os.geteuid() == 0 and os.environ.get("RELAYNAT_TEST_NETNS_DONE") != "1":
        isolate_network()
        os.environ["RELAYNAT_TEST_NETNS_DONE"] = "1"
    logging.getLogger("relaynat").addHandler(_FailOnError(logging.ERROR))
    loop, guest = make_target()
    relay = guest.relay
    count = 0

    def test_one_input(data: bytes) -> None:
        nonlocal count
        relay.handle_frame(memoryview(data))
        relay.end_of_batch()
        if relay.stats().get("drop_internal_error", 0):
            raise RuntimeError("drop_internal_error on this input")
        count += 1
        if count % LOOP_EVERY == 0:
            drain(loop, guest)

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
