"""Guests' pings through raw ICMP sockets where ping sockets are refused
(relaynat.host.icmp_raw; the pure part: tests/unit/test_icmp_raw_ids.py).

`net.ipv4.ping_group_range` is "1 0" in a new network namespace (nobody may open ping
sockets, root included); the suite runs as root, so the relay falls back to raw sockets.
The tests hold the range at "1 0" (support/sysctl.py restores it), and the command-line
test runs in a namespace of its own, made fresh for it, whose range it checks.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
from support.relaynat_cli import parse_stats
from support.sysctl import ping_group_range
from unit.test_icmp_echo_frames import (
    CONFIG,
    GATEWAY_IP,
    GUEST_IP,
    check_reply,
    icmp_message,
)

from integration.test_icmp_echo import Guest, ping
from relaynat.events import Endpoint, Event, FlowClosed, FlowOpened
from relaynat.host.icmp_relay import IcmpEchoRelay
from relaynat.icmp_echo import ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, ICMPV6_ECHO_REPLY
from relaynat.testing import frames
from relaynat.testing.guest import InMemoryGuest, Reply
from relaynat.wire import IPPROTO_ICMP, IPPROTO_ICMPV6

#: The default of a new network namespace: no group may open ping sockets.
NOBODY = "1 0"
TESTS = Path(__file__).resolve().parent.parent


def _ping_sockets_refused() -> None:
    try:
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP).close()
    except PermissionError:
        return
    pytest.skip("this kernel lets us open ping sockets outside ping_group_range")


@pytest.mark.integration
def test_cli_ping_answered_in_a_fresh_namespace_with_the_default_range() -> None:
    """`relaynat run --no-confine -- ping` as root in a new network namespace, its
    ping_group_range left as the kernel makes it: IPv4 to the gateway and IPv6 to
    fd00::2 answered (confined: test_confinement.py)."""
    script = ('ip link set lo up && cat /proc/sys/net/ipv4/ping_group_range && '
              'exec "$0" -m relaynat run --no-confine --stats -- sh -c '
              '"ping -c 3 -i 0.2 -W 2 10.0.2.2; ping -6 -c 3 -i 0.2 -W 2 fd00::2"')
    done = subprocess.run(["unshare", "--net", "sh", "-c", script, sys.executable],
                          capture_output=True, text=True, timeout=60)
    out = done.stdout
    assert out.split("\n", 1)[0].split() == ["1", "0"], out  # the default, untouched
    assert done.returncode == 0, out + done.stderr
    assert "PING 10.0.2.2" in out and "PING fd00::2" in out
    assert out.count("3 packets transmitted, 3 received") == 2, out + done.stderr
    stats = parse_stats(done.stderr)
    assert stats["icmp_raw_sockets_opened"] == 2  # one per family
    assert stats["icmp_raw_sessions_opened"] == 2
    assert stats["icmp_echo_replies"] == 6 and "drop_icmp_not_permitted" not in stats


@pytest.mark.integration
async def test_two_guests_same_identifier_each_get_their_own() -> None:
    from relaynat.host.icmp_raw import _HUBS

    with ping_group_range(NOBODY):
        _ping_sockets_refused()
        loop = asyncio.get_running_loop()
        a, b = Guest(), Guest()
        stats_a, stats_b = Counter[str](), Counter[str]()
        relay_a = IcmpEchoRelay(CONFIG, loop, a.send, stats_a)
        relay_b = IcmpEchoRelay(CONFIG, loop, b.send, stats_b)
        try:
            for seq in (1, 2, 3):
                ping(relay_a, 0x4242, seq, b"guest a %d" % seq)
                ping(relay_b, 0x4242, seq, b"guest b %d" % seq)
                check_reply(await a.next(), src=GATEWAY_IP, dst=GUEST_IP, ident=0x4242,
                            seq=seq, payload=b"guest a %d" % seq)
                check_reply(await b.next(), src=GATEWAY_IP, dst=GUEST_IP, ident=0x4242,
                            seq=seq, payload=b"guest b %d" % seq)
            await asyncio.sleep(0.2)
            assert a.frames.empty() and b.frames.empty()  # theirs only, once each
            (_k, sa), = relay_a.raw_sessions.items()
            (_k, sb), = relay_b.raw_sessions.items()
            assert sa.raw_ident != sb.raw_ident and sa.sock is sb.sock  # one raw socket
            # Opened once for the process, counted by the relay that opened it.
            assert stats_a["icmp_raw_sockets_opened"] + stats_b["icmp_raw_sockets_opened"] == 1
            assert stats_a["icmp_echo_replies"] == stats_b["icmp_echo_replies"] == 3
            assert relay_a.socket_count == relay_b.socket_count == 0  # no ping sockets
            assert not [k for k in stats_a | stats_b if k.startswith("drop_")]
        finally:
            relay_a.close()
            assert loop in _HUBS  # b still uses the raw socket
            relay_b.close()
        assert loop not in _HUBS and sa.sock.fileno() == -1  # the last one out closed it


def _echo_reply(reply: Reply) -> tuple[int, int, int, bytes] | None:
    """(type, identifier, sequence, payload) of an ICMP/ICMPv6 echo reply frame."""
    ip = reply.ip
    if ip is None or ip.proto not in (IPPROTO_ICMP, IPPROTO_ICMPV6):
        return None
    data = bytes(ip.payload)
    if data[0] not in (ICMP_ECHO_REPLY, ICMPV6_ECHO_REPLY):
        return None
    kind, _code, _csum, ident, seq = struct.unpack_from("!BBHHH", data)
    return kind, ident, seq, data[8:]


@pytest.mark.integration
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
async def test_two_relays_in_one_process_same_identifier(v6: bool) -> None:
    """Two whole relays (guests) on one loop ping the gateway (the host's loopback)
    with one identifier and the same sequence numbers: each gets its own replies, its
    own identifier back, and nothing of the other's."""
    with ping_group_range(NOBODY):
        _ping_sockets_refused()
        async with InMemoryGuest() as a, InMemoryGuest() as b:
            for seq in (1, 2, 3):
                for guest, tag in ((a, b"a"), (b, b"b")):
                    await guest.send(frames.echo_request(guest.addressing, v6, 0x4242, seq,
                                                         b"guest " + tag))
            got: dict[bytes, list[tuple[int, int, int, bytes]]] = {b"a": [], b"b": []}
            for guest, tag in ((a, b"a"), (b, b"b")):
                while len(got[tag]) < 3:
                    echo = _echo_reply(await guest.expect(lambda r: _echo_reply(r) is not None,
                                                          timeout=5))
                    assert echo is not None
                    got[tag].append(echo)
            kind = ICMPV6_ECHO_REPLY if v6 else ICMP_ECHO_REPLY
            for tag in (b"a", b"b"):
                assert sorted(got[tag]) == [(kind, 0x4242, seq, b"guest " + tag)
                                            for seq in (1, 2, 3)]
            await asyncio.sleep(0.2)
            for guest in (a, b):
                with pytest.raises(TimeoutError):
                    await guest.expect(lambda r: _echo_reply(r) is not None, timeout=0.2)
            sa, sb = a.stats(), b.stats()
            assert sa["icmp_raw_sockets_opened"] + sb["icmp_raw_sockets_opened"] == 1
            assert sa["icmp_raw_sessions_opened"] == sb["icmp_raw_sessions_opened"] == 1
            assert sa["icmp_echo_replies"] == sb["icmp_echo_replies"] == 3
            # The other's replies went to it: not "ignored" here.
            assert sa["icmp_raw_replies_ignored"] == sb["icmp_raw_replies_ignored"] == 0


@pytest.mark.integration
async def test_the_hosts_own_echo_replies_are_not_delivered() -> None:
    with ping_group_range(NOBODY):
        _ping_sockets_refused()
        loop = asyncio.get_running_loop()
        guest, stats = Guest(), Counter[str]()
        relay = IcmpEchoRelay(CONFIG, loop, guest.send, stats)
        try:
            ping(relay, 7, 1, b"mine")
            check_reply(await guest.next(), src=GATEWAY_IP, dst=GUEST_IP, ident=7, seq=1,
                        payload=b"mine")
            (_k, session), = relay.raw_sessions.items()
            # The test pings the host itself, on a raw socket of its own: under the
            # session's very identifier (a sequence number the guest never sent), under
            # the next one, and iputils ping runs meanwhile.
            pinger = subprocess.Popen(["ping", "-c", "3", "-i", "0.2", "-W", "2", "127.0.0.1"],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True)
            with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as own:
                for ident, seq in ((session.raw_ident, 999), ((session.raw_ident + 1) & 0xFFFF, 1)):
                    own.sendto(icmp_message(ICMP_ECHO_REQUEST, 0, ident, seq, b"host's"),
                               ("127.0.0.1", 0))
            out, _ = await asyncio.to_thread(pinger.communicate, timeout=30)
            assert "3 received" in out, out
            await asyncio.sleep(0.2)
            assert guest.frames.empty()
            assert stats["icmp_raw_replies_ignored"] >= 5  # 2 of ours, 3 of ping's
            assert stats["icmp_echo_replies"] == 1
            # The session still works afterwards.
            ping(relay, 7, 2, b"mine again")
            check_reply(await guest.next(), src=GATEWAY_IP, dst=GUEST_IP, ident=7, seq=2,
                        payload=b"mine again")
        finally:
            relay.close()


@pytest.mark.integration
async def test_raw_sessions_bounded_expire_and_free_their_identifiers() -> None:
    with ping_group_range(NOBODY):
        _ping_sockets_refused()
        loop = asyncio.get_running_loop()
        guest, stats = Guest(), Counter[str]()
        relay = IcmpEchoRelay(CONFIG, loop, guest.send, stats, idle_timeout_s=0.3,
                              max_sockets=1)
        try:
            ping(relay, 1, 1, b"a")
            await guest.next()
            ping(relay, 2, 1, b"b")  # a second session: over max_icmp_flows
            assert stats["drop_icmp_table_full"] == 1 and relay.raw_session_count == 1
            (_k, session), = relay.raw_sessions.items()
            hub = relay._raw
            assert hub is not None and len(hub.ids) == 1
            await asyncio.sleep(0.6)
            assert relay.raw_session_count == 0 and stats["icmp_raw_sessions_expired"] == 1
            assert len(hub.ids) == 0
            assert hub.ids.match(session.host_packed, session.raw_ident) is None
            ping(relay, 2, 1, b"b")  # room again
            check_reply(await guest.next(), src=GATEWAY_IP, dst=GUEST_IP, ident=2, seq=1,
                        payload=b"b")
            assert [f.guest_end.port for f in relay.describe_flows()] == [2]
        finally:
            relay.close()
        assert relay.raw_session_count == 0 and hub.open_sockets == 0


class Recorder:
    """An EventSink that keeps what it is told."""

    def __init__(self) -> None:
        self.listening = True
        self.guest: str | None = "g"
        self.events: list[Event] = []

    def emit(self, event: Event) -> None:
        self.events.append(event)


@pytest.mark.integration
async def test_raw_sessions_listed_announced_and_cut_by_policy() -> None:
    with ping_group_range(NOBODY):
        _ping_sockets_refused()
        guest, stats = Guest(), Counter[str]()
        relay = IcmpEchoRelay(CONFIG, asyncio.get_running_loop(), guest.send, stats)
        relay.events = recorder = Recorder()
        try:
            ping(relay, 11, 1, b"x" * 10)
            await guest.next()
            (info,) = relay.describe_flows()
            assert (info.protocol, info.guest_end.port, info.host_peer) == (
                "icmp", 11, Endpoint("127.0.0.1", None))
            assert (info.bytes_from_guest, info.bytes_to_guest) == (18, 18)
            (_k, session), = relay.raw_sessions.items()
            hub = relay._raw
            assert hub is not None
            assert relay.cut(lambda proto, dst, port: True) == 1
            assert relay.raw_session_count == 0 and len(hub.ids) == 0
            opened, closed = recorder.events
            assert isinstance(opened, FlowOpened) and isinstance(closed, FlowClosed)
            assert closed.how == "policy_cut" and closed.bytes_to_guest == 18
            # A reply arriving for the cut session now would be nobody's.
            assert hub.ids.match(session.host_packed, session.raw_ident) is None
        finally:
            relay.close()


@pytest.mark.integration
async def test_raw_sockets_opened_ahead_of_need() -> None:
    """`prepare_raw` opens both raw sockets at once (as a relay about to give up
    CAP_NET_RAW would), and the first echo uses them."""
    with ping_group_range(NOBODY):
        _ping_sockets_refused()
        guest, stats = Guest(), Counter[str]()
        relay = IcmpEchoRelay(CONFIG, asyncio.get_running_loop(), guest.send, stats)
        try:
            assert relay.prepare_raw()
            assert stats["icmp_raw_sockets_opened"] == 2
            ping(relay, 3, 1, b"early")
            check_reply(await guest.next(), src=GATEWAY_IP, dst=GUEST_IP, ident=3, seq=1,
                        payload=b"early")
            assert stats["icmp_raw_sockets_opened"] == 2
        finally:
            relay.close()


#: Run as nobody: a relay pings the host's loopback once per family, with neither ping
#: sockets (the range is "1 0") nor raw ones (no CAP_NET_RAW); prints its counters.
UNPRIVILEGED = textwrap.dedent("""
    import asyncio, json, logging, sys
    from collections import Counter
    from integration.test_icmp_echo import Guest, ping
    from unit.test_icmp_echo_frames import CONFIG
    from relaynat.host.icmp_relay import IcmpEchoRelay

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    async def main():
        guest, stats = Guest(), Counter()
        relay = IcmpEchoRelay(CONFIG, asyncio.get_running_loop(), guest.send, stats)
        for seq in (1, 2, 3):
            ping(relay, 9, seq, b"x")
        await asyncio.sleep(0.2)
        print(json.dumps({"stats": stats, "frames": guest.frames.qsize(),
                          "raw": relay.raw_session_count, "ping": relay.socket_count}))
        relay.close()

    asyncio.run(main())
""")


@pytest.mark.integration
def test_unprivileged_without_ping_sockets_warns_once_naming_the_sysctl() -> None:
    with ping_group_range(NOBODY):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]))
        done = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
             sys.executable, "-c", UNPRIVILEGED],
            capture_output=True, text=True, timeout=60, cwd=TESTS, env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, done.stderr
    assert "net.ipv4.ping_group_range" in warnings[0] and "CAP_NET_RAW" in warnings[0]
    assert result["stats"]["drop_icmp_not_permitted"] == 3
    assert result["stats"].get("icmp_raw_sockets_opened", 0) == 0
    assert (result["frames"], result["raw"], result["ping"]) == (0, 0, 0)


@pytest.mark.integration
async def test_raw_sessions_are_listed_as_not_moved_by_a_handover() -> None:
    """A handover cannot pass a session on the shared raw socket (there is no socket of
    its own to pass): `suspend` lists it under not_moved with the reason, as every flow
    that stays, and `resume` serves it on."""
    with ping_group_range(NOBODY):
        _ping_sockets_refused()
        async with InMemoryGuest(CONFIG) as guest:
            a = guest.addressing
            await guest.send(frames.echo_request(a, False, 21, 1, b"raw"))
            await guest.expect(lambda r: r.ip is not None and r.ip.proto == IPPROTO_ICMP)
            suspended = guest.relay.suspend()
            try:
                assert suspended.icmp == []
                (left,) = suspended.not_moved
                assert left["protocol"] == "icmp" and left["guest"][1] == 21, left
                assert "raw ICMP socket" in left["reason"], left
            finally:
                guest.relay.resume(suspended)
            assert [f.guest_end.port for f in guest.relay.flows()] == [21]
