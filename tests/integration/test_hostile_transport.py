"""A hostile guest link, and a mistaken control request, against the relay's one loop.

- The qemu stream transport hands a guest's frames over in slices (transport.
  WAKEUP_SLICE_S, checked per frame): a read of a mebibyte of small frames is not
  delivered whole before the loop serves anything else, and the frames a slice leaves
  are delivered on the next loop iteration even if the guest sends nothing more. The
  queue toward a guest that reads slowly drains in slices too. Judged as the issue
  judges it: the relay's control-socket answers, timed from another process, while a
  guest floods (tests/support/hostile_kit.py).
- A stream client that connects and closes at once leaves no traceback and no armed
  timer: the relay serves the next client (`serve --socket`), or exits cleanly
  (`serve --fd`).
- `import_flows` refuses a path that is not a regular file or is too large without
  reading it into the loop, and reads a document in a worker thread.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from support.hostile_kit import ControlProbe, RawGuest, hostile_relay
from support.lossy_harness import serve_relay

from relaynat.control.client import call
from relaynat.control.flows_file import MAX_DOCUMENT
from relaynat.testing import frames as f
from relaynat.transports.base import FrameTransport
from relaynat.transports.stream import StreamTransport

pytestmark = pytest.mark.integration

_LEN = struct.Struct("!I")
#: The issue's budget for a control answer while one guest attacks; the measured p99
#: is a few milliseconds (figures in the assertion messages).
P99_BUDGET_S = 0.1
#: A file of zeros under MAX_DOCUMENT, read whole before it is refused.
ZEROS = 128 << 20


def _framed(frames: list[bytes]) -> bytes:
    return b"".join(_LEN.pack(len(frame)) + frame for frame in frames)


# -- the stream transport's slices, in process --------------------------------------------


class _CostlySink:
    """A FrameSink whose every frame costs `cost_s` of CPU (a frame that opens a flow
    or rebuilds templates does); records each batch's frames and duration."""

    def __init__(self, cost_s: float, stop_after_batches: int | None = None) -> None:
        self.cost_s = cost_s
        self.frames: list[bytes] = []
        self.batches: list[tuple[int, float]] = []
        self.transport: StreamTransport | None = None
        self._stop_after = stop_after_batches
        self._batch_start: float | None = None
        self._batch_frames = 0

    def handle_frame(self, frame: memoryview) -> None:
        if self._batch_start is None:
            self._batch_start = time.perf_counter()
        self.frames.append(bytes(frame))
        self._batch_frames += 1
        end = time.perf_counter() + self.cost_s
        while time.perf_counter() < end:
            pass

    def end_of_batch(self) -> None:
        if self._batch_start is not None:
            self.batches.append((self._batch_frames, time.perf_counter() - self._batch_start))
        self._batch_start, self._batch_frames = None, 0
        if self._stop_after is not None and len(self.batches) == self._stop_after:
            assert self.transport is not None
            self.transport.stop()

    def transport_lost(self, transport: FrameTransport, reason: str) -> None:
        raise AssertionError(f"transport lost: {reason}")


def _numbered_frames(count: int) -> list[bytes]:
    """`count` 60-byte frames, each carrying its index."""
    return [bytes(14) + i.to_bytes(4, "big") + bytes(42) for i in range(count)]


def test_a_read_of_many_costly_frames_is_delivered_in_slices() -> None:
    """3,000 frames of 20 µs each arrive in one read (192 kB): delivered whole, as
    before, they held the loop 60 ms in one batch; in slices, each batch lasts about
    WAKEUP_SLICE_S, and the rest is delivered though the guest sends nothing more."""
    sent = _numbered_frames(3000)

    async def main() -> _CostlySink:
        guest, relay_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        guest.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        guest.sendall(_framed(sent))
        sink = _CostlySink(20e-6)
        transport = StreamTransport(relay_end)
        transport.start(sink)
        deadline = time.monotonic() + 10
        while len(sink.frames) < len(sent):
            assert time.monotonic() < deadline, f"{len(sink.frames)} frames delivered"
            await asyncio.sleep(0.001)
        transport.close()
        guest.close()
        return sink

    sink = asyncio.run(main())
    assert sink.frames == sent
    longest = max(seconds for _, seconds in sink.batches)
    assert len(sink.batches) >= 20, sink.batches[:5]
    assert longest < 0.01, f"a batch held the loop {longest * 1e3:.1f} ms"


def test_frames_a_slice_left_move_with_the_socket() -> None:
    """A transport stopped between slices (a handover, `detach(keep_transport=True)`)
    hands the whole frames it read and did not deliver to the next transport on the
    socket, which delivers them first, in order, then reads on."""
    sent = _numbered_frames(3000)

    async def main() -> tuple[_CostlySink, _CostlySink]:
        guest, relay_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        guest.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        guest.sendall(_framed(sent[:2000]))
        first = _CostlySink(20e-6, stop_after_batches=2)
        old = StreamTransport(relay_end)
        first.transport = old
        old.start(first)
        deadline = time.monotonic() + 10
        while len(first.batches) < 2:
            assert time.monotonic() < deadline, f"{len(first.batches)} batches"
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.05)  # a continuation, had one stayed queued, would run
        pending_in, pending_out = old.handover_state()
        assert pending_out == b""
        assert len(pending_in) > 4 * 64, "the slices left no whole frame to hand over"
        second = _CostlySink(0)
        new = StreamTransport(socket.socket(fileno=os.dup(relay_end.fileno())),
                              pending_in=pending_in)
        new.start(second)
        guest.sendall(_framed(sent[2000:]))
        deadline = time.monotonic() + 10
        while len(first.frames) + len(second.frames) < len(sent):
            assert time.monotonic() < deadline, (len(first.frames), len(second.frames))
            await asyncio.sleep(0.001)
        new.close()
        old.close()
        guest.close()
        return first, second

    first, second = asyncio.run(main())
    assert first.frames + second.frames == sent


# -- the stream transport's slices, against a relay process -------------------------------


def test_a_flood_of_small_frames_leaves_the_control_socket_answering(tmp_path: Path) -> None:
    """A guest writes 60-byte frames as fast as it can through an 8 MiB socket buffer:
    ARP requests (each answered, and the guest reads the answers slowly) and TCP
    segments with a bad checksum (each dropped). Before the slices, each wakeup
    delivered a whole read of a mebibyte, 17,000 frames, and drained the queue of
    answers one send each: control answers took 0.3-0.7 s."""
    with hostile_relay(tmp_path) as relay, RawGuest(relay.socket) as guest:
        guest.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        a = guest.addressing
        arp = f.arp_request(a, a.gateway4)
        arp += bytes(60 - len(arp))
        bad = bytearray(guest.tcp(40000, 80, 1, 0, 0x10))
        bad[-1] ^= 0xFF  # the TCP checksum's low byte (no payload, no options)
        flood = [arp, bytes(bad)] * 2048
        sent = 0
        with ControlProbe(relay.control, seconds=4) as probe:
            end = time.monotonic() + 4
            while time.monotonic() < end:
                sent += guest.send_many(flood, batch=len(flood))
    stats = relay.stats()
    result = probe.result()
    print(f"flood of {sent} frames, {stats['frames_in']} handled: control {result.summary()}")
    assert stats["frames_in"] > 100_000 and stats["arp_replies"] > 50_000, stats
    assert stats["drop_tcp_checksum"] > 50_000, stats
    assert not result.timed_out and result.p99 < P99_BUDGET_S, result.summary()


# -- stream clients that go at once -------------------------------------------------------


def _arp_and_dhcp_answered(path: str) -> None:
    with RawGuest(path) as guest:
        a = guest.addressing
        guest.keep = lambda reply: reply.arp is not None or (
            reply.udp is not None and reply.udp.sport == 67)
        guest.send(f.arp_request(a, a.gateway4))
        reply = guest.expect(lambda r: r.arp is not None, 5)
        assert reply.arp is not None and reply.arp.sender_ip == a.gateway4
        guest.send(f.dhcp_discover(a, xid=77))
        guest.expect(lambda r: r.udp is not None, 5)


def test_clients_that_close_at_once_leave_no_traceback(tmp_path: Path) -> None:
    """500 clients connect and close before the relay accepts them: the router
    advertisement sent on attach fails (EPIPE), the transport is lost and the relay
    detached inside attach. Before the fix, the advert's timer was then armed on a
    detached relay's cleared loop: an AttributeError traceback per client."""
    with serve_relay(tmp_path) as relay:
        for _ in range(500):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.connect(relay.socket)
        deadline = time.monotonic() + 30
        while relay.log.read_text().count("guest transport lost") < 500:
            assert time.monotonic() < deadline, relay.log.read_text()[-2000:]
            time.sleep(0.05)
        _arp_and_dhcp_answered(relay.socket)
    log = relay.log.read_text()
    stats = relay.stats()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    assert stats["stream_clients"] == 501 and stats["transport_lost"] >= 500, stats
    assert stats["arp_replies"] == 1 and stats["dhcp_replies"] == 1, stats


def test_serve_fd_of_a_guest_already_gone_exits_cleanly() -> None:
    """`serve --fd` on a stream socket whose peer has closed: attach loses the
    transport at its first frame; before the fix the AttributeError came out of
    attach() and the relay died with a traceback."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.close()
    proc = subprocess.Popen([sys.executable, "-m", "relaynat", "serve", "--fd",
                             str(theirs.fileno()), "--stats", "--log-level", "info"],
                            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    theirs.close()
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert "guest transport lost" in err, err


# -- import_flows of what is not a document -----------------------------------------------


def _hwm_kib(pid: int) -> int:
    """The process's peak resident memory (VmHWM)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _control(path: str, request: dict[str, Any], timeout: float,
             fd: int | None = None) -> tuple[dict[str, Any], float]:
    """One request on a connection of its own, through `relaynat ctl`'s client: the
    answer and how long it took. With `fd`, the request says so and (a copy of) the
    descriptor follows the relay's send_fd answer, as `relaynat ctl` passes the file it
    opened (docs/cli.md, passing a descriptor)."""
    if fd is not None:
        request = {**request, "arguments": {**request["arguments"], "fd": True}}
    start = time.monotonic()
    answer = call(path, request, timeout, None if fd is None else (lambda: os.dup(fd)))
    return answer, time.monotonic() - start


#: How the flows file reaches the relay: by path (an unconfined relay opens it: the path
#: form older clients send) or as a descriptor `relaynat ctl` opened (any relay,
#: confined by default).
FORMS = ["path", "fd"]


def _relay_options(form: str) -> list[str]:
    return ["--no-confine"] if form == "path" else ["--confine"]


def _open_for(form: str, path: str) -> int | None:
    """What the client passes for `path`: nothing (path form) or a descriptor of it, a
    FIFO opened without waiting for a writer."""
    if form == "path":
        return None
    return os.open(path, os.O_RDWR | os.O_NONBLOCK if path.endswith("fifo") else os.O_RDONLY)


@pytest.mark.parametrize("form", FORMS)
def test_import_flows_of_a_device_a_fifo_or_a_huge_file_is_refused_with_the_loop_free(
        tmp_path: Path, form: str) -> None:
    """/dev/zero (the issue's case: 1 GiB read on the loop, 6.5 s, +2.3 GiB), a FIFO
    nobody writes (would block forever), a file past MAX_DOCUMENT: refused unread. A
    file of 128 MiB of zeros (a second's read here) is read off the loop and refused
    as not JSON. The control probe on another connection keeps being answered throughout, and
    the relay's peak memory grows by less than MAX_DOCUMENT."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as out:
        out.truncate(MAX_DOCUMENT + 1)  # sparse: nothing on disk
    zeros = tmp_path / "zeros.json"
    with open(zeros, "wb") as out:
        out.truncate(ZEROS)
    # A descriptor that is no regular file is refused at its fstat, before any read.
    passed = "the descriptor passed for " if form == "fd" else ""
    cases = [("/dev/zero", passed, "is not a regular file"),
             (str(fifo), passed, "is not a regular file"),
             (str(huge), "", f"more than a flows document may be ({MAX_DOCUMENT})"),
             (str(zeros), "", "is not JSON")]
    answers: list[tuple[str, float]] = []
    with hostile_relay(tmp_path, _relay_options(form)) as relay:
        hwm_before = _hwm_kib(relay.pid)
        with ControlProbe(relay.control, seconds=4) as probe:
            time.sleep(0.3)
            for path, prefix, error in cases:
                fd = _open_for(form, path)
                try:
                    answer, seconds = _control(
                        relay.control, {"execute": "import_flows",
                                        "arguments": {"file": path}}, 20, fd)
                finally:
                    if fd is not None:
                        os.close(fd)
                assert isinstance(answer, dict) and "error" in answer, answer
                desc = answer["error"]["desc"]
                assert desc.startswith(f"import_flows: {prefix}{path}") and error in desc, desc
                assert "nothing imported" in desc, desc
                answers.append((path, seconds))
        grew_kib = _hwm_kib(relay.pid) - hwm_before
    result = probe.result()
    print(f"import_flows answers: {answers}; peak memory +{grew_kib >> 10} MiB; control "
          f"{result.summary()}")
    for path, seconds in answers[:3]:
        assert seconds < 0.5, (path, seconds)
    assert answers[3][1] < 5, answers
    assert grew_kib < (MAX_DOCUMENT >> 10), f"+{grew_kib} KiB"
    assert not result.timed_out and result.p99 < P99_BUDGET_S, result.summary()


@pytest.mark.parametrize("form", FORMS)
def test_a_real_import_still_answers(tmp_path: Path, form: str) -> None:
    """The threaded read serves real documents: one with no flows imports nothing, and
    an unknown key is refused by the document's checks, as before."""
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"format": "relaynat-flows", "version": 2, "flows": [],
                                 "not_moved": []}))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "relaynat-flows", "version": 2, "flows": [],
                               "not_moved": [], "extra": 1}))
    with hostile_relay(tmp_path, _relay_options(form)) as relay:
        for doc in (empty, bad):
            fd = _open_for(form, str(doc))
            try:
                answer, _ = _control(relay.control, {"execute": "import_flows",
                                                     "arguments": {"file": str(doc)}}, 10, fd)
            finally:
                if fd is not None:
                    os.close(fd)
            if doc is empty:
                assert answer == {"return": {"file": str(empty), "imported": []}}, answer
            else:
                assert isinstance(answer, dict) and "nothing imported" in answer["error"]["desc"]

