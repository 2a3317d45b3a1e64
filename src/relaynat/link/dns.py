"""DNS, the sans-I/O part: static records answered by the relay, and the upstream.

The guest's DNS addresses (slirp's 10.0.2.3 and fd00::3) forward to the host's resolver;
only names configured as static records (gvproxy-style `name -> address`) are answered
here. A query for such a name gets its A or AAAA records (class IN; RFC 3596 §2.1), and
NOERROR with no answers for any other type (RFC 2308 §2.2 "NODATA": the name exists,
the type does not), so that a resolver asking AAAA first does not conclude the name is
missing when it only has an IPv4 address.

`answer_static` parses only what it needs (RFC 1035 §4.1: a 12-byte header, one
question of uncompressed labels) with explicit bounds checks, and returns None (forward
it, or drop it) for anything it does not fully understand; it never raises on input.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

TYPE_A = 1
TYPE_AAAA = 28
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


#: {normalized name: {TYPE_A or TYPE_AAAA: [packed addresses]}}
StaticTable = Mapping[str, Mapping[int, list[bytes]]]


def static_table(records: Iterable[tuple[str, str]]) -> dict[str, dict[int, list[bytes]]]:
    """Config records -> {normalized name: {record type: [packed addresses]}}; a name
    may have several addresses of each family (all are answered, in config order)."""
    table: dict[str, dict[int, list[bytes]]] = {}
    for name, addr in records:
        packed = ip_address(addr).packed
        rtype = TYPE_AAAA if len(packed) == 16 else TYPE_A
        table.setdefault(normalize_name(name), {}).setdefault(rtype, []).append(packed)
    return table


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


def answer_static(msg: bytes | memoryview, table: StaticTable) -> bytes | None:
    """The relay's own answer when `msg` asks for a static name, else None."""
    try:
        q = parse_question(msg)
    except (ValueError, struct.error):  # defensive: parse_question checks its bounds
        return None
    if q is None or q.name not in table:
        return None
    answers = b""
    addresses = table[q.name].get(q.qtype, []) if q.qclass == CLASS_IN else []
    for packed in addresses:
        # Owner name as a pointer to the question's name at offset 12 (RFC 1035 §4.1.4).
        answers += struct.pack("!HHHIH", 0xC000 | _HEADER.size, q.qtype, CLASS_IN,
                               STATIC_TTL, len(packed)) + packed
    ancount = len(addresses)
    flags = _QR | _AA | _RA | (q.flags & _RD)  # opcode 0, RCODE 0 (NOERROR)
    # Additional records of the query (an EDNS OPT) are not echoed: ARCOUNT 0.
    return (_HEADER.pack(q.ident, flags, 1, ancount, 0, 0)
            + bytes(msg[_HEADER.size:q.end]) + answers)


def upstream_from_resolv_conf(text: str) -> IPv4Address | IPv6Address | None:
    """The first `nameserver` of a resolv.conf (resolv.conf(5)), IPv4 or IPv6, or None.
    A link-local IPv6 server needs its zone (fe80::1%eth0), which ip_address keeps."""
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                return ip_address(fields[1])
            except ValueError:
                continue  # garbage: try the next line
    return None


def host_upstream(path: str = "/etc/resolv.conf") -> IPv4Address | IPv6Address | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return upstream_from_resolv_conf(f.read())
    except OSError:
        return None
