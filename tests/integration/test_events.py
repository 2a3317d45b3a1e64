"""Events from a real guest kernel: a namespace guest takes a DHCP lease with busybox
udhcpc, uploads and downloads over TCP, pings, is refused by the policy and exits; its
relay's events say so, with the bytes each way (tests/unit/test_events.py has the
records, their delivery and the relay's paths one by one, transport lost included, with
`InMemoryGuest`)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import GUESTS
from support.relaynat_cli import guest_python
from support.sysctl import ALL_GROUPS, ping_group_range

from relaynat import (
    Endpoint,
    Event,
    FlowClosed,
    FlowDenied,
    FlowOpened,
    GuestReady,
    Guests,
    Policy,
    RelayConfig,
)
from relaynat.netns.guest import NamespaceGuest
from relaynat.policy import Rule

pytestmark = pytest.mark.integration
pytest_plugins = ["support.guest_fs"]

UPLOAD, DOWNLOAD = 100_000, 300_000
DENIED_PORT = 9


@contextlib.contextmanager
def host_server(serve: str) -> Iterator[int]:
    """A one-connection TCP server on 127.0.0.1 in a thread: "sink" reads to EOF and
    closes, "source" sends DOWNLOAD bytes and closes. Yields its port."""
    listener = socket.create_server(("127.0.0.1", 0))

    def run() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                if serve == "sink":
                    while conn.recv(65536):
                        pass
                else:
                    conn.sendall(b"d" * DOWNLOAD)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    thread.join(30)


def test_a_namespace_guest_s_life_in_events(guest_dir: Path) -> None:
    out = guest_dir / "out"
    py = guest_python()

    async def main(sink: int, source: int) -> tuple[list[Event], list[Event]]:
        events: list[Event] = []
        config = RelayConfig(ipv6=False)
        policy = Policy([Rule("deny", "tcp", ("host",), ((DENIED_PORT, DENIED_PORT),),
                              comment="discard is not for guests")])
        script = " && ".join([
            "busybox udhcpc -i tap0 -n -q -f -s /bin/true -t 5 >/dev/null 2>&1",
            f"head -c {UPLOAD} /dev/zero | {py} {GUESTS / 'tcp_send_stdin.py'} 10.0.2.2 {sink}",
            f"socat -u TCP:10.0.2.2:{source} STDOUT | wc -c > {out}",
            "ping -c 1 -W 5 10.0.2.2 >/dev/null",
            f"{py} {GUESTS / 'tcp_connect_error.py'} 10.0.2.2 {DENIED_PORT} >> {out}",
        ])
        async with Guests() as guests:
            guests.subscribe(events.append)
            guest = await NamespaceGuest.spawn(config, ["sh", "-c", script], tap_name="tap0")
            relay = guests.add("ns", config, policy)
            relay.attach(guest.transport)
            guest.go()
            assert await asyncio.wait_for(guest.wait(), 60) == 0
            closing = len(events)
        return events[:closing], events[closing:]

    with ping_group_range(ALL_GROUPS), host_server("sink") as sink, \
            host_server("source") as source:
        events, at_close = asyncio.run(main(sink, source))
    assert out.read_text().split() == [str(DOWNLOAD), "ConnectionRefusedError"]
    assert {e.guest for e in events + at_close} == {"ns"}

    ready = [e for e in events if isinstance(e, GuestReady)]
    assert [e.source for e in ready][:1] == ["mac"]
    assert any(e.source == "dhcp" and e.ipv4 == "10.0.2.15" for e in ready), ready

    opened = [e for e in events if isinstance(e, FlowOpened)]
    closed = [e for e in events + at_close if isinstance(e, FlowClosed)]
    by_far = {(e.protocol, e.far.port): e for e in closed}
    upload, download = by_far["tcp", sink], by_far["tcp", source]
    assert (upload.bytes_from_guest, upload.bytes_to_guest, upload.how) == (
        UPLOAD, 0, "closed")
    assert (download.bytes_from_guest, download.bytes_to_guest, download.how) == (
        0, DOWNLOAD, "closed")
    assert {(e.protocol, e.far.port) for e in opened} == set(by_far)
    ping = by_far["icmp", None]
    assert ping.bytes_from_guest == ping.bytes_to_guest > 0
    # A ping session ends at its idle timeout or with the relay, here when Guests closes.
    assert ping.how == "detached" and at_close == [ping]
    [denied] = [e for e in events if isinstance(e, FlowDenied)]
    assert (denied.far, denied.rule, denied.comment) == (
        Endpoint("10.0.2.2", DENIED_PORT), 0, "discard is not for guests")
