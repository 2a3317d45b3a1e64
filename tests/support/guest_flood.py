"""Floods a guest throws at the relay, written raw onto its link (run inside the guest).

    python3 guest_flood.py IFNAME [--syns N --open-port P] [--udp N] [--arp N] [--dhcp N]
        [--done FILE]

Frames go straight onto IFNAME through an AF_PACKET socket, from the guest's own MAC
and address (10.0.2.15), so the relay takes them as the guest's own traffic (spoofed
ones are dropped early and would test nothing):

- SYNs to distinct flows: a third to host port `--open-port` at the gateway (a host
  peer accepts them: the host side connects, and the flow waits for the guest's
  handshake), a third to distinct closed ports at the gateway (the host refuses at
  once), a third to distinct addresses in 198.18.0.0/15 (the relay's namespace has no
  route there: connect() fails at once, nothing leaves the machine);
- UDP datagrams to N distinct destinations (gateway ports 20000 and up: the host
  answers port unreachable, and each (port, destination) is a flow of its own);
- ARP requests for addresses across the guest's /24;
- DHCP DISCOVERs, each with its own transaction id.

The guest kernel would answer each SYN-ACK of a flow it never opened with a RST; the
test routes the gateway's IPv4 address to a blackhole inside the guest so those RSTs
go nowhere and the flows stay half-open, as in a real SYN flood. A send the kernel
refuses (its queue full) is retried after a short pause, and the sender slows down
while the TAP drops frames (the relay's reading lags), but some may still be lost on
the link. Prints JSON: frames sent per kind, frames the link dropped, the seconds
taken; touches FILE when done.

`flood_script()` is the guest shell script tests/integration/test_floods.py and benches/floods.py
run: a download beside the floods.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

try:
    from support.guest_tools import _ipv4
except ImportError:  # run as a file (inside the guest): this directory is sys.path[0]
    from guest_tools import _ipv4

GUEST = "10.0.2.15"
GATEWAY = "10.0.2.2"
GATEWAY_MAC = bytes.fromhex("52550a000202")
BROADCAST = b"\xff" * 6


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _l4(src: str, dst: str, proto: int, header: bytearray, csum_at: int,
        payload: bytes = b"") -> bytes:
    """A TCP or UDP segment with its checksum over the IPv4 pseudo-header (RFC 793)."""
    seg = bytes(header) + payload
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, proto,
                                                                         len(seg))
    struct.pack_into("!H", header, csum_at, _checksum(pseudo + seg))
    return bytes(header) + payload


def syn_frames(mac: bytes, count: int, open_port: int) -> Iterator[bytes]:
    eth = GATEWAY_MAC + mac + b"\x08\x00"
    for i in range(count):
        sport = 1024 + i % 60000
        kind = i % 3
        if kind == 0:
            dst, dport = GATEWAY, open_port
        elif kind == 1:
            dst, dport = GATEWAY, 30000 + (i // 3) % 30000
        else:
            n = i // 3
            dst, dport = f"198.18.{(n >> 8) & 0xFF}.{n & 0xFF}", 80
        # MSS 1460 and window scale 7, as a kernel's SYN would carry.
        opts = bytes.fromhex("020405b4") + bytes.fromhex("01030307")
        header = bytearray(struct.pack("!HHIIBBHHH", sport, dport, i * 7919, 0,
                                       (5 + len(opts) // 4) << 4, 0x02, 64240, 0, 0) + opts)
        yield eth + _ipv4(GUEST, dst, 6, _l4(GUEST, dst, 6, header, 16))


def udp_frames(mac: bytes, count: int) -> Iterator[bytes]:
    eth = GATEWAY_MAC + mac + b"\x08\x00"
    for i in range(count):
        payload = b"flood %d" % i
        header = bytearray(struct.pack("!HHHH", 40000, 20000 + i, 8 + len(payload), 0))
        yield eth + _ipv4(GUEST, GATEWAY, 17, _l4(GUEST, GATEWAY, 17, header, 6, payload))


def arp_frames(mac: bytes, count: int) -> Iterator[bytes]:
    eth = BROADCAST + mac + b"\x08\x06"
    for i in range(count):
        target = f"10.0.2.{1 + i % 254}"
        yield eth + struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac,
                                socket.inet_aton(GUEST), bytes(6), socket.inet_aton(target))


def dhcp_frames(mac: bytes, count: int) -> Iterator[bytes]:
    eth = BROADCAST + mac + b"\x08\x00"
    for i in range(count):
        msg = (struct.pack("!BBBBIHH4s4s4s4s16s", 1, 1, 6, 0, i, 0, 0x8000, bytes(4),
                           bytes(4), bytes(4), bytes(4), mac + bytes(10))
               + bytes(192) + b"\x63\x82\x53\x63" + b"\x35\x01\x01" + b"\xff")
        header = bytearray(struct.pack("!HHHH", 68, 67, 8 + len(msg), 0))
        yield eth + _ipv4("0.0.0.0", "255.255.255.255", 17,
                          _l4("0.0.0.0", "255.255.255.255", 17, header, 6, msg))


def _tx_dropped(ifname: str) -> int:
    """The link's transmit drops, from /proc/self/net/dev (this network namespace's
    view; /sys may show another's). Fields after "NAME:": 8 receive, then transmit
    bytes, packets, errs, drop."""
    with open("/proc/self/net/dev") as f:
        for line in f:
            name, sep, fields = line.partition(":")
            if sep and name.strip() == ifname:
                return int(fields.split()[11])
    raise RuntimeError(f"no {ifname} in /proc/self/net/dev")


def _send_all(s: socket.socket, ifname: str, frames: Iterator[bytes]) -> int:
    """Offer every frame. A TAP whose reader (the relay) lags drops frames silently
    (its ring is full), so every 64 frames the link's drop count is read, and while
    it grows the sender pauses, longer each time (up to 50 ms), shorter once not."""
    sent, dropped, pause = 0, _tx_dropped(ifname), 0.0
    for frame in frames:
        if sent % 64 == 63:
            now_dropped = _tx_dropped(ifname)
            pause = min(0.05, max(0.002, pause * 2)) if now_dropped != dropped else pause / 2
            dropped = now_dropped
            if pause > 0.001:
                time.sleep(pause)
        for _ in range(1000):
            try:
                s.send(frame)
                break
            except OSError:  # ENOBUFS: the device queue is full; let the relay read
                time.sleep(0.001)
        else:
            raise RuntimeError("the link refused a frame for 1 s")
        sent += 1
    return sent


def flood_script(http_port: int, open_port: int, done: Path, counts: tuple[int, ...],
                 limit_rate: str | None, python: str = sys.executable) -> str:
    """The guest's shell script: a download over IPv6 that starts first (its sha256
    printed last, curl's speed and time in DONE.speed), and the floods beside it.
    IPv4 to the gateway is blackholed in the guest so its kernel's RSTs to SYN-ACKs it
    never asked for go nowhere (see above). `python` runs this file in the guest: one
    the guest's user may execute (relaynat_cli.guest_python); DONE's directory is one
    it may write in."""
    syns, udp, arps, dhcps = counts
    rate = f"--limit-rate {limit_rate} " if limit_rate else ""
    return (
        "ip route add blackhole 10.0.2.2/32 && ip link set tap0 txqueuelen 20000 && "
        f"(curl -6 -sS --fail {rate}-o /dev/stdout http://[fd00::2]:{http_port}/f.bin "
        "-w '%{stderr}%{speed_download} %{time_total}\\n' 2>{done}.speed "
        "| sha256sum > {done}.sha) & "
        "sleep 0.5; "
        f"nice -n 19 {python} {Path(__file__).resolve()} tap0 --syns {syns} "
        f"--open-port {open_port} --udp {udp} --arp {arps} --dhcp {dhcps} --done {done} "
        "--started {done}.start; "
        "wait; cat {done}.sha").replace("{done}", str(done))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("ifname")
    p.add_argument("--syns", type=int, default=0)
    p.add_argument("--open-port", type=int, default=9)
    p.add_argument("--udp", type=int, default=0)
    p.add_argument("--arp", type=int, default=0)
    p.add_argument("--dhcp", type=int, default=0)
    p.add_argument("--done")
    p.add_argument("--started", help="touched before the first frame")
    args = p.parse_args()
    t0, dropped0 = time.monotonic(), _tx_dropped(args.ifname)
    if args.started:
        open(args.started, "w").close()
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((args.ifname, 0))
        mac = s.getsockname()[4]
        sent = {
            "syn": _send_all(s, args.ifname, syn_frames(mac, args.syns, args.open_port)),
            "udp": _send_all(s, args.ifname, udp_frames(mac, args.udp)),
            "arp": _send_all(s, args.ifname, arp_frames(mac, args.arp)),
            "dhcp": _send_all(s, args.ifname, dhcp_frames(mac, args.dhcp)),
        }
    print(json.dumps({"sent": sent, "link_dropped": _tx_dropped(args.ifname) - dropped0,
                      "seconds": round(time.monotonic() - t0, 2)}))
    if args.done:
        open(args.done + ".tmp", "w").close()
        os.replace(args.done + ".tmp", args.done)
    return 0


if __name__ == "__main__":
    sys.exit(main())
