"""Live TCP flows move from one relay to another, host sockets included (host/flow_move.py).

A real namespace guest downloads 64 MiB from and uploads 64 MiB to a host peer on
127.0.0.1 (two flows at once) through relay A, in this process. Mid-transfer the flows
move to relay B, then to C, ... five times: `export_flows`, `detach(keep_transport=True)`,
`release_exported`, `import_flows` (of the document after a JSON round trip) and
`attach` of the same TAP. Both transfers must end with equal sha256, and neither end
may see a reset: the guest's socat exits 0, the peer reports no error, and this
namespace's kernel sent no RST (/proc/net/snmp).

The host side's traffic is held while flows move (host/flow_move.py says why): a tbf qdisc
on lo with a 10-byte bucket drops every loopback packet for those milliseconds, as a
migrating VM's network drops its packets; TCP retransmits them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import SUPPORT

from relaynat import FlowInfo, RelayConfig
from relaynat.netns.guest import NamespaceGuest
from relaynat.relay import Relay

pytestmark = pytest.mark.integration
pytest_plugins = ["support.guest_fs"]

PACED_PEER = SUPPORT / "paced_peer.py"

SIZE = 64 << 20
MOVES = 5
#: The peer sends (and reads) 256 KiB per 10 ms: each transfer lasts 2.6 s or more, so
#: all moves (one every 0.3 s) happen while both flows carry data.
CHUNK, PAUSE_S, MOVE_EVERY_S = 256 << 10, 0.01, 0.3



def _tcp_counters() -> dict[str, int]:
    """This network namespace's TCP counters (the relays' host sockets and the peer's
    all live here, on lo)."""
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()
             if line.startswith("Tcp:")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:]), strict=True))


def _tc(*args: str) -> None:
    subprocess.run(["tc", "qdisc", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def peer(data_file: tuple[Path, str]) -> Iterator[tuple[subprocess.Popen[str], list[int]]]:
    proc = subprocess.Popen([sys.executable, str(PACED_PEER), str(data_file[0]), str(CHUNK),
                             str(PAUSE_S), "127.0.0.1"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    yield proc, json.loads(proc.stdout.readline())
    proc.kill()
    proc.wait()
    subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True)


def _move(source: Relay, target: Relay) -> tuple[dict[str, object], float]:
    """Move every flow of `source` (and its guest's TAP) to `target`, the host side's
    traffic held meanwhile. Returns the document and how long the traffic was held."""
    held_at = time.monotonic()
    _tc("add", "dev", "lo", "root", "tbf", "rate", "8bit", "burst", "10", "limit", "1")
    try:
        doc = json.loads(json.dumps(source.export_flows()))
        transport = source.detach(keep_transport=True)
        assert transport is not None
        # One namespace: the 4-tuples must be free before the target restores them.
        source.release_exported()
        target.import_flows(doc)
        target.attach(transport)
    finally:
        _tc("del", "dev", "lo", "root")
    return doc, time.monotonic() - held_at


def test_download_and_upload_survive_five_moves(
        peer: tuple[subprocess.Popen[str], list[int]], data_file: tuple[Path, str],
        guest_dir: Path) -> None:
    proc, (down_port, up_port) = peer
    path = guest_dir / "upload"  # the data file, where the guest may read it
    os.link(data_file[0], path)
    digest = data_file[1]
    out = guest_dir / "downloaded"
    # `timeout`: a hung transfer must not outlive the test (killing the guest's shell
    # would leave its children running).
    script = (f"timeout 50 socat -u TCP:10.0.2.2:{down_port} OPEN:{out},creat,trunc & "
              f"timeout 50 socat -u OPEN:{path} TCP:10.0.2.2:{up_port}; u=$?; wait $!; d=$?; "
              f"echo down=$d up=$u; exit $((d + u))")
    config = RelayConfig(ipv6=False)
    before = _tcp_counters()

    async def main() -> tuple[int, list[dict[str, object]], list[float], float,
                              dict[str, int]]:
        guest = await NamespaceGuest.spawn(config, ["sh", "-c", script])
        relay = Relay(config)
        relay.start()
        relay.attach(guest.transport)
        started = time.monotonic()
        guest.go()
        docs, holds = [], []
        exports: dict[str, int] = {}
        try:
            deadline = time.monotonic() + 20
            while sum(f.state == "established" and f.bytes_to_guest + f.bytes_from_guest
                      > 0 for f in relay.flows()) < 2:
                assert time.monotonic() < deadline, relay.flows()
                await asyncio.sleep(0.01)
            for _ in range(MOVES):
                await asyncio.sleep(MOVE_EVERY_S)
                target = Relay(config)
                target.start()
                doc, held = _move(relay, target)
                for key, value in relay.stats().items():
                    exports[key] = exports.get(key, 0) + value
                relay.close()
                relay = target
                docs.append(doc)
                holds.append(held)
            code = await asyncio.wait_for(guest.wait(), 60)
            # The guest's socat is done once its kernel took the upload; the relay
            # still holds the tail in its host socket, for the peer to read.
            await asyncio.to_thread(proc.wait, 60)
            elapsed = time.monotonic() - started
            for key, value in relay.stats().items():
                exports[key] = exports.get(key, 0) + value
        finally:
            relay.close()
            guest.close()
        return code, docs, holds, elapsed, exports

    code, docs, holds, elapsed, stats = asyncio.run(main())
    assert proc.stdout is not None
    reports = {r["kind"]: r for r in map(json.loads, proc.stdout.read().splitlines())}
    after = _tcp_counters()
    print(f"{MOVES} moves of 2 flows during {SIZE >> 20} MiB down + {SIZE >> 20} MiB up: "
          f"{elapsed:.2f} s in all; host traffic held {[round(h * 1000, 1) for h in holds]} "
          f"ms; host side retransmitted {after['RetransSegs'] - before['RetransSegs']} segments")
    assert code == 0
    for doc in docs:
        assert len(doc["flows"]) == 2, doc["not_moved"]  # type: ignore[arg-type]
        assert doc["not_moved"] == []
        # The guest's SACK permission moves with every flow, the last move's included (the
        # flows it carries were imported four times), and so does the round trip the
        # download's ACKs measured (the upload sends the guest no data to time).
        flows = doc["flows"]
        assert all(f["sack_ok"] for f in flows), flows  # type: ignore[attr-defined]
        down = [f for f in flows if f["far"][1] == down_port]  # type: ignore[attr-defined]
        assert len(down) == 1 and down[0]["guest_srtt_us"] is not None, flows
    assert reports["down"] == {"kind": "down", "sent": SIZE, "error": None}
    assert reports["up"] == {"kind": "up", "length": SIZE, "sha256": digest, "error": None}
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest
    assert after["OutRsts"] == before["OutRsts"]
    # tcp_set_state() counts every ESTABLISHED socket that goes to CLOSE as an
    # "EstabReset", including the exported ones closed in repair mode (which send
    # nothing: OutRsts above): exactly those, none of the peer's.
    assert after["EstabResets"] - before["EstabResets"] == 2 * MOVES
    assert stats["tcp_flows_exported"] == stats["tcp_flows_imported"] == 2 * MOVES
    # Each flow's bytes count once, in the relay where it ended, however often it moved.
    assert stats["tcp_bytes_from_guest"] == stats["tcp_bytes_to_guest"] == SIZE, stats
    assert stats.get("tcp_host_resets", 0) == 0


def _flow(guest_port: int, local: str) -> dict[str, object]:
    """A flow document entry whose host socket would be `local`:40000 -> 127.0.0.1:9."""
    repair = {"version": 1, "family": "ipv4", "local": [local, 40000 + guest_port],
              "peer": ["127.0.0.1", 9], "send_seq": 1000, "recv_seq": 2000, "send_queue": "",
              "unsent": 0, "recv_queue": "", "mss": 1460, "snd_wscale": 7, "rcv_wscale": 7,
              "sack": True, "timestamp": 1, "window": [2000, 65535, 65535, 65535, 2000],
              "sndbuf": 1 << 16, "rcvbuf": 1 << 16}
    return {"guest": ["10.0.2.15", guest_port], "far": ["10.0.2.2", 9], "inbound": False,
            "guest_mac": "02:00:00:00:00:01", "gateway_mac": "52:56:00:00:00:02", "iss": 5,
            "snd_una": 6, "snd_nxt": 6, "snd_max": 6, "guest_isn": 9, "rcv_nxt": 10,
            "last_ack_sent": 10, "guest_wnd_edge": 65542, "guest_wscale": 7,
            "our_wscale": 8, "adv_edge": 70000, "adv_field": 200, "mss": 1448,
            "our_mss": 65480, "timestamps": True, "tsval": 77, "ts_recent": 88,
            "retries": 0, "syn_retransmitted": False, "rtt_exp": 0, "write_blocked": False,
            "ack_pending": False, "bytes_from_guest": 0, "bytes_to_guest": 0,
            "socket": repair}


@pytest.mark.parametrize(("second", "error"), [
    # The kernel refuses the second socket (no such local address): the first one,
    # restored in repair mode, is closed again silently.
    (_flow(2, "10.9.9.9"), "restoring"),
    (_flow(2, "127.0.0.1") | {"guest": ["10.0.2.99", 2]}, "not this relay's guest"),
    (_flow(2, "127.0.0.1") | {"version": 2}, "unknown field"),
])
def test_a_failed_import_imports_nothing(second: dict[str, object], error: str) -> None:
    doc = {"format": "relaynat-flows", "version": 1, "flows": [_flow(1, "127.0.0.1"), second],
           "not_moved": []}
    before = _tcp_counters()

    async def main() -> tuple[list[FlowInfo], dict[str, int]]:
        async with Relay(RelayConfig(ipv6=False)) as relay:
            with pytest.raises((ValueError, OSError), match=error):
                relay.import_flows(doc)
            return relay.flows(), relay.stats()

    flows, stats = asyncio.run(main())
    assert flows == []
    assert stats["tcp_flows_imported"] == 0
    after = _tcp_counters()
    assert after["OutSegs"] == before["OutSegs"]  # not a packet: no probe, no RST
