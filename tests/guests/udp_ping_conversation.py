"""A guest for the UDP handover tests: a UDP echo conversation and a ping, every 10 ms.

    python3 udp_ping_conversation.py PORT GO_FILE RESULT_FILE EXIT_FILE STATUS

Every 10 ms sends a numbered datagram from one connected UDP socket to 10.0.2.2:PORT (an
echo peer answering each with b"echo:" and the datagram) and an ICMP echo request to
10.0.2.2 from a raw socket, one identifier throughout, until GO_FILE exists (at most
120 s); then waits 2 s for the last answers and writes RESULT_FILE as JSON: for "udp" and
"icmp", "sent", "answered", "lost" (the numbers never answered, at most 20), the bytes
each way ("bytes_out", "bytes_in": UDP payloads; ICMP messages, header included),
"max_rtt_ms" and "max_gap_ms" (the longest time without an answer while requests went
out); and "ident" (the ICMP identifier). Then waits for EXIT_FILE (at most 120 s) and
exits with STATUS. Prints nothing.
"""

import json
import os
import select
import socket
import struct
import sys
import time
from typing import Any

PORT, GO, OUT, EXIT, STATUS = (int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4],
                               int(sys.argv[5]))
INTERVAL_S = 0.01
LIMIT_S = 120.0
PAYLOAD = b"relaynat handover ping" * 2


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


class Tally:
    def __init__(self) -> None:
        self.sent_at: dict[int, float] = {}
        self.answered: dict[int, float] = {}
        self.bytes_out = self.bytes_in = 0
        self.last_answer = 0.0
        self.max_gap = 0.0

    def sent(self, seq: int, size: int, now: float) -> None:
        self.sent_at[seq] = now
        self.bytes_out += size
        if self.last_answer:
            self.max_gap = max(self.max_gap, now - self.last_answer)

    def answer(self, seq: int, size: int, now: float) -> None:
        if seq in self.sent_at and seq not in self.answered:
            self.answered[seq] = now
            self.bytes_in += size
            self.last_answer = now

    def report(self) -> dict[str, Any]:
        lost = sorted(set(self.sent_at) - set(self.answered))
        rtts = [self.answered[s] - self.sent_at[s] for s in self.answered]
        return {"sent": len(self.sent_at), "answered": len(self.answered), "lost": lost[:20],
                "bytes_out": self.bytes_out, "bytes_in": self.bytes_in,
                "max_rtt_ms": round(max(rtts, default=0.0) * 1000, 1),
                "max_gap_ms": round(self.max_gap * 1000, 1)}


def main() -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.connect(("10.0.2.2", PORT))
    udp.setblocking(False)
    icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    icmp.setblocking(False)
    ident = os.getpid() & 0xFFFF
    tallies = {"udp": Tally(), "icmp": Tally()}
    start = time.monotonic()
    next_at, seq, stop_at = start, 0, None
    while True:
        now = time.monotonic()
        if stop_at is None and (os.path.exists(GO) or now - start > LIMIT_S):
            stop_at = now + 2.0
        if stop_at is not None and now >= stop_at:
            break
        if stop_at is None and now >= next_at:
            datagram = struct.pack("!Q", seq) + PAYLOAD
            udp.send(datagram)
            tallies["udp"].sent(seq, len(datagram), now)
            head = struct.pack("!BBHHH", 8, 0, 0, ident, seq & 0xFFFF)
            message = head[:2] + struct.pack("!H", checksum(head + PAYLOAD)) + head[4:] + PAYLOAD
            icmp.sendto(message, ("10.0.2.2", 0))
            tallies["icmp"].sent(seq & 0xFFFF, len(message), now)
            seq += 1
            next_at += INTERVAL_S
        wait = max(0.0, min(next_at, stop_at or next_at) - time.monotonic())
        readable, _, _ = select.select([udp, icmp], [], [], wait)
        now = time.monotonic()
        if udp in readable:
            while True:
                try:
                    data = udp.recv(2048)
                except BlockingIOError:
                    break
                if data.startswith(b"echo:") and len(data) >= 13:
                    tallies["udp"].answer(struct.unpack_from("!Q", data, 5)[0], len(data), now)
        if icmp in readable:
            while True:
                try:
                    packet = icmp.recv(2048)
                except BlockingIOError:
                    break
                message = packet[(packet[0] & 0x0F) * 4:]  # a raw socket gives the IP header
                kind, _code, _sum, got, number = struct.unpack_from("!BBHHH", message)
                if kind == 0 and got == ident:
                    tallies["icmp"].answer(number, len(message), now)
    result = {name: tally.report() for name, tally in tallies.items()} | {"ident": ident}
    with open(OUT + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(OUT + ".tmp", OUT)
    deadline = time.monotonic() + LIMIT_S
    while not os.path.exists(EXIT) and time.monotonic() < deadline:
        time.sleep(0.05)
    sys.exit(STATUS)


if __name__ == "__main__":
    main()
