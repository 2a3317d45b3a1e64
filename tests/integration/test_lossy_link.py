"""The relay over a faulty wire: a real guest kernel, a lossy shim, the real relay.

    guest netns (tap0, udhcpc, curl)  <->  tests/support/netshim.py  <->  relaynat serve --socket
                                                                     |
                                                     host_peers.py http on 127.0.0.1

The shim drops, duplicates and reorders frames in userspace (the kernel has no netem),
seeded: every test prints its seed, and RELAYNAT_LOSSY_SEED=N replays one. What is
checked is end-to-end integrity (sha256 of what the far side received) and that no
transfer stalls: each must finish within its budget, and one that moves no byte for
STALL_S seconds fails at once with the guest's TCP state (`ss -ti`: rto, backoff,
retransmissions) in the message. Throughput is printed (`pytest -s`), not asserted.

A control test runs the same kind of faulty wire between two real kernels (no relay),
to show that the impairments are ones standard TCP gets through quickly.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import GUESTS
from support.lossy_harness import (
    Payload,
    RelayProc,
    http_peer,
    make_payloads,
    report,
    seed_from_env,
    serve_relay,
    stop_proc,
    transfer_both_ways,
    wait_for,
    watched,
)
from support.netshim import GATEWAY_IP, LossyGuest


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Payload]:
    return make_payloads(tmp_path_factory.mktemp("lossy-files"), (16, 64))


@pytest.fixture(scope="module")
def http_port(files: dict[str, Payload],
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    root = next(iter(files.values())).path.parent
    with http_peer(root, tmp_path_factory.mktemp("lossy-http")) as port:
        yield port


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayProc]:
    with serve_relay(tmp_path) as r:
        yield r


def _direction_stats(g: LossyGuest, direction: str) -> dict[str, int]:
    st = g.shim_stats[direction]
    assert isinstance(st, dict), g.shim_stats
    return st


def _assert_impaired(g: LossyGuest, kinds: tuple[str, ...]) -> None:
    """The wire really misbehaved, in both directions, as configured."""
    for direction in ("to_relay", "to_guest"):
        st = _direction_stats(g, direction)
        for kind in kinds:
            assert st[kind] > 0, f"seed={g.seed}: no {kind} frames {direction}: {st}"


@pytest.mark.integration
def test_clean_wire_dhcp_and_64mib_both_ways(relay: RelayProc, http_port: int,
                                             files: dict[str, Payload], tmp_path: Path) -> None:
    g = transfer_both_ways(relay, http_port, tmp_path, files["down-64"], files["up-64"],
                            "", dhcp=True, budget_s=60)
    for direction in ("to_relay", "to_guest"):
        st = _direction_stats(g, direction)
        assert st["dropped"] == st["duplicated"] == st["reordered"] == 0, st
        # MTU 65520 in effect both ways: near-64 KiB frames from the guest and the relay.
        assert st["max_frame"] > 60000, st


@pytest.mark.integration
def test_loss_reorder_duplication_64mib_both_ways(relay: RelayProc, http_port: int,
                                                  files: dict[str, Payload],
                                                  tmp_path: Path) -> None:
    g = transfer_both_ways(relay, http_port, tmp_path, files["down-64"], files["up-64"],
                            "loss=0.01,dup=0.01,reorder=0.02,hold=3,hold_ms=5",
                            dhcp=True, budget_s=120)
    _assert_impaired(g, ("dropped", "duplicated", "reordered"))


@pytest.mark.integration
def test_five_percent_loss_16mib_both_ways(relay: RelayProc, http_port: int,
                                           files: dict[str, Payload], tmp_path: Path) -> None:
    """The guest's kernel reports what it holds beyond each lost frame in SACK blocks,
    and the relay sends the holes again from the host socket's queue (the download's
    recovery) instead of the whole flight after them."""
    before = relay.stats()
    g = transfer_both_ways(relay, http_port, tmp_path, files["down-16"], files["up-16"],
                            "loss=0.05", dhcp=False, budget_s=120)
    _assert_impaired(g, ("dropped",))
    after = relay.stats()
    assert after["tcp_sack_resends"] > before.get("tcp_sack_resends", 0), after


@pytest.mark.integration
def test_corruption_16mib_both_ways(relay: RelayProc, http_port: int,
                                    files: dict[str, Payload], tmp_path: Path) -> None:
    """Bits flipped on the wire both ways: the guest's kernel drops damaged segments
    from the relay, the relay drops damaged ones from the guest (its TCP checksum), and
    the retransmissions make both streams whole."""
    g = transfer_both_ways(relay, http_port, tmp_path, files["down-16"], files["up-16"],
                           "corrupt=0.03", dhcp=False, budget_s=120)
    _assert_impaired(g, ("corrupted",))
    assert relay.stats()["drop_tcp_checksum"] > 0


@pytest.mark.integration
def test_delay_with_jitter_16mib_both_ways_with_sack(relay: RelayProc, http_port: int,
                                                     files: dict[str, Payload],
                                                     tmp_path: Path) -> None:
    """50 ms each way with 10 ms of jitter: frames overtake each other all the time.
    The relay holds what arrives beyond a hole (ooo_queue.py) and tells the guest in
    SACK blocks, so the guest's kernel sees reordering, not loss: its counters say it
    learned of the reordering from SACK blocks (TCPSACKReorder, which a guest without
    SACK never counts; it would count TCPRenoReorder and enter Reno recovery)."""
    g = transfer_both_ways(relay, http_port, tmp_path, files["down-16"], files["up-16"],
                           "delay_ms=50,jitter_ms=10", dhcp=False, budget_s=120)
    tcp = g.nstat
    assert tcp.get("TcpExtTCPSACKReorder", 0) > 0, tcp
    assert tcp.get("TcpExtTCPRenoReorder", 0) == tcp.get("TcpExtTCPRenoRecovery", 0) == 0, tcp
    stats = relay.stats()
    assert stats["tcp_ooo_segments"] > 0, stats
    assert stats.get("tcp_ooo_drop_budget", 0) == 0, stats
    # The download's flight a guest 100 ms away needs outgrew the host socket's receive
    # buffer as the kernel tunes it on loopback (host/pump.py): it was grown.
    assert stats.get("tcp_rcvbuf_grown", 0) > 0, stats


@pytest.mark.integration
def test_control_two_kernels_same_faults(files: dict[str, Payload], tmp_path: Path) -> None:
    """The shim between two real kernels (no relay): 64 MiB at 5% loss, and with loss,
    duplication and reordering, arrive intact in seconds. So the faults of the tests
    above are ones standard TCP (SACK, timestamps) handles: a relay that stalls on
    them is at fault, not the wire."""
    up = files["up-64"]
    for spec in ("loss=0.05", "loss=0.01,dup=0.01,reorder=0.02,hold=3,hold_ms=5"):
        seed = seed_from_env()
        print(f"\ncontrol seed={seed} spec=[{spec}]")
        wire = str(tmp_path / "wire.sock")
        with LossyGuest(tmp_path, wire, seed, listen=True) as host, \
                LossyGuest(tmp_path, wire, seed, to_relay=spec, to_guest=spec) as g:
            host.static(f"{GATEWAY_IP}/24", gateway=None)
            g.static()
            sink = subprocess.Popen(["ip", "netns", "exec", host.name, sys.executable,
                                     str(GUESTS / "tcp_hash_sink.py"), GATEWAY_IP],
                                    stdout=subprocess.PIPE, text=True, start_new_session=True)
            try:
                wait_for(lambda: ":5001 " in host.run(["ss", "-Htln"], timeout=10).stdout,
                          10, "control sink")
                t0 = time.monotonic()
                out = watched(g, [sys.executable, str(GUESTS / "tcp_send_file.py"), GATEWAY_IP,
                                  str(up.path)], GATEWAY_IP, time.monotonic() + 60)
                secs = time.monotonic() - t0
                report("control upload", up, secs)
            finally:
                stop_proc(sink)
                sink.communicate(timeout=10)
        assert out.split() == [up.sha256, str(up.size)], f"seed={seed}: {out!r}"
        assert secs < 30, f"seed={seed}: control transfer took {secs:.1f} s"
        print(f"control shim counters: {json.dumps(g.shim_stats)}")
        assert _direction_stats(g, "to_relay")["dropped"] > 0, g.shim_stats
