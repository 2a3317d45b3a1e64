"""Many guests in one process and one event loop (`relaynat.guests.Guests`).

Guests on a TAP, a stream socket and a unixgram socket share one loop, each with
its own addressing, policy and counters. Twenty real namespace guests share one relay
process: nineteen download a file from a server on host loopback while the twentieth
floods its link with SYNs, UDP, ARP, DHCP and malformed frames. Their downloads must
stay intact and keep 80% of the throughput they had without the flood (the same
downloads, measured in solo phases alternating with the flooded ones in the same test).
Guests come and go at runtime without disturbing the others.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import resource
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import dpkt
import pytest
from support import SUPPORT
from support.relaynat_cli import guest_python

from relaynat import Policy, RelayConfig
from relaynat.guests import Guests
from relaynat.netns.guest import NamespaceGuest
from relaynat.relay import Relay
from relaynat.testing import frames
from relaynat.testing.guest import InMemoryGuest, Reply
from relaynat.transports.unixgram import serve_unixgram

pytestmark = pytest.mark.integration
pytest_plugins = ["support.guest_fs"]

GUESTS = 20
#: Each phase moves 19 times this; at 64 MiB a phase lasts about 3 s on the 2-core VM. At
#: 24 MiB phases took about 1 s, and inside the full suite the ratio swung to 0.75.
FILE_MIB = 64


@pytest.fixture(scope="module")
def payload(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("many") / "payload"
    data = os.urandom(FILE_MIB << 20)
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


@pytest.fixture
def file_server(payload: tuple[Path, str]) -> Iterator[int]:
    """socat serving the payload to every client on host loopback: native code on the
    host side, so the relay, not the server, is what the downloads measure."""
    if shutil.which("socat") is None:
        pytest.fail("socat is missing: install.sh installs it")
    port = 18080
    proc = subprocess.Popen(["socat", "-U", f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,"
                             "backlog=64", f"OPEN:{payload[0]},rdonly"])
    deadline = time.monotonic() + 5
    while subprocess.run(["ss", "-Htln", f"sport = :{port}"], capture_output=True,
                         text=True).stdout.strip() == "":
        assert time.monotonic() < deadline and proc.poll() is None, "socat did not listen"
        time.sleep(0.02)
    yield port
    proc.kill()
    proc.wait()


def _download(port: int, out: Path) -> list[str]:
    return ["sh", "-c", f"socat -u TCP:10.0.2.2:{port} STDOUT | sha256sum > {out}"]


async def _spawn(guests: Guests, name: str, command: list[str],
                 config: RelayConfig | None = None) -> NamespaceGuest:
    config = config or RelayConfig(ipv6=False)
    guest = await NamespaceGuest.spawn(config, command, tap_name="tap0")
    guests.add(name, config).attach(guest.transport)
    return guest


async def _downloads(guests: Guests, port: int, out_dir: Path, phase: str,
                     flood_s: float | None) -> tuple[float, list[Path]]:
    """Nineteen downloads at once (and, with `flood_s`, the flooder beside them); the
    seconds from their start to the last one's end, and their output files."""
    outs = [out_dir / f"{phase}-{i}" for i in range(GUESTS - 1)]
    spawned = await asyncio.gather(*(_spawn(guests, f"{phase}-{i}", _download(port, out))
                                     for i, out in enumerate(outs)))
    flooder = None
    if flood_s is not None:
        # Niced: on two cores the flooding program's own CPU would otherwise be taken
        # from the downloads' socat and kernel work, which is the host scheduler's
        # business (a VMM runs a guest's vCPU in its cgroup); what is measured here is
        # the relay's share. It still offers the relay more frames than it takes.
        flooder = await _spawn(guests, f"{phase}-flooder", ["sh", "-c",
            f"nice -n 19 {guest_python()} {SUPPORT / 'guest_tools.py'} flood tap0 "
            f"--seconds {flood_s} > {out_dir / f'{phase}-sent'}"])
        flooder.go()
        await asyncio.sleep(0.5)  # the flood is under way before the downloads begin
    start = time.monotonic()
    for guest in spawned:
        guest.go()
    codes = await asyncio.wait_for(asyncio.gather(*(g.wait() for g in spawned)), 120)
    elapsed = time.monotonic() - start
    assert codes == [0] * len(spawned)
    if flooder is not None:
        assert flooder.proc.returncode is None, "the flood ended before the downloads"
        assert await asyncio.wait_for(flooder.wait(), 60) == 0
    return elapsed, outs


def test_nineteen_downloads_keep_their_speed_beside_a_flooding_guest(
        file_server: int, payload: tuple[Path, str], guest_dir: Path) -> None:
    _, digest = payload
    size = (FILE_MIB << 20) * (GUESTS - 1)

    async def main() -> tuple[list[float], list[float], dict[str, dict[str, int]]]:
        solos: list[float] = []
        floods: list[float] = []
        stats: dict[str, dict[str, int]] = {}
        async with Guests() as guests:
            # Solo and flooded phases alternate, solo first and last, and the means are
            # compared: this 2-core VM's own speed drifts by a fifth from one phase to the
            # next, and one flooded phase between two solo ones once measured that drift
            # as the flood's doing inside the full suite (0.78; alone it measured 0.91-0.96).
            for i, flooding in enumerate([False, True, False, True, False]):
                phase = f"{'flood' if flooding else 'solo'}{i}"
                elapsed, outs = await _downloads(
                    guests, file_server, guest_dir, phase,
                    flood_s=2 * solos[0] + 5 if flooding else None)
                for out in outs:
                    assert out.read_text().split()[0] == digest, out
                (floods if flooding else solos).append(elapsed)
                if flooding:
                    flood_stats = guests.stats()
                    stats[f"{phase}-flooder"] = flood_stats.pop(f"{phase}-flooder")
                    for name, counters in flood_stats.items():
                        assert counters.get("drop_internal_error", 0) == 0, (name, counters)
                for name in list(guests):
                    guests.remove(name)
        return solos, floods, stats

    solos, floods, stats = asyncio.run(main())
    solo, flooded = sum(solos) / len(solos), sum(floods) / len(floods)
    print(f"19 downloads of {FILE_MIB} MiB: solo {size * 8 / solo / 1e9:.2f} Gbit/s, "
          f"beside the flood {size * 8 / flooded / 1e9:.2f} Gbit/s "
          f"({solo / flooded:.2f} of solo); phases (s): solo "
          f"{' '.join(f'{t:.2f}' for t in solos)}, flooded {' '.join(f'{t:.2f}' for t in floods)}")
    for phase, flood in stats.items():
        sent = int((guest_dir / f"{phase.removesuffix('-flooder')}-sent").read_text()
                   .split()[1])
        print(f"{phase} frames sent {sent}, handled {flood['frames_in']}; TCP flows opened "
              f"{flood.get('tcp_flows_opened', 0)}, SYNs waited "
              f"{flood.get('tcp_syn_deferred', 0)}")
        # A real flood: it offered more than the relay took from it (the TAP queue
        # dropped the rest), and what it took was handled as the bad input it is.
        assert sent > flood["frames_in"] > 10_000, (sent, flood)
        assert sum(v for k, v in flood.items() if k.startswith("drop_")) > 1_000, flood
        assert flood.get("drop_internal_error", 0) == 0, flood
    assert solo / flooded >= 0.8, (solos, floods)


def test_guests_come_and_go_while_the_others_transfer(
        file_server: int, payload: tuple[Path, str], guest_dir: Path) -> None:
    _, digest = payload

    async def main() -> None:
        async with Guests() as guests:
            # A guest whose download is cut short by its removal (pv-like pacing: the
            # guest reads slowly, so the transfer is still running when it goes).
            slow = await _spawn(guests, "removed", ["sh", "-c",
                                f"socat -u TCP:10.0.2.2:{file_server} STDOUT | "
                                "(while dd bs=65536 count=1 2>/dev/null | grep -q .; do "
                                "sleep 0.05; done)"])
            keep = [await _spawn(guests, f"keep-{i}", _download(file_server,
                                                                  guest_dir / f"keep-{i}"))
                    for i in range(3)]
            slow.go()
            await asyncio.sleep(0.5)
            assert guests["removed"].flows(), "the slow download is not under way"
            for guest in keep:
                guest.go()
            added = await _spawn(guests, "added", _download(file_server, guest_dir / "added"))
            added.go()
            guests.remove("removed")
            assert "removed" not in guests and len(guests) == 4
            # Its link is gone with it, so its socat would wait forever: end it all.
            # Killing the namespace child does: the command's PID namespace init dies
            # with it (parent-death signal), and every process in the namespace with
            # the init (pid_namespaces(7)).
            slow.proc.kill()
            await slow.wait()
            codes = await asyncio.wait_for(
                asyncio.gather(*(g.wait() for g in [*keep, added])), 60)
            assert codes == [0, 0, 0, 0]

    asyncio.run(main())
    for name in ["keep-0", "keep-1", "keep-2", "added"]:
        assert (guest_dir / name).read_text().split()[0] == digest, name


def _addressing(subnet: int) -> RelayConfig:
    """Guest, gateway and DNS addresses of 10.0.SUBNET.0/24, DNS upstream on loopback."""
    net = f"10.0.{subnet}"
    return RelayConfig(guest_ipv4=IPv4Address(f"{net}.15"), gateway_ipv4=IPv4Address(f"{net}.2"),
                       dns_ipv4=IPv4Address(f"{net}.3"),
                       map_host_loopback_v4=IPv4Address(f"{net}.2"),
                       dns_upstream=IPv4Address("127.0.0.1"), ipv6=False)


def test_a_tap_a_stream_and_a_unixgram_guest_each_with_its_own_network(
        start_peer, tmp_path: Path) -> None:
    echo = start_peer("echo")
    deny_host = Policy.from_toml('default = "allow"\n[[rule]]\naction = "deny"\nto = "host"\n',
                                 _addressing(5))

    async def main() -> dict[str, dict[str, int]]:
        async with Guests() as guests:
            # A namespace guest on 10.0.4.0/24 echoes through host loopback ...
            tap = await NamespaceGuest.spawn(_addressing(4), [
                guest_python(), str(SUPPORT / "guest_tools.py"), "echo-many", "10.0.4.2",
                str(echo), "--conns", "4", "--size", "65536"])
            guests.add("tap", _addressing(4)).attach(tap.transport)
            tap.go()
            # ... a stream guest on 10.0.5.0/24, whose policy denies the host, is refused
            # the same port ...
            async with InMemoryGuest(relay=guests.add("stream", _addressing(5),
                                                      deny_host)) as stream:
                with pytest.raises(ConnectionRefusedError):
                    await stream.tcp_connect(echo)
            # ... and a unixgram guest on 10.0.6.0/24 is offered its own address.
            relay = guests.add("dgram", _addressing(6))
            server = serve_unixgram(relay, str(tmp_path / "relay.dgram"))
            client = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            client.bind(str(tmp_path / "vm.dgram"))
            client.connect(str(tmp_path / "relay.dgram"))
            client.setblocking(False)
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(client, frames.dhcp_discover(
                frames.Addressing.of(relay.config, frames.GUEST_MAC), xid=7))
            while True:
                reply = Reply.parse(await asyncio.wait_for(loop.sock_recv(client, 65536), 5))
                if reply.udp is not None and reply.udp.sport == 67:
                    break
            assert reply.udp is not None
            assert IPv4Address(dpkt.dhcp.DHCP(bytes(reply.udp.payload)).yiaddr) == \
                IPv4Address("10.0.6.15")
            client.close()
            assert await asyncio.wait_for(tap.wait(), 60) == 0
            server.close()
            return guests.stats()

    stats = asyncio.run(main())
    # Each guest's counters are its own: the denial is the stream guest's alone.
    assert stats["stream"].get("policy_denied", 0) == 1, stats["stream"]
    assert stats["tap"].get("policy_denied", 0) == 0
    assert stats["tap"]["tcp_flows_opened"] == 4 and stats["dgram"].get("tcp_flows_opened", 0) == 0
    assert stats["dgram"]["dhcp_offer"] == 1 and stats["tap"].get("dhcp_offer", 0) == 0


async def test_guest_names_are_unique_and_each_guest_has_its_own_config() -> None:
    async with Guests() as guests:
        a = guests.add("a", RelayConfig(max_tcp_flows=10))
        b = guests.add("b")
        assert isinstance(a, Relay) and guests["a"] is a and guests["b"] is b
        assert a.config.max_tcp_flows == 10 and b.config.max_tcp_flows == 16384
        with pytest.raises(ValueError, match="'a' already exists"):
            guests.add("a")
        with pytest.raises(ValueError, match="non-empty name"):
            guests.add("")
        assert sorted(guests) == ["a", "b"] and set(guests.stats()) == {"a", "b"}
        guests.remove("a")
        with pytest.raises(KeyError):
            guests.remove("a")
        assert list(guests) == ["b"]
    assert len(guests) == 0


async def test_flow_maxima_beyond_the_descriptor_limit_are_warned_about(
        caplog: pytest.LogCaptureFixture) -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    small = RelayConfig(max_tcp_flows=8, max_udp_flows=8, max_icmp_flows=8)
    with caplog.at_level(logging.WARNING, logger="relaynat"):
        async with Guests() as guests:
            guests.add("small", small)
            assert guests.flow_budget() == 24
            assert "RLIMIT_NOFILE" not in caplog.text
            guests.add("big", RelayConfig(max_tcp_flows=soft))
            assert "RLIMIT_NOFILE" in caplog.text and str(soft) in caplog.text


async def test_log_lines_name_the_guest_they_are_about(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Two guests on qemu stream sockets in one loop: a second client refused by one, a
    client sending a bad frame length to the other. Each line names its guest (the
    readers that log were registered by callbacks of the relay's own listener, two
    handles away from `serve_stream`), and a '%' in a name stays literal."""
    with caplog.at_level(logging.INFO, logger="relaynat"):
        async with Guests() as guests:
            paths = {name: str(tmp_path / f"{i}.sock") for i, name in enumerate(("a", "b%s"))}
            for name, path in paths.items():
                guests.add(name).serve_stream(path)
            loop = asyncio.get_running_loop()
            clients = []
            for name in ("a", "a", "b%s"):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.setblocking(False)
                await loop.sock_connect(sock, paths[name])
                clients.append(sock)
                await asyncio.sleep(0.1)  # accepted in this order
            await loop.sock_sendall(clients[2], b"\xff\xff\xff\xff")  # no such frame length
            await asyncio.wait_for(guests["b%s"].transport_lost_event.wait(), 5)
            for sock in clients:
                sock.close()
    lines = [(getattr(r, "guest", None), r.getMessage()) for r in caplog.records]
    # The records name the line that logged, not guest_log.py's adapter.
    assert {r.filename for r in caplog.records} <= {"relay.py", "stream.py", "guests.py"}
    assert ("a", "guest a: guest connected on the stream socket") in lines, lines
    assert ("a", "guest a: a second guest tried to connect while one is served; refused"
            ) in lines, lines
    assert ("b%s", "guest b%s: guest connected on the stream socket") in lines, lines
    assert any(guest == "b%s" and msg.startswith("guest b%s: qemu stream: frame length "
                                                 "4294967295 outside")
               for guest, msg in lines), lines
    assert ("b%s", "guest b%s: guest transport lost: bad frame length 4294967295") in lines
    # Nothing about one guest is told as the other's.
    assert not [line for line in lines if line[0] == "a" and "b%s" in line[1]]
