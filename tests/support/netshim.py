#!/usr/bin/env python3
"""A lossy wire between a real Linux guest kernel and the relay's stream socket.

The kernel here has no sch_netem, so loss, duplication and reordering are made in
userspace, by this shim sitting on the wire::

    guest netns (real kernel, tap0)  <-TAP fd->  netshim  <-unix stream->  relaynat serve

It is a real client of qemu's stream wire format (each frame: a 4-byte big-endian
length, then the Ethernet frame), implemented here independently of relaynat.transports.stream,
with a real kernel behind it; with `--unixgram` it speaks the datagram wire instead, as
vfkit does (its own socket bound at the path `--unixgram` names, connected to the
relay's, `VFKT` sent first, then one frame per datagram), independently of
relaynat.transports.unixgram; adding `--qemu-dgram`, as qemu's `-netdev dgram` does (bound,
not connected: every frame sent to the relay's path, no handshake). Nothing is
mocked: the guest's TCP, ARP and DHCP client, the relay process and the host-side
servers are all real; only the wire misbehaves.

Command line (run *inside* the guest's network namespace, so the TAP is created
there; the unix socket is a filesystem object and reaches the relay in any netns)::

    ip netns exec NS python3 tests/support/netshim.py --tap tap0 --socket RELAY.sock \\
        --seed 1234 --to-relay loss=0.01,dup=0.01,reorder=0.02 --to-guest loss=0.01 \\
        --ready-file READY --stats-file STATS.json

Impairment spec per direction (comma-separated key=value, all default 0/off):

    loss=P        drop a frame with probability P
    dup=P         deliver a frame twice with probability P (the copy right after it)
    reorder=P     with probability P hold a frame back; it is released after the next
                  `hold` frames of that direction have gone out, or after `hold_ms`
                  milliseconds, whichever comes first (so a quiet link still drains)
    hold=K        frames a held frame waits for (default 3)
    hold_ms=T     longest hold in milliseconds (default 5)
    corrupt=P     flip one bit of a frame, past its Ethernet header, with probability P
                  (the checksums must catch it: no receiver may take it as data)
    delay_ms=D    deliver every frame D milliseconds late
    jitter_ms=J   plus or minus up to J ms, uniformly, per frame (frames overtake each
                  other when J exceeds their spacing, as with netem's jitter)

Each direction draws from its own `random.Random(f"{seed}:{direction}")` with exactly
six draws per frame, so a seed reproduces the same decisions for the same frame
sequence; the seed is printed on stderr at start and stored in the stats file. The
frame sequence itself depends on timing (the guest's TSO autosizing, pacing, when held
frames time out), so a replay reproduces the fault pattern statistically, not exactly.

Backpressure: when more than 4 MiB wait to be written to the relay socket, the shim
stops reading the TAP (the guest's qdisc and TCP then hold back) instead of growing.
Writes to the TAP never block; a write the kernel refuses counts as a wire drop.

SIGTERM/SIGINT end the shim; so does the relay closing the socket (exit status 3) or
sending a frame length outside 14..65535 (exit status 4: framing broken). On every
exit the counters are written to `--stats-file` as JSON.

In-process harness for tests: `LossyGuest` creates the namespace, starts the shim in
it, configures the guest (DHCP with busybox udhcpc, or static), runs commands in the
namespace and tears everything down.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import heapq
import itertools
import json
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
MIN_FRAME = 14
MAX_FRAME = 65535
_LEN = struct.Struct("!I")
_TAP_READ = 65536 + 64
_TAP_FRAMES_PER_WAKEUP = 64
_SOCK_READS_PER_WAKEUP = 16
_RECV_BUF = 1 << 20
_OUT_HIGH = 4 << 20
_OUT_LOW = 1 << 20


# --------------------------------------------------------------------------------------
# Impairment model (pure; one instance per direction)
# --------------------------------------------------------------------------------------


@dataclass
class ImpairSpec:
    loss: float = 0.0
    dup: float = 0.0
    reorder: float = 0.0
    hold: int = 3
    hold_ms: float = 5.0
    corrupt: float = 0.0
    delay_ms: float = 0.0
    jitter_ms: float = 0.0

    _PROBABILITIES = ("loss", "dup", "reorder", "corrupt")
    _KEYS = (*_PROBABILITIES, "hold", "hold_ms", "delay_ms", "jitter_ms")

    @classmethod
    def parse(cls, text: str) -> ImpairSpec:
        spec = cls()
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, value = item.partition("=")
            if not sep or key not in cls._KEYS:
                raise ValueError(f"bad impairment item {item!r} ({'|'.join(cls._KEYS)})")
            if key == "hold":
                spec.hold = int(value)
                if spec.hold < 1:
                    raise ValueError("hold must be at least 1")
                continue
            number = float(value)
            if key in cls._PROBABILITIES and not 0.0 <= number <= 1.0:
                raise ValueError(f"{key}={value}: a probability is in 0..1")
            if key == "hold_ms" and number <= 0:
                raise ValueError("hold_ms must be positive")
            if key in ("delay_ms", "jitter_ms") and number < 0:
                raise ValueError(f"{key} must not be negative")
            setattr(spec, key, number)
        if spec.jitter_ms > spec.delay_ms:
            raise ValueError("jitter_ms must not exceed delay_ms")
        return spec

    def __str__(self) -> str:
        return (f"loss={self.loss},dup={self.dup},reorder={self.reorder},"
                f"hold={self.hold},hold_ms={self.hold_ms},corrupt={self.corrupt},"
                f"delay_ms={self.delay_ms},jitter_ms={self.jitter_ms}")


@dataclass
class DirectionStats:
    frames_in: int = 0
    bytes_in: int = 0
    frames_out: int = 0
    bytes_out: int = 0
    dropped: int = 0
    duplicated: int = 0
    reordered: int = 0
    corrupted: int = 0
    write_errors: int = 0
    max_frame: int = 0


@dataclass
class _Held:
    frame: bytes
    remaining: int
    deadline: float


@dataclass
class Impairment:
    """Decides, per frame, what a faulty wire delivers and when."""

    spec: ImpairSpec
    rng: random.Random
    stats: DirectionStats = field(default_factory=DirectionStats)
    held: list[_Held] = field(default_factory=list)
    #: Frames in flight on a delaying wire: (release time, sequence, frame), a heap.
    delayed: list[tuple[float, int, bytes]] = field(default_factory=list)
    _seq: itertools.count = field(default_factory=itertools.count)  # type: ignore[type-arg]

    def push(self, frame: bytes, now: float) -> list[bytes]:
        """A frame enters the wire; returns the frames that leave it now, in order."""
        st = self.stats
        st.frames_in += 1
        st.bytes_in += len(frame)
        st.max_frame = max(st.max_frame, len(frame))
        # Always six draws, so decisions line up with the frame sequence.
        r_loss, r_dup, r_reorder, r_corrupt, r_where, r_jitter = (
            self.rng.random() for _ in range(6))
        if r_loss < self.spec.loss:
            st.dropped += 1
            return self.expire(now)
        if r_corrupt < self.spec.corrupt and len(frame) > 14:
            st.corrupted += 1
            bit = int(r_where * (len(frame) - 14) * 8)
            damaged = bytearray(frame)
            damaged[14 + bit // 8] ^= 1 << (bit % 8)
            frame = bytes(damaged)
        copies = 2 if r_dup < self.spec.dup else 1
        if copies == 2:
            st.duplicated += 1
        out: list[bytes] = []
        if r_reorder < self.spec.reorder:
            st.reordered += 1
            self.held.append(_Held(frame, self.spec.hold, now + self.spec.hold_ms / 1000))
            copies -= 1  # the duplicate (if any) goes out now, ahead of the original
        for _ in range(copies):
            out.append(frame)
            self._tick(out)
        out.extend(self._expire_held(now))
        return self._delay(out, now, r_jitter)

    def _tick(self, out: list[bytes]) -> None:
        """One frame went out: held frames waiting for it move closer to release."""
        if not self.held:
            return
        keep: list[_Held] = []
        for h in self.held:
            h.remaining -= 1
            if h.remaining <= 0:
                out.append(h.frame)
            else:
                keep.append(h)
        self.held = keep

    def _expire_held(self, now: float) -> list[bytes]:
        if not self.held or min(h.deadline for h in self.held) > now:
            return []
        out = [h.frame for h in self.held if h.deadline <= now]
        self.held = [h for h in self.held if h.deadline > now]
        return out

    def _delay(self, frames: list[bytes], now: float, r_jitter: float = 0.5) -> list[bytes]:
        """Frames leaving the loss/reorder stage enter the delay line (if any); returns
        those whose time has come."""
        spec = self.spec
        if spec.delay_ms <= 0:
            return frames
        at = now + (spec.delay_ms + spec.jitter_ms * (2 * r_jitter - 1)) / 1000
        for frame in frames:
            heapq.heappush(self.delayed, (at, next(self._seq), frame))
        out: list[bytes] = []
        while self.delayed and self.delayed[0][0] <= now:
            out.append(heapq.heappop(self.delayed)[2])
        return out

    def expire(self, now: float) -> list[bytes]:
        """Frames whose hold or delay time is over."""
        return self._delay(self._expire_held(now), now)

    def next_deadline(self) -> float | None:
        deadlines = [h.deadline for h in self.held]
        if self.delayed:
            deadlines.append(self.delayed[0][0])
        return min(deadlines, default=None)


# --------------------------------------------------------------------------------------
# The shim process
# --------------------------------------------------------------------------------------


class Shim:
    def __init__(self, tap_fd: int, sock: socket.socket, to_relay: Impairment,
                 to_guest: Impairment, dgram: bool = False,
                 send_to: str | None = None) -> None:
        self.tap_fd = tap_fd
        self.sock = sock
        #: One frame per datagram, no length prefix (the unixgram wire).
        self.dgram = dgram
        #: The relay's path, for a socket that is not connected to it (qemu's dgram).
        self.send_to = send_to
        self.to_relay = to_relay
        self.to_guest = to_guest
        self.out: deque[bytes] = deque()
        self.out_bytes = 0
        self.inbuf = bytearray(_RECV_BUF)
        self.inview = memoryview(self.inbuf)
        self.in_start = 0
        self.in_end = 0
        self.ep = select.epoll()
        self.tap_reading = True
        self.stop_reason = ""
        self.exit_code = 0
        os.set_blocking(tap_fd, False)
        sock.setblocking(False)
        self.ep.register(tap_fd, select.EPOLLIN)
        self.ep.register(sock.fileno(), select.EPOLLIN)

    # guest -> relay
    def _read_tap(self, now: float) -> None:
        for _ in range(_TAP_FRAMES_PER_WAKEUP):
            try:
                frame = os.read(self.tap_fd, _TAP_READ)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                self._stop(f"TAP read failed: {exc}", 5)
                return
            if not frame:
                self._stop("TAP closed", 5)
                return
            for f in self.to_relay.push(frame, now):
                self._queue_to_relay(f)
            if self.out_bytes > _OUT_HIGH:
                return

    def _queue_to_relay(self, frame: bytes) -> None:
        self.out.append(frame if self.dgram else _LEN.pack(len(frame)) + frame)
        self.out_bytes += len(self.out[-1])
        self.to_relay.stats.frames_out += 1
        self.to_relay.stats.bytes_out += len(frame)

    def _flush_to_relay(self) -> None:
        if self.dgram:
            self._flush_datagrams()
            return
        while self.out:
            batch = list(itertools.islice(self.out, 64))
            try:
                sent = self.sock.sendmsg(batch)
            except BlockingIOError:
                return
            except OSError as exc:
                self._stop(f"relay socket write failed: {exc}", 3)
                return
            self.out_bytes -= sent
            while sent:
                head = self.out[0]
                if sent >= len(head):
                    sent -= len(head)
                    self.out.popleft()
                else:
                    self.out[0] = head[sent:]
                    sent = 0
            if self.out and len(batch) < 64:
                return  # short write: the socket is full

    def _flush_datagrams(self) -> None:
        # EAGAIN: the relay's socket holds net.unix.max_dgram_qlen datagrams; poll()
        # reports it draining to us, as we are connected to it.
        while self.out:
            try:
                if self.send_to is None:
                    self.sock.send(self.out[0])
                else:
                    self.sock.sendto(self.out[0], self.send_to)
            except BlockingIOError:
                return
            except OSError as exc:
                self._stop(f"relay socket write failed: {exc}", 3)
                return
            self.out_bytes -= len(self.out.popleft())

    # relay -> guest
    def _read_sock(self, now: float) -> None:
        if self.dgram:
            self._read_datagrams(now)
            return
        for _ in range(_SOCK_READS_PER_WAKEUP):
            if self.in_end == len(self.inbuf):
                pending = self.in_end - self.in_start
                self.inbuf[:pending] = self.inbuf[self.in_start:self.in_end]
                self.in_start, self.in_end = 0, pending
            try:
                n = self.sock.recv_into(self.inview[self.in_end:])
            except BlockingIOError:
                return
            except OSError as exc:
                self._stop(f"relay socket read failed: {exc}", 3)
                return
            if n == 0:
                self._stop("relay closed the connection", 3)
                return
            self.in_end += n
            self._parse(now)
            if self.stop_reason:
                return

    def _read_datagrams(self, now: float) -> None:
        for _ in range(_SOCK_READS_PER_WAKEUP * 8):
            try:
                frame = self.sock.recv(MAX_FRAME + 1)
            except BlockingIOError:
                return
            except OSError as exc:
                self._stop(f"relay socket read failed: {exc}", 3)
                return
            if not MIN_FRAME <= len(frame) <= MAX_FRAME:
                self._stop(f"relay sent a datagram of {len(frame)} bytes, not a frame", 4)
                return
            for f in self.to_guest.push(frame, now):
                self._write_tap(f)

    def _parse(self, now: float) -> None:
        view, start, end = self.inview, self.in_start, self.in_end
        while end - start >= 4:
            length = _LEN.unpack_from(view, start)[0]
            if not MIN_FRAME <= length <= MAX_FRAME:
                self._stop(f"relay sent frame length {length} outside "
                           f"{MIN_FRAME}..{MAX_FRAME}: framing broken", 4)
                return
            if end - start - 4 < length:
                break
            frame = bytes(view[start + 4:start + 4 + length])
            start += 4 + length
            for f in self.to_guest.push(frame, now):
                self._write_tap(f)
        if start == end:
            start = end = 0
        self.in_start, self.in_end = start, end

    def _write_tap(self, frame: bytes) -> None:
        st = self.to_guest.stats
        try:
            os.write(self.tap_fd, frame)
        except OSError:
            st.write_errors += 1  # interface down, or the kernel refused it: lost
            return
        st.frames_out += 1
        st.bytes_out += len(frame)

    def _stop(self, reason: str, code: int) -> None:
        if not self.stop_reason:
            self.stop_reason = reason
            self.exit_code = code

    def _update_interest(self) -> None:
        want_tap = self.out_bytes < (_OUT_LOW if not self.tap_reading else _OUT_HIGH)
        if want_tap != self.tap_reading:
            self.tap_reading = want_tap
            self.ep.modify(self.tap_fd, select.EPOLLIN if want_tap else 0)
        sock_ev = select.EPOLLIN | (select.EPOLLOUT if self.out else 0)
        self.ep.modify(self.sock.fileno(), sock_ev)

    def run(self, should_stop: list[bool]) -> None:
        sock_fd = self.sock.fileno()
        while not self.stop_reason and not should_stop[0]:
            deadlines = [d for d in (self.to_relay.next_deadline(),
                                     self.to_guest.next_deadline()) if d is not None]
            now = time.monotonic()
            timeout = max(0.0, min(deadlines) - now) if deadlines else 1.0
            try:
                events = self.ep.poll(min(timeout, 1.0))
            except InterruptedError:
                continue
            now = time.monotonic()
            for fd, ev in events:
                if fd == sock_fd:
                    if ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                        self._read_sock(now)
                elif fd == self.tap_fd and ev & select.EPOLLIN:
                    self._read_tap(now)
            for f in self.to_relay.expire(now):
                self._queue_to_relay(f)
            for f in self.to_guest.expire(now):
                self._write_tap(f)
            if self.out:
                self._flush_to_relay()
            if not self.stop_reason:
                self._update_interest()
        if not self.stop_reason:
            self.stop_reason = "signal"

    def stats(self, seed: int) -> dict[str, object]:
        return {
            "seed": seed,
            "stop_reason": self.stop_reason,
            "to_relay": {"spec": str(self.to_relay.spec), **asdict(self.to_relay.stats)},
            "to_guest": {"spec": str(self.to_guest.spec), **asdict(self.to_guest.stats)},
        }


def _open_tap(name: str) -> int:
    from relaynat.transports.tap import open_tap

    fd, vnet_hdr_len, _ = open_tap(name, want_vnet_hdr=False)
    assert vnet_hdr_len == 0
    return fd


def _connect(path: str, timeout_s: float) -> socket.socket:
    deadline = time.monotonic() + timeout_s
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _connect_dgram(path: str, bind: str, timeout_s: float, qemu: bool) -> socket.socket:
    """vfkit's end: bound at `bind`, connected to the relay's path, `VFKT` sent;
    `qemu`: only bound, once the relay's path exists."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(bind)
    if qemu:
        return sock
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            sock.connect(path)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                sock.close()
                raise
            time.sleep(0.02)
    sock.send(b"VFKT")
    return sock


def _accept_one(path: str, ready_file: str | None, timeout_s: float) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        listener.listen(1)
        if ready_file:
            _write_atomic(ready_file + ".listening", "")
        listener.settimeout(timeout_s)
        sock, _ = listener.accept()
        return sock
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(path)


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="lossy wire between a TAP and a relay socket")
    p.add_argument("--tap", default="tap0", help="TAP to create in this netns")
    p.add_argument("--socket", required=True, help="relay's unix stream socket")
    p.add_argument("--unixgram", metavar="BIND",
                   help="--socket is the relay's unix datagram socket: bind ours at BIND, "
                        "connect, send VFKT, one frame per datagram (vfkit's wire)")
    p.add_argument("--qemu-dgram", action="store_true",
                   help="with --unixgram: do not connect, send each frame to --socket, no "
                        "VFKT (qemu's -netdev dgram)")
    p.add_argument("--listen", action="store_true",
                   help="listen on --socket and serve one peer (e.g. another shim: a "
                        "kernel-to-kernel control wire without the relay)")
    p.add_argument("--seed", type=int, default=None, help="RNG seed (default: random)")
    p.add_argument("--to-relay", type=ImpairSpec.parse, default=ImpairSpec(),
                   help="impairment guest -> relay")
    p.add_argument("--to-guest", type=ImpairSpec.parse, default=ImpairSpec(),
                   help="impairment relay -> guest")
    p.add_argument("--ready-file", help="written once the TAP exists and the socket is up")
    p.add_argument("--stats-file", help="counters as JSON, written on exit")
    p.add_argument("--connect-timeout", type=float, default=10.0)
    args = p.parse_args(argv)

    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    print(f"netshim: seed={seed} to_relay=[{args.to_relay}] to_guest=[{args.to_guest}]",
          file=sys.stderr, flush=True)
    should_stop = [False]

    def on_signal(signum: int, frame: object) -> None:
        del signum, frame
        should_stop[0] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    tap_fd = _open_tap(args.tap)
    if args.unixgram:
        sock = _connect_dgram(args.socket, args.unixgram, args.connect_timeout,
                              args.qemu_dgram)
    elif args.listen:
        sock = _accept_one(args.socket, args.ready_file, args.connect_timeout)
    else:
        sock = _connect(args.socket, args.connect_timeout)
    shim = Shim(tap_fd, sock,
                Impairment(args.to_relay, random.Random(f"{seed}:to_relay")),
                Impairment(args.to_guest, random.Random(f"{seed}:to_guest")),
                dgram=bool(args.unixgram),
                send_to=args.socket if args.qemu_dgram else None)
    if args.ready_file:
        _write_atomic(args.ready_file, f"{seed}\n")
    try:
        shim.run(should_stop)
    finally:
        stats = shim.stats(seed)
        if args.stats_file:
            _write_atomic(args.stats_file, json.dumps(stats, indent=1))
        print(f"netshim: stopped ({shim.stop_reason}) {json.dumps(stats)}",
              file=sys.stderr, flush=True)
        sock.close()
        os.close(tap_fd)
    return shim.exit_code


# --------------------------------------------------------------------------------------
# Test harness: guest namespace + shim + guest configuration
# --------------------------------------------------------------------------------------

GUEST_IP = "10.0.2.15"
GATEWAY_IP = "10.0.2.2"

_UDHCPC_SCRIPT = textwrap.dedent("""\
    #!/bin/sh
    # udhcpc event script: apply the lease with iproute2, record it for the test.
    case "$1" in
    deconfig)
        ip addr flush dev "$interface"
        ip link set "$interface" up
        ;;
    bound|renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/$mask" dev "$interface"
        [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
        for r in $router; do
            ip route replace default via "$r" dev "$interface"
            break
        done
        echo "ip=$ip mask=$mask router=$router mtu=$mtu dns=$dns" > "$LEASE_FILE"
        ;;
    esac
    exit 0
    """)


class GuestError(RuntimeError):
    pass


class LossyGuest:
    """A guest network namespace wired to a relay socket through the lossy shim.

        with LossyGuest(workdir, relay_socket, seed=1, to_relay="loss=0.01") as g:
            g.dhcp()
            g.run(["curl", ...], timeout=60)

    Everything is torn down in `close()` (also on errors): the shim gets SIGTERM (its
    counters land in `shim_stats`), then the namespace is deleted.

    With `listen=True` the shim listens on the socket path instead of connecting, so a
    second LossyGuest can connect to it: two real kernels on one (impaired) wire, the
    control experiment that shows what standard TCP makes of the same faults. With
    `unixgram="vfkit"` or `"qemu"` the relay socket is a unix datagram socket (`serve
    --unixgram`), spoken to as vfkit or qemu's `-netdev dgram` does.
    """

    def __init__(self, workdir: Path, relay_socket: str, seed: int,
                 to_relay: str = "", to_guest: str = "", tap: str = "tap0",
                 listen: bool = False, unixgram: str | None = None) -> None:
        self.workdir = Path(workdir)
        self.relay_socket = relay_socket
        self.seed = seed
        self.to_relay = to_relay
        self.to_guest = to_guest
        self.tap = tap
        self.name = f"rn-guest-{uuid.uuid4().hex[:10]}"
        self.shim: subprocess.Popen[bytes] | None = None
        self.shim_log = self.workdir / f"{self.name}.shim.log"
        self.stats_file = self.workdir / f"{self.name}.stats.json"
        self.ready_file = self.workdir / f"{self.name}.ready"
        self.lease_file = self.workdir / f"{self.name}.lease"
        self.listen = listen
        self.unixgram = unixgram
        self.shim_stats: dict[str, object] = {}
        #: The guest kernel's TCP counters (`nstat`), as `read_nstat` last found them.
        self.nstat: dict[str, int] = {}
        self._ns_created = False

    def __enter__(self) -> LossyGuest:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, timeout_s: float = 15.0) -> None:
        subprocess.run(["ip", "netns", "add", self.name], check=True, timeout=10)
        self._ns_created = True
        self.run(["ip", "link", "set", "lo", "up"], timeout=10)
        cmd = ["ip", "netns", "exec", self.name, sys.executable, str(HERE / "netshim.py"),
               "--tap", self.tap, "--socket", self.relay_socket, "--seed", str(self.seed),
               "--to-relay", self.to_relay, "--to-guest", self.to_guest,
               "--ready-file", str(self.ready_file), "--stats-file", str(self.stats_file),
               *(["--listen"] if self.listen else []),
               *(["--unixgram", str(self.workdir / f"{self.name}.dgram")]
                 if self.unixgram else []),
               *(["--qemu-dgram"] if self.unixgram == "qemu" else [])]
        with open(self.shim_log, "wb") as log:
            self.shim = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        # A listening shim is ready for its peer before it has one.
        ready = Path(f"{self.ready_file}.listening") if self.listen else self.ready_file
        deadline = time.monotonic() + timeout_s
        while not ready.exists():
            if self.shim.poll() is not None:
                raise GuestError(f"shim exited with {self.shim.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                raise GuestError(f"shim not ready after {timeout_s} s: {self.log()}")
            time.sleep(0.02)
        # No IPv6 chatter (router solicitations, MLD): the relay drops it anyway.
        self.run(["sysctl", "-qw", f"net.ipv6.conf.{self.tap}.disable_ipv6=1"], timeout=10)
        self.run(["ip", "link", "set", self.tap, "up"], timeout=10)

    def log(self) -> str:
        try:
            return self.shim_log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def run(self, argv: Sequence[str], timeout: float, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run `argv` in the guest namespace (bounded by `timeout` seconds)."""
        full_env = None if env is None else {**os.environ, **env}
        proc = subprocess.run(["ip", "netns", "exec", self.name, *argv], capture_output=True,
                              text=True, timeout=timeout, env=full_env)
        if check and proc.returncode != 0:
            raise GuestError(f"{' '.join(argv)} exited {proc.returncode}\n"
                             f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}")
        return proc

    def read_nstat(self) -> dict[str, int]:
        """The guest kernel's SNMP and netstat counters (per namespace, from zero), e.g.
        TcpExtTCPSACKReorder: what its TCP did, as seen from inside. Kept in `nstat`."""
        out = self.run(["nstat", "-az"], timeout=10).stdout
        self.nstat = {w[0]: int(w[1]) for w in map(str.split, out.splitlines())
                      if len(w) >= 2 and w[1].isdigit()}
        return self.nstat

    def sh(self, script: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return self.run(["sh", "-ec", script], timeout=timeout)

    def dhcp(self, tries: int = 10, timeout: float = 60.0) -> dict[str, str]:
        """Configure the guest with busybox udhcpc; returns the lease's variables."""
        script = self.workdir / "udhcpc.script"
        script.write_text(_UDHCPC_SCRIPT)
        script.chmod(0o755)
        self.run(["busybox", "udhcpc", "-i", self.tap, "-f", "-q", "-n", "-t", str(tries),
                  "-T", "1", "-A", "1", "-O", "mtu", "-s", str(script)],
                 timeout=timeout, env={"LEASE_FILE": str(self.lease_file)})
        words = self.lease_file.read_text().split()
        return dict(w.split("=", 1) for w in words if "=" in w)

    def static(self, address: str = f"{GUEST_IP}/24", gateway: str | None = GATEWAY_IP,
               mtu: int = 65520) -> None:
        self.run(["ip", "addr", "add", address, "dev", self.tap], timeout=10)
        self.run(["ip", "link", "set", self.tap, "mtu", str(mtu)], timeout=10)
        if gateway:
            self.run(["ip", "route", "add", "default", "via", gateway], timeout=10)

    def close(self) -> None:
        try:
            if self.shim is not None and self.shim.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.shim.pid, signal.SIGTERM)
                try:
                    self.shim.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.shim.pid, signal.SIGKILL)
                    self.shim.wait(timeout=10)
            with contextlib.suppress(OSError, ValueError):
                self.shim_stats = json.loads(self.stats_file.read_text())
        finally:
            if self._ns_created:
                subprocess.run(["ip", "netns", "delete", self.name], timeout=10, check=False)
                self._ns_created = False


if __name__ == "__main__":
    sys.exit(main())
