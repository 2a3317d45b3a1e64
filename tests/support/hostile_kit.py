"""A hostile guest's kit: a relay in its own process, a guest that writes raw frames into
it, and a probe that times the relay's control-socket answers from a third process.

The relay is the real CLI (`relaynat serve --socket ... --control-socket ...`), so the
event loop under attack is the one every guest and the control socket share. The guest
is `RawGuest`: frames built with relaynat.testing.frames and written on the qemu stream
wire, with a reader thread that drains what the relay sends (a guest that stops reading
would only test the transport's queue limit) and keeps the TCP segments a test asks
for. `ControlProbe` runs tests/support/control_probe.py beside them: its answer times are how
long the loop was held, which is what issue-style "one flow freezes every guest" items
are judged by.

    with hostile_relay(tmp_path) as relay, RawGuest(relay.socket) as guest:
        with ControlProbe(relay.control, seconds=5) as probe:
            ...attack...
        assert probe.result().p99 < 0.1
"""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from relaynat.config import RelayConfig
from relaynat.packet_builder import tcp_options_syn
from relaynat.testing import frames as f
from relaynat.testing.guest import Reply
from relaynat.wire import ACK, RST, SYN
from support import SUPPORT
from support.lossy_harness import RelayProc, serve_relay, wait_for

_LEN = struct.Struct("!I")


@dataclass
class HostileRelay:
    """`relaynat serve` with a control socket; `relay.stats()` after the context ends."""

    relay: RelayProc
    control: str

    @property
    def socket(self) -> str:
        return self.relay.socket

    @property
    def pid(self) -> int:
        return self.relay.proc.pid

    def stats(self) -> dict[str, int]:
        return self.relay.stats()


@contextlib.contextmanager
def hostile_relay(work: Path, options: Sequence[str] = ()) -> Iterator[HostileRelay]:
    """`relaynat serve --socket WORK/relay.sock --control-socket WORK/control.sock` in its
    own process (stopped on exit; its --stats counters are read then)."""
    control = str(work / "control.sock")
    with serve_relay(work, ["--control-socket", control, *options]) as relay:
        wait_for(lambda: Path(control).exists(), 10, "control socket")
        yield HostileRelay(relay, control)


class RawGuest:
    """The guest's end of a relay's stream socket, frame by frame.

    `send`/`send_many` write frames; a reader thread parses every frame the relay sends
    and counts them (`frames_in`), and queues those `keep` accepts (default: none) for
    `next_reply`. `addressing` is `RelayConfig()`'s unless `config` says otherwise."""

    def __init__(self, path: str, config: RelayConfig | None = None,
                 guest_mac: bytes = f.GUEST_MAC) -> None:
        self.addressing = f.Addressing.of(config or RelayConfig(), guest_mac)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.keep: Callable[[Reply], bool] = lambda reply: False
        self.frames_in = 0
        self.bytes_in = 0
        self.closed_by_relay = False
        self._kept: queue.Queue[Reply] = queue.Queue()
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def __enter__(self) -> RawGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, frame: bytes) -> None:
        self.sock.sendall(_LEN.pack(len(frame)) + frame)

    def send_many(self, frames: Iterable[bytes], batch: int = 256) -> int:
        """Write `frames` in batches of `batch` per sendall; the count written."""
        out: list[bytes] = []
        n = 0
        for frame in frames:
            out.append(_LEN.pack(len(frame)))
            out.append(frame)
            n += 1
            if len(out) >= 2 * batch:
                self.sock.sendall(b"".join(out))
                out.clear()
        if out:
            self.sock.sendall(b"".join(out))
        return n

    def next_reply(self, timeout: float = 5.0) -> Reply:
        """The next frame `keep` accepted; TimeoutError if none arrives in time."""
        try:
            return self._kept.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no kept frame from the relay in {timeout} s") from None

    def expect(self, match: Callable[[Reply], bool], timeout: float = 5.0) -> Reply:
        """The next kept frame that `match`es (kept frames before it are dropped)."""
        deadline = time.monotonic() + timeout
        while True:
            reply = self.next_reply(max(0.0, deadline - time.monotonic()))
            if match(reply):
                return reply

    def tcp(self, sport: int, dport: int, seq: int, ack: int, flags: int, *,
            window: int = 65535, payload: bytes = b"", options: bytes = b"",
            dst: bytes | None = None, v6: bool = False) -> bytes:
        """A guest TCP segment toward `dst` (default: the gateway, host loopback)."""
        return f.tcp_segment(self.addressing, v6, sport, dport, seq, ack, flags, window,
                             payload, options, dst)

    def handshake(self, sport: int, dport: int, syn_options: bytes, *, isn: int = 1000,
                  window: int = 65535, dst: bytes | None = None) -> int:
        """SYN with `syn_options`, wait for the SYN-ACK, ACK it; the relay's next
        sequence number (the guest's rcv_nxt). Sets `keep` to this flow's segments."""
        def ours(reply: Reply) -> bool:
            seg = reply.tcp
            return seg is not None and seg.sport == dport and seg.dport == sport

        self.keep = ours
        self.send(self.tcp(sport, dport, isn, 0, SYN, window=window, options=syn_options,
                           dst=dst))
        synack = self.expect(lambda r: r.tcp is not None and bool(r.tcp.flags & SYN), 10.0)
        assert synack.tcp is not None and synack.tcp.flags & ACK, synack.tcp
        rcv_nxt = (synack.tcp.seq + 1) & 0xFFFFFFFF
        self.send(self.tcp(sport, dport, isn + 1, rcv_nxt, ACK, window=window, dst=dst))
        return rcv_nxt

    def open_idle_flows(self, port: int, count: int, first_sport: int = 20000) -> int:
        """`count` established flows to host `port` (a listener that never accepts:
        its kernel completes the handshakes), SYNs in batches of 500, then left idle;
        the number the relay answered with a SYN-ACK."""
        self.keep = lambda r: r.tcp is not None and bool(r.tcp.flags & SYN)
        for at in range(first_sport, first_sport + count, 500):
            self.send_many(self.tcp(sport, port, 7, 0, SYN, options=tcp_options_syn(1460, 7))
                           for sport in range(at, min(at + 500, first_sport + count)))
            time.sleep(0.05)
        synacks = [self.next_reply(10).tcp for _ in range(count)]
        self.keep = lambda r: False
        self.send_many(self.tcp(s.dport, port, 8, (s.seq + 1) & 0xFFFFFFFF, ACK)
                       for s in synacks if s is not None)
        time.sleep(0.5)
        return sum(s is not None for s in synacks)

    def flapping_mac_frames(self, count: int) -> list[bytes]:
        """`count` stray RSTs, each from a new source MAC (locally administered,
        unicast): every one makes the relay learn a guest MAC."""
        template = self.tcp(1, 1, 0, 0, RST)
        frames = []
        for i in range(count):
            frame = bytearray(template)
            frame[6:12] = b"\x02" + i.to_bytes(5, "big")
            frames.append(bytes(frame))
        return frames

    def _read(self) -> None:
        buf = bytearray()
        while not self._stop.is_set():
            try:
                chunk = self.sock.recv(1 << 20)
            except OSError:
                return
            if not chunk:
                self.closed_by_relay = True
                return
            self.bytes_in += len(chunk)
            buf += chunk
            at = 0
            while len(buf) - at >= 4:
                (length,) = _LEN.unpack_from(buf, at)
                if len(buf) - at < 4 + length:
                    break
                frame = bytes(buf[at + 4:at + 4 + length])
                at += 4 + length
                self.frames_in += 1
                reply = Reply.parse(frame)
                if self.keep(reply):
                    self._kept.put(reply)
            del buf[:at]

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._reader.join(5)


@dataclass(frozen=True)
class ProbeResult:
    latencies: list[float]
    timed_out: bool

    def quantile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def p99(self) -> float:
        return self.quantile(0.99)

    @property
    def worst(self) -> float:
        return max(self.latencies)

    def summary(self) -> str:
        return (f"{len(self.latencies)} answers, p50 {self.quantile(0.5) * 1e3:.1f} ms, "
                f"p99 {self.p99 * 1e3:.1f} ms, max {self.worst * 1e3:.1f} ms"
                + (", ended on a timeout" if self.timed_out else ""))


class ControlProbe:
    """tests/support/control_probe.py against `control` for `seconds`, as a process of its own;
    `result()` once it ended (the context's exit waits for it)."""

    def __init__(self, control: str, seconds: float, interval: float = 0.02,
                 timeout: float = 30.0) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, str(SUPPORT / "control_probe.py"), control, "--seconds",
             str(seconds), "--interval", str(interval), "--timeout", str(timeout)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._wait_s = seconds + timeout + 10
        self._result: ProbeResult | None = None

    def __enter__(self) -> ControlProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.result()

    def result(self) -> ProbeResult:
        if self._result is None:
            try:
                out, err = self._proc.communicate(timeout=self._wait_s)
            finally:
                if self._proc.poll() is None:
                    self._proc.kill()
                    self._proc.communicate()
            assert self._proc.returncode == 0, f"control probe failed: {err}"
            data = json.loads(out)
            assert data["latencies"], "the control probe got no answer at all"
            self._result = ProbeResult(data["latencies"], data["timed_out"])
        return self._result
