"""The host's resolver changes under a running relay: its resolv.conf is rewritten, or
the symbolic link to it points at another file, and the guest's next DNS query goes to
the resolver the file names now, while a query in flight is answered by the old one.

Two resolvers (tests/support/dns_peer.py) on 127.0.0.53 and 127.0.0.54 of the test's
private network namespace answer the same name with different addresses; the relay
reads a resolv.conf the test writes (`resolv_conf`, `--resolv-conf`). The guest
(tests/guests/dns_timeline.py) asks on a timeline, and the test changes the file once
the old resolver has logged a query. The relay looks at the file at most once a second
(link/dns.py), so the query meant for the new resolver comes 2 s after the change. The
pure decisions: tests/unit/test_resolv_conf.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from support import GUESTS, SUPPORT
from support.relaynat_cli import guest_python, parse_stats

from relaynat.config import RelayConfig
from relaynat.netns.guest import run_command
from relaynat.relay import Relay

OLD, NEW = "127.0.0.53", "127.0.0.54"
NAME, OLD_ADDR, NEW_ADDR = "where.test", "192.0.2.1", "198.51.100.1"
#: Answered by the old resolver SLOW_S after it logged the query: in flight meanwhile.
SLOW, SLOW_S = "slow.test", 3.0
STATIC_NAME, STATIC_ADDR = "static.test", "203.0.113.7"
TIMELINE = str(GUESTS / "dns_timeline.py")


def _start_resolver(tmp_path: Path, addr: str, answer: str) -> tuple[subprocess.Popen[bytes],
                                                                     Path]:
    ready = tmp_path / f"dns-{addr}"
    proc = subprocess.Popen([sys.executable, str(SUPPORT / "dns_peer.py"), "--addr", addr,
                             "--record", f"{NAME}={answer}", "--record", f"{SLOW}={answer}",
                             "--delay", f"{SLOW}={SLOW_S}", "--ready-file", str(ready)])
    deadline = time.monotonic() + 10
    while not ready.exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError("dns_peer did not start")
        time.sleep(0.02)
    log = Path(f"{ready}.log")
    log.touch()
    return proc, log


@pytest.fixture
def resolvers(tmp_path: Path) -> Iterator[dict[str, Path]]:
    """The old and the new resolver; yields their query logs by address."""
    started = [_start_resolver(tmp_path, OLD, OLD_ADDR), _start_resolver(tmp_path, NEW, NEW_ADDR)]
    yield {OLD: started[0][1], NEW: started[1][1]}
    for proc, _ in started:
        proc.kill()
        proc.wait()


def _names(server: str) -> str:
    return f"# written by the test\nnameserver {server}\noptions edns0\n"


async def _logged(log: Path, line: str, count: int = 1, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while log.read_text().splitlines().count(line) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{line!r} x{count} not in {log}: {log.read_text()!r}")
        await asyncio.sleep(0.01)


async def _timeline(config: RelayConfig, steps: list[str], tcp: bool,
                    changes: Callable[[], Awaitable[None]]) -> tuple[int, Relay]:
    """Run the guest's timeline through a relay in this process while `changes()` (a
    coroutine) changes the file; the guest's exit status and the relay."""
    holder: list[Relay] = []
    command = [guest_python(), TIMELINE, "10.0.2.3", *(["--tcp"] if tcp else []), *steps]
    guest = asyncio.create_task(run_command(config, command, relay_ready=holder.append))
    changing = asyncio.ensure_future(changes())
    code = await guest
    await changing  # its failure (a query that never came) is the test's
    return code, holder[0]


@pytest.mark.integration
@pytest.mark.parametrize("proto", ["udp", "tcp", "tcp-static"])
def test_the_next_query_goes_to_the_new_resolver_and_one_in_flight_to_the_old(
        resolvers: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str],
        proto: str) -> None:
    # tcp-static: with static records the guest's DNS-over-TCP connection goes to the
    # relay's own responder (host/dns_tcp.py), which forwards the rest upstream.
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(_names(OLD))
    records = ((STATIC_NAME, STATIC_ADDR),) if proto == "tcp-static" else ()
    config = RelayConfig(resolv_conf=str(resolv), dns_records=records)
    kind = proto[:3]

    async def change() -> None:
        await _logged(resolvers[OLD], f"{kind} {SLOW} 1")
        resolv.write_text(_names(NEW))  # in place: same inode, maybe the same size

    code, relay = asyncio.run(_timeline(config, [f"{NAME}@0", f"{SLOW}@0.3", f"{NAME}@2.3"],
                                        kind == "tcp", change))
    out = capfd.readouterr().out.splitlines()
    assert code == 0
    assert out == [f"{NAME} {OLD_ADDR}", f"{SLOW} {OLD_ADDR}", f"{NAME} {NEW_ADDR}"]
    assert resolvers[NEW].read_text().splitlines() == [f"{kind} {NAME} 1"]
    stats = relay.stats()
    assert stats["dns_upstream_changes"] == 1
    assert stats["dns_resolv_conf_unusable"] == 0


@pytest.mark.integration
def test_relaynat_run_follows_a_symlink_pointed_at_another_file(
        resolvers: dict[str, Path], tmp_path: Path) -> None:
    # systemd-resolved, resolvconf and NetworkManager point /etc/resolv.conf at a file
    # of theirs; a switch replaces the link (rename(2) over it, as `ln -sf` does not).
    # Searchable by all, as /etc and /run are: a confined relay reads it as nobody.
    tmp_path.chmod(0o755)
    (tmp_path / "old.conf").write_text(_names(OLD))
    (tmp_path / "new.conf").write_text(_names(NEW))
    link = tmp_path / "resolv.conf"
    link.symlink_to(tmp_path / "old.conf")
    proc = subprocess.Popen(
        [sys.executable, "-m", "relaynat", "run", "--stats", "--resolv-conf", str(link), "--",
         guest_python(), TIMELINE, "10.0.2.3", f"{NAME}@0", f"{NAME}@2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        asyncio.run(_logged(resolvers[OLD], f"udp {NAME} 1", timeout=30))
        (tmp_path / "next").symlink_to(tmp_path / "new.conf")
        os.replace(tmp_path / "next", link)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.splitlines() == [f"{NAME} {OLD_ADDR}", f"{NAME} {NEW_ADDR}"]
    assert parse_stats(err)["dns_upstream_changes"] == 1


@pytest.mark.integration
@pytest.mark.parametrize("confine", ["--confine", "--no-confine"])
def test_relaynat_run_follows_a_file_mounted_on_the_path(
        resolvers: dict[str, Path], tmp_path: Path, confine: str) -> None:
    # ip netns exec binds /etc/netns/NAME/resolv.conf on /etc/resolv.conf, container
    # runtimes their own file: a confined relay, in a mount namespace of its own, does
    # not see that mount through the directory it holds (it would read the file beneath,
    # another resolver's), so it holds the mounted file itself. Rewritten in place: a
    # mounted file cannot be renamed over.
    source = tmp_path / "mounted.conf"
    source.write_text(_names(OLD))
    tmp_path.chmod(0o755)  # nobody, the confined relay, reads it, as /etc is read
    target = tmp_path / "etc-resolv.conf"  # stands for /etc/resolv.conf
    target.write_text(_names("127.0.0.99"))  # what a relay reading beneath would use
    script = ('mount --bind "$1" "$2" && shift 2 && exec "$@"')
    proc = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", str(source),
         str(target), sys.executable, "-m", "relaynat", "run", confine, "--stats",
         "--resolv-conf", str(target), "--", guest_python(), TIMELINE, "10.0.2.3",
         f"{NAME}@0", f"{NAME}@2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        asyncio.run(_logged(resolvers[OLD], f"udp {NAME} 1", timeout=30))
        source.write_text(_names(NEW))  # in place, through the mount's source
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.splitlines() == [f"{NAME} {OLD_ADDR}", f"{NAME} {NEW_ADDR}"], err
    assert parse_stats(err)["dns_upstream_changes"] == 1


@pytest.mark.integration
def test_a_fixed_dns_upstream_ignores_the_file(resolvers: dict[str, Path],
                                               tmp_path: Path,
                                               capfd: pytest.CaptureFixture[str]) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(_names(OLD))
    config = RelayConfig(resolv_conf=str(resolv), dns_upstream=IPv4Address(OLD))

    async def change() -> None:
        await _logged(resolvers[OLD], f"udp {NAME} 1")
        resolv.write_text(_names(NEW))

    code, relay = asyncio.run(_timeline(config, [f"{NAME}@0", f"{NAME}@2"], False, change))
    assert code == 0
    assert capfd.readouterr().out.splitlines() == [f"{NAME} {OLD_ADDR}"] * 2
    assert resolvers[NEW].read_text() == ""
    assert relay.stats()["dns_upstream_changes"] == 0


@pytest.mark.integration
def test_a_file_without_nameserver_keeps_the_last_and_warns_once(
        resolvers: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(_names(OLD))
    config = RelayConfig(resolv_conf=str(resolv))

    async def change() -> None:
        await _logged(resolvers[OLD], f"udp {NAME} 1")
        resolv.write_text("# the network manager is between two states\nsearch example\n")
        # Two looks at that version (the second because it was still settling, its
        # timestamp too recent to trust), one warning.
        await _logged(resolvers[OLD], f"udp {NAME} 1", count=3)
        resolv.write_text(_names(NEW))

    with caplog.at_level(logging.WARNING, logger="relaynat"):
        code, relay = asyncio.run(_timeline(
            config, [f"{NAME}@0", f"{NAME}@1.5", f"{NAME}@3", f"{NAME}@5"], False, change))
    assert code == 0
    assert capfd.readouterr().out.splitlines() == [f"{NAME} {OLD_ADDR}"] * 3 + [
        f"{NAME} {NEW_ADDR}"]
    warnings = [r.getMessage() for r in caplog.records if "names no nameserver" in r.getMessage()]
    assert warnings == [f"{resolv} changed and names no nameserver: DNS still goes to {OLD}"]
    stats = relay.stats()
    assert stats["dns_resolv_conf_unusable"] == 1
    assert stats["dns_upstream_changes"] == 1
