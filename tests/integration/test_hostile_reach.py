"""A hostile guest reaches host loopback by no spelling but the mapped address.

Services listen on the host's 127.0.0.1 and ::1 (in the suite's private network
namespace); a guest writes raw frames to every other way of naming them: 0.0.0.0 and
:: (Linux connects a socket aimed there to loopback), 127.0.0.2, the IPv4-mapped,
IPv4-compatible and NAT64 spellings. Each probe must be refused as a destination with
nothing behind it (TCP: RST, UDP: ICMP port unreachable, ping: no reply) and counted
as `dst_host_local_refused`, under `--sandbox`, with no policy and no mapping
(`--map-host-loopback none`), and with the default mapping, under which the gateway
still reaches the services. The guests are `InMemoryGuest`s (the real relay, real host
sockets) and one real `relaynat serve` process; nothing on the path is mocked.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, ip_address
from pathlib import Path

import pytest
from support.hostile_kit import RawGuest, hostile_relay
from support.sysctl import ALL_GROUPS, ping_group_range

from relaynat.config import RelayConfig
from relaynat.guests import Guests
from relaynat.policy import Policy
from relaynat.testing import frames
from relaynat.testing.guest import InMemoryGuest, Reply
from relaynat.wire import IPPROTO_ICMP, IPPROTO_ICMPV6, RST, SYN

CONFIG = RelayConfig(dns_upstream=IPv4Address("127.0.0.1"))
UNMAPPED = CONFIG.replace(map_host_loopback_v4=None, map_host_loopback_v6=None)
#: Every spelling of host loopback but the mapped address (the issue's 8 probes and more).
PROBES = ("0.0.0.0", "127.0.0.1", "127.0.0.2", "::", "::1", "::ffff:0.0.0.0",
          "::ffff:127.0.0.1", "::127.0.0.1", "64:ff9b::7f00:1")
#: Of those, the ones ping sockets reach loopback with (the rest have no route here).
PING_PROBES = ("0.0.0.0", "127.0.0.1", "127.0.0.2", "::", "::1")
GATEWAYS = ("10.0.2.2", "fd00::2")
REFUSED = "dst_host_local_refused"


@dataclass
class LoopbackServices:
    """A TCP listener and a UDP echo on 127.0.0.1 and ::1, the same port for all four."""

    port: int
    udp_seen: list[bytes]


def _bind_all() -> tuple[int, list[socket.socket], list[socket.socket]]:
    """A port free for TCP and UDP on both 127.0.0.1 and ::1; (port, tcp, udp)."""
    for _ in range(50):
        socks: list[socket.socket] = []
        try:
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                for family, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
                    sock = socket.socket(family, kind)
                    socks.append(sock)
                    sock.bind((addr, socks[0].getsockname()[1] if len(socks) > 1 else 0))
        except OSError:
            for sock in socks:
                sock.close()
            continue
        return socks[0].getsockname()[1], socks[:2], socks[2:]
    raise RuntimeError("no port free for TCP and UDP on both 127.0.0.1 and ::1")


@pytest.fixture
def services() -> Iterator[LoopbackServices]:
    port, tcp, udp = _bind_all()
    for sock in tcp:
        sock.listen(64)
    seen: list[bytes] = []
    stop = threading.Event()

    def echo(sock: socket.socket) -> None:
        sock.settimeout(0.05)
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(2048)
            except TimeoutError:
                continue
            seen.append(data)
            sock.sendto(data, peer)

    threads = [threading.Thread(target=echo, args=(sock,), daemon=True) for sock in udp]
    for thread in threads:
        thread.start()
    yield LoopbackServices(port, seen)
    stop.set()
    for thread in threads:
        thread.join(2)
    for sock in (*tcp, *udp):
        sock.close()


def pk(text: str) -> bytes:
    return ip_address(text).packed


def _is_icmp_error(reply: Reply) -> bool:
    """ICMP destination unreachable (type 3) or ICMPv6 destination unreachable (1)."""
    ip = reply.ip
    if ip is None or not ip.payload:
        return False
    return ((ip.proto == IPPROTO_ICMP and ip.payload[0] == 3)
            or (ip.proto == IPPROTO_ICMPV6 and ip.payload[0] == 1))


def _is_echo_reply(reply: Reply) -> bool:
    ip = reply.ip
    return ip is not None and bool(ip.payload) and (
        (ip.proto == IPPROTO_ICMP and ip.payload[0] == 0)
        or (ip.proto == IPPROTO_ICMPV6 and ip.payload[0] == 129))


async def tcp_probe(guest: InMemoryGuest, dst: str, port: int, sport: int) -> str:
    """SYN to `dst`:`port`: "reached" (SYN-ACK) or "refused" (RST)."""
    await guest.send(frames.tcp_segment(guest.addressing, ":" in dst, sport, port, 1000, 0,
                                        SYN, dst=pk(dst)))
    reply = await guest.expect(lambda r: r.tcp is not None and r.tcp.dport == sport, 5)
    assert reply.tcp is not None
    return "reached" if reply.tcp.flags & SYN else "refused" if reply.tcp.flags & RST else "?"


async def udp_probe(guest: InMemoryGuest, dst: str, port: int, sport: int) -> str:
    """A datagram to `dst`:`port`: "reached" (echoed) or "refused" (ICMP error)."""
    await guest.send(frames.udp_datagram(guest.addressing, ":" in dst, sport, port,
                                         b"probe %d" % sport, dst=pk(dst)))
    reply = await guest.expect(lambda r: (r.udp is not None and r.udp.dport == sport)
                               or _is_icmp_error(r), 5)
    return "reached" if reply.udp is not None else "refused"


async def ping_probe(guest: InMemoryGuest, dst: str, ident: int) -> str:
    """An echo request to `dst`: "reached" (a reply) or "silent" (none in 0.5 s)."""
    await guest.send(frames.echo_request(guest.addressing, ":" in dst, ident, 1, b"probe",
                                         dst=pk(dst)))
    try:
        await guest.expect(_is_echo_reply, 0.5)
    except TimeoutError:
        return "silent"
    return "reached"


async def probe_all(guest: InMemoryGuest, port: int, dsts: tuple[str, ...]
                    ) -> dict[str, tuple[str, str]]:
    out = {}
    for i, dst in enumerate(dsts):
        out[dst] = (await tcp_probe(guest, dst, port, 41000 + i),
                    await udp_probe(guest, dst, port, 42000 + i))
    return out


CASES = {
    # name: (config, policy, what the mapped gateway gets)
    "sandbox": (CONFIG, Policy.sandbox(CONFIG), "refused"),
    "no-policy-unmapped": (UNMAPPED, None, "refused"),
    "no-policy-mapped": (CONFIG, None, "reached"),
}


@pytest.mark.parametrize("case", CASES)
async def test_host_loopback_only_through_the_mapped_address(
        case: str, services: LoopbackServices) -> None:
    config, policy, gateway = CASES[case]
    async with InMemoryGuest(config, policy=policy) as guest:
        got = await probe_all(guest, services.port, PROBES)
        assert got == {dst: ("refused", "refused") for dst in PROBES}
        stats = guest.stats()
        assert stats[REFUSED] == 2 * len(PROBES)
        assert stats["udp_flows"] == 0 and stats["tcp_flows"] == 0
        assert services.udp_seen == []
        # The mapped gateway still stands for host loopback when mapping is on.
        assert await probe_all(guest, services.port, GATEWAYS) == {
            dst: (gateway, gateway) for dst in GATEWAYS}
        assert guest.stats()[REFUSED] == 2 * len(PROBES)


async def test_ping_reaches_host_loopback_only_through_the_mapped_address() -> None:
    with ping_group_range(ALL_GROUPS):
        async with InMemoryGuest(UNMAPPED) as guest:
            for i, dst in enumerate(PING_PROBES):
                assert await ping_probe(guest, dst, 100 + i) == "silent", dst
            assert guest.stats()[REFUSED] == len(PING_PROBES)
            assert guest.stats().get("icmp_sockets", 0) == 0
        async with InMemoryGuest(CONFIG) as guest:
            for i, dst in enumerate(GATEWAYS):
                assert await ping_probe(guest, dst, 200 + i) == "reached", dst


async def test_a_sandboxed_guest_does_not_reach_another_guests_forward() -> None:
    """In one `Guests` process, sandboxed guest a must not reach the
    forward of guest b (listening on every host address) through 0.0.0.0 or ::."""
    async with Guests() as guests:
        a = guests.add("a", CONFIG, Policy.sandbox(CONFIG))
        b = guests.add("b", CONFIG)
        forward = b.add_forward("tcp", None, 0, 8080)
        async with InMemoryGuest(relay=a) as guest_a, InMemoryGuest(relay=b) as guest_b:
            dsts = ("0.0.0.0", "::", "127.0.0.1", "::1", "::ffff:0.0.0.0", "10.0.2.2")
            for i, dst in enumerate(dsts):
                got = await tcp_probe(guest_a, dst, forward.host_port, 43000 + i)
                assert got == "refused", dst
            with pytest.raises(TimeoutError):  # b's guest was never asked to accept
                await guest_b.expect(lambda r: r.tcp is not None and r.tcp.dport == 8080,
                                     0.5)
            assert b.stats().get("tcp_inbound_opened", 0) == 0
            assert a.stats()[REFUSED] == len(dsts) - 1  # the gateway: the policy's refusal
            assert a.stats()["policy_denied"] == 1


@pytest.mark.integration
@pytest.mark.parametrize("options", [("--map-host-loopback", "none"), ("--sandbox",)])
def test_relaynat_serve_refuses_host_local_spellings(
        options: tuple[str, ...], services: LoopbackServices, tmp_path: Path) -> None:
    """The same probes through the real CLI: `relaynat serve` in its own process."""
    with hostile_relay(tmp_path, options) as relay, RawGuest(relay.socket) as guest:
        guest.keep = lambda r: r.tcp is not None or _is_icmp_error(r) or r.udp is not None
        for i, dst in enumerate(PROBES):
            guest.send(guest.tcp(41000 + i, services.port, 1000, 0, SYN, dst=pk(dst),
                                 v6=":" in dst))
            reply = guest.expect(lambda r: r.tcp is not None, 5)
            assert reply.tcp is not None and reply.tcp.flags & RST, dst
            guest.send(frames.udp_datagram(guest.addressing, ":" in dst, 42000 + i,
                                           services.port, b"probe", dst=pk(dst)))
            reply = guest.expect(lambda r: r.udp is not None or _is_icmp_error(r), 5)
            assert reply.udp is None, dst
    stats = relay.stats()
    assert stats[REFUSED] == 2 * len(PROBES)
    assert services.udp_seen == []
