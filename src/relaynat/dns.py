"""DNS, the sans-I/O part: static records answered by the relay, and the upstream.

The guest's DNS address (slirp's 10.0.2.3) forwards to the host's resolver; only names
configured as static records (gvproxy-style `name -> IPv4`) are answered here. A query
for such a name gets its A record (type A, class IN), and NOERROR with no answers for any
other type (RFC 2308 §2.2 "NODATA": the name exists, the type does not), so that a
resolver asking AAAA first does not conclude the name is missing.

`answer_static` parses only what it needs (RFC 1035 §4.1: a 12-byte header, one
question of uncompressed labels) with explicit bounds checks, and returns None (forward
it, or drop it) for anything it does not fully understand; it never raises on input.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address

TYPE_A = 1
CLASS_IN = 1
#: TTL of static answers: short, so that a changed configuration is seen soon.
STATIC_TTL = 60

_HEADER = struct.Struct("!HHHHHH")
_QR = 0x8000
_OPCODE_MASK = 0x7800
_AA = 0x0400
_TC = 0x0200
_RD = 0x0100
_RA = 0x0080
_MAX_NAME = 255  # RFC 1035 §2.3.4: a name is at most 255 octets on the wire


@dataclass(frozen=True, slots=True)
class DnsQuestion:
    ident: int
    flags: int
    #: Lower-case name without the final dot ("" for the root).
    name: str
    qtype: int
    qclass: int
    #: Offset just past the question in the message.
    end: int


def normalize_name(name: str) -> str:
    return name.strip().rstrip(".").lower()


def static_table(records: Iterable[tuple[str, str]]) -> dict[str, bytes]:
    """Config records -> {normalized name: packed IPv4}; a later record wins."""
    return {normalize_name(n): IPv4Address(a).packed for n, a in records}


def parse_question(msg: bytes | memoryview) -> DnsQuestion | None:
    """The single question of a standard query (QR=0, opcode 0, QDCOUNT 1), or None."""
    if len(msg) < _HEADER.size:
        return None
    ident, flags, qdcount, _an, _ns, _ar = _HEADER.unpack_from(msg)
    if flags & (_QR | _OPCODE_MASK | _TC) or qdcount != 1:
        return None
    labels: list[str] = []
    pos, wire_len = _HEADER.size, 1
    while True:
        if pos >= len(msg):
            return None
        length = msg[pos]
        pos += 1
        if length == 0:
            break
        if length & 0xC0:  # compression pointer (or reserved): not in a query's question
            return None
        wire_len += length + 1
        if wire_len > _MAX_NAME or pos + length > len(msg):
            return None
        label = bytes(msg[pos:pos + length])
        if b"." in label:  # would alias a multi-label name once joined
            return None
        labels.append(label.decode("ascii", "replace").lower())
        pos += length
    if pos + 4 > len(msg):
        return None
    qtype, qclass = struct.unpack_from("!HH", msg, pos)
    return DnsQuestion(ident, flags, ".".join(labels), qtype, qclass, pos + 4)


def answer_static(msg: bytes | memoryview, table: Mapping[str, bytes]) -> bytes | None:
    """The relay's own answer when `msg` asks for a static name, else None."""
    try:
        q = parse_question(msg)
    except (ValueError, struct.error):  # defensive: parse_question checks its bounds
        return None
    if q is None or q.name not in table:
        return None
    answers = b""
    ancount = 0
    if q.qtype == TYPE_A and q.qclass == CLASS_IN:
        # Owner name as a pointer to the question's name at offset 12 (RFC 1035 §4.1.4).
        answers = struct.pack("!HHHIH", 0xC000 | _HEADER.size, TYPE_A, CLASS_IN, STATIC_TTL,
                              4) + table[q.name]
        ancount = 1
    flags = _QR | _AA | _RA | (q.flags & _RD)  # opcode 0, RCODE 0 (NOERROR)
    # Additional records of the query (an EDNS OPT) are not echoed: ARCOUNT 0.
    return (_HEADER.pack(q.ident, flags, 1, ancount, 0, 0)
            + bytes(msg[_HEADER.size:q.end]) + answers)


def upstream_from_resolv_conf(text: str) -> IPv4Address | None:
    """The first IPv4 `nameserver` of a resolv.conf (resolv.conf(5)), or None."""
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                return IPv4Address(fields[1])
            except ValueError:
                continue  # IPv6 or garbage: the relay forwards over IPv4 for now
    return None


def host_upstream(path: str = "/etc/resolv.conf") -> IPv4Address | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return upstream_from_resolv_conf(f.read())
    except OSError:
        return None
