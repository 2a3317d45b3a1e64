"""Properties of the whole relay core under any guest frame sequence.

Each example runs a fresh `Relay` (through relaynat.testing.InMemoryGuest: the real
stream transport on a socketpair, real host sockets on loopback) and feeds it a list of
valid frames, broken frames and whole TCP conversations from relaynat.testing's
strategies, one `handle_frame` + `end_of_batch` per frame as a transport would. After
every frame:

* nothing reached `drop_internal_error` and nothing was logged with a traceback
  (handle_frame swallows exceptions, so "never raises" is checked this way);
* a broken frame bumped exactly the counter its label names (frames.py derives the
  label from the parse order: the first check a mutation fails);
* a valid frame bumped no ``drop_`` counter at all;
* the flow tables are consistent and bounded: every TCP flow owns an open socket
  registered under its fd, the pending-connect count matches the flows still
  connecting, opened minus closed equals the flows in the table, and no table
  exceeds its configured limit (kept small here so the limits are reached).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.sysctl import ALL_GROUPS, ping_group_range

from relaynat.config import RelayConfig
from relaynat.testing import InMemoryGuest, LabeledFrame
from relaynat.testing.strategies import broken_frames, frame_sequences, valid_frames

# The relay's ping sockets need ping_group_range set in the suite's private namespace.
pytestmark = pytest.mark.integration

CONFIG = RelayConfig(dns_upstream=IPv4Address("127.0.0.1"), max_tcp_flows=4,
                     max_pending_connects=2, max_udp_flows=4)
FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module", autouse=True)
def ping_sockets_allowed() -> Iterator[None]:
    """Guest pings are valid frames: the relay's ping sockets must be allowed (a new
    namespace allows nobody; test_icmp_echo.py covers the refusal)."""
    with ping_group_range(ALL_GROUPS):
        yield


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def tcp_port(loop: asyncio.AbstractEventLoop) -> Iterator[int]:
    """A loopback server that accepts and reads, so SYNs to it open real flows."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello from the host\n")
        while await reader.read(65536):
            pass
        writer.close()

    server = loop.run_until_complete(asyncio.start_server(serve, "127.0.0.1", 0))
    yield server.sockets[0].getsockname()[1]
    server.close()


@pytest.fixture(scope="module")
def udp_port() -> Iterator[int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


def check_tables(guest: InMemoryGuest) -> None:
    relay, config = guest.relay, guest.config
    tcp, udp = relay._tcp, relay._udp_relay
    assert tcp is not None and udp is not None
    stats = relay.stats()
    assert stats["tcp_flows"] == len(tcp.flows) <= config.max_tcp_flows
    assert len(tcp._by_fd) == len(tcp.flows)
    for flow in tcp.flows.values():
        fd = flow.sock.fileno()
        assert fd >= 0, f"flow {flow.key} holds a closed socket"
        assert tcp._by_fd[fd] is flow
    connecting = sum(flow.connecting for flow in tcp.flows.values())
    assert tcp._pending_connects == connecting <= config.max_pending_connects
    opened = stats.get("tcp_flows_opened", 0) + stats.get("tcp_inbound_opened", 0)
    closed = stats.get("tcp_flows_closed", 0) + stats.get("tcp_flows_closed_on_detach", 0)
    assert opened - closed == len(tcp.flows)
    assert stats["udp_flows"] == len(udp.table) <= config.max_udp_flows
    for flow in udp.table.flows.values():
        assert flow.sock is not None and flow.sock.fileno() >= 0


async def feed(frames: list[LabeledFrame]) -> None:
    errors = _Errors()
    logger = logging.getLogger("relaynat")
    logger.addHandler(errors)
    try:
        async with InMemoryGuest(CONFIG) as guest:
            relay = guest.relay
            for i, frame in enumerate(frames):
                before = relay.stats()
                relay.handle_frame(memoryview(frame.data))
                relay.end_of_batch()
                after = relay.stats()
                changed = {k: after[k] - before.get(k, 0) for k in after
                           if after[k] != before.get(k, 0)}
                where = f"frame {i} ({frame.kind}, expect {frame.expect}): {changed}"
                assert after.get("drop_internal_error", 0) == 0, where
                assert after["frames_in"] == before.get("frames_in", 0) + 1, where
                if frame.expect is not None:
                    assert changed.get(frame.expect) == 1, where
                else:
                    assert not [k for k in changed if k.startswith("drop_")], where
                check_tables(guest)
                if i % 8 == 7:
                    await asyncio.sleep(0)  # let host sockets answer: connects, data, EOF
            await asyncio.sleep(0.01)
            check_tables(guest)
    finally:
        logger.removeHandler(errors)
    assert not errors.records, [r.getMessage() for r in errors.records]


# Ports from the whole range ("any"): this runs in the suite's private namespace, where
# nothing listens but this test's own peers; edge ports (0, 1023, 65535) are checked too.
@FUZZ
@given(frames=st.lists(valid_frames(tcp_port="any", udp_port="any"), min_size=1, max_size=12))
def test_valid_frames_are_never_dropped(loop: asyncio.AbstractEventLoop,
                                        frames: list[LabeledFrame]) -> None:
    loop.run_until_complete(feed(frames))


@FUZZ
@given(frames=st.lists(broken_frames(tcp_port="any", udp_port="any"), min_size=1,
                       max_size=12))
def test_broken_frames_are_counted_under_their_reason(loop: asyncio.AbstractEventLoop,
                                                      frames: list[LabeledFrame]) -> None:
    loop.run_until_complete(feed(frames))


@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_mixed_sequences_keep_tables_consistent(loop: asyncio.AbstractEventLoop,
                                                tcp_port: int, udp_port: int,
                                                data: st.DataObject) -> None:
    frames = data.draw(frame_sequences(tcp_port=tcp_port, udp_port=udp_port, max_size=12))
    loop.run_until_complete(feed(frames))


def test_flow_limit_is_reached_and_refused(loop: asyncio.AbstractEventLoop,
                                           tcp_port: int) -> None:
    """The bound in check_tables is not vacuous: more SYNs than max_tcp_flows to a live
    listener leave exactly the limit in the table and refuse the rest with a RST."""
    from relaynat.testing import frames as f
    from relaynat.wire import SYN

    a = f.DEFAULT_ADDRESSING
    syns = [LabeledFrame(f.tcp_segment(a, False, 50000 + i, tcp_port, 1, 0, SYN), "syn")
            for i in range(CONFIG.max_tcp_flows + 3)]

    async def run() -> dict[str, int]:
        async with InMemoryGuest(CONFIG) as guest:
            for frame in syns:
                guest.relay.handle_frame(memoryview(frame.data))
                await asyncio.sleep(0.02)  # connect() completes, freeing a pending slot
            check_tables(guest)
            return guest.stats()

    stats = loop.run_until_complete(run())
    assert stats["tcp_flows"] == CONFIG.max_tcp_flows
    assert stats["tcp_refused_flow_limit"] == 3
