"""DNS under a policy with domain rules, the sans-I/O part: the guest's queries screened
before they leave the relay, and the upstream's answers read for the addresses they give.

Screening (`screen_query`). When the policy is an allowlist by name (`Policy.filters_dns`:
domain rules and default "deny"), a query leaves the relay only if an allow rule covers
its name; any other is answered REFUSED (RFC 1035 §4.1.1, RCODE 5) by the relay itself
and never forwarded, so a guest cannot carry data out in the labels of names nobody
allowed. A query the relay cannot read as one standard question (RFC 1035 §4.1: QR=0,
opcode 0, QDCOUNT 1, uncompressed labels without a dot inside one) is refused as well:
what it cannot name, it cannot allow. HTTPS and SVCB queries (types 65 and 64, RFC 9460)
for covered names are answered NOERROR with no data (RFC 2308 §2.2 "NODATA"), so that a
client falls back to A and AAAA: an HTTPS record can name other targets and carry ECH
configurations, neither of which the relay would learn addresses for. Anything else is
forwarded and its answer passed to the guest unchanged.

Reading answers (`read_answer`). A forwarded query's answer is parsed with dpkt's DNS
module: the question's name (as the guest asked it), and every A and AAAA record of that
name or of a name the CNAME chain from it leads to (RFC 1034 §3.6.2; chains are
followed in the answer section, at most `MAX_CHAIN` links), with the smallest TTL on
the way (an address is no more valid than the alias that led to it). The addresses are
learned for the question's name only: a domain rule covers the name the guest asked,
and the chain's other names were never asked by it. The question's name is read
again with the same checks as a query's, since dpkt joins labels with dots and would
make a label holding a dot ("www.example.org" as one label) look like a name of three.

A guest asks the same names over and over (A and AAAA before each connection), and a
resolver gives the same answer until its cached TTL ticks down, so `DnsFilter` keeps the
verdicts and readings of the last few hundred distinct messages, keyed by all of the
message but its ID: a repeated query or answer costs a dictionary lookup.

This module does no I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import ip_address

import dpkt

from relaynat.domains import wire_name
from relaynat.link.dns import TYPE_A, TYPE_AAAA, parse_question
from relaynat.policy import Policy

TYPE_CNAME = 5
TYPE_SVCB = 64
TYPE_HTTPS = 65
RCODE_NOERROR = 0
RCODE_REFUSED = 5
#: Longest CNAME chain followed in one answer (resolvers give up near 8 to 16 links).
MAX_CHAIN = 16

_HEADER = struct.Struct("!HHHHHH")
_QR = 0x8000
_RD = 0x0100
_RA = 0x0080
_TYPE_NAMES = {TYPE_A: "A", TYPE_AAAA: "AAAA", TYPE_HTTPS: "HTTPS", TYPE_SVCB: "SVCB",
               TYPE_CNAME: "CNAME", 15: "MX", 16: "TXT", 2: "NS", 12: "PTR", 6: "SOA",
               33: "SRV", 255: "ANY"}


def type_name(qtype: int) -> str:
    """A query type as DnsQuery events name it: "A", "AAAA", "HTTPS", ... or its number."""
    return _TYPE_NAMES.get(qtype, str(qtype))


@dataclass(frozen=True, slots=True)
class Screened:
    """What to do with a guest's query: `reply` (the relay answers it: "refused" or
    "empty") or None (forward it). `name` is the normalised name asked ("" when the
    query could not be read), `qtype` its type (0 when unread)."""

    action: str
    reply: bytes | None
    name: str
    qtype: int


def screen_query(msg: bytes | memoryview, policy: Policy) -> Screened:
    """The relay's word on a guest's DNS query under `policy` (see the module docstring);
    `policy.filters_dns` is the caller's to check first: without it, everything goes."""
    q = parse_question(msg)
    if q is None:
        if len(msg) < _HEADER.size:
            return Screened("dropped", None, "", 0)
        return Screened("refused", _reply(msg, RCODE_REFUSED, None), "", 0)
    name = wire_name(q.name)
    if name is None or not policy.allows_name(name):
        return Screened("refused", _reply(msg, RCODE_REFUSED, q.end), name or q.name,
                        q.qtype)
    if q.qtype in (TYPE_HTTPS, TYPE_SVCB):
        return Screened("empty", _reply(msg, RCODE_NOERROR, q.end), name, q.qtype)
    return Screened("forwarded", None, name, q.qtype)


def _reply(msg: bytes | memoryview, rcode: int, question_end: int | None) -> bytes:
    """A response to `msg` with `rcode`, no records, echoing its question (RFC 1035
    §4.1.1: the ID, RD copied; RA set as the forwarder recurses); without a readable
    question, QDCOUNT 0."""
    ident, flags = struct.unpack_from("!HH", msg)
    flags = _QR | _RA | (flags & _RD) | rcode  # opcode 0: a query it could not read too
    if question_end is None:
        return _HEADER.pack(ident, flags, 0, 0, 0, 0)
    return _HEADER.pack(ident, flags, 1, 0, 0, 0) + bytes(msg[_HEADER.size:question_end])


@dataclass(frozen=True, slots=True)
class Answer:
    """What a forwarded answer said: the normalised name asked, its type, the RCODE, the
    addresses (packed) its chain led to, and their TTL (the chain's smallest)."""

    name: str
    qtype: int
    rcode: int
    addrs: tuple[bytes, ...]
    ttl: int

    def addr_texts(self) -> tuple[str, ...]:
        return tuple(str(ip_address(a)) for a in self.addrs)


def read_answer(msg: bytes | memoryview) -> Answer | None:
    """The upstream's answer to a forwarded query, or None when it is not one the
    relay can read (then it is passed on unread, and nothing is learned)."""
    raw = bytes(msg)
    if len(raw) < _HEADER.size or not raw[2] & 0x80:  # QR: a response
        return None
    # The question with the checks of a query's (no dot inside a label, one question),
    # read from a copy whose QR bit is cleared as parse_question expects.
    q = parse_question(raw[:2] + bytes([raw[2] & 0x7F]) + raw[3:])
    if q is None:
        return None
    name = wire_name(q.name)
    if name is None:
        return None
    try:
        parsed = dpkt.dns.DNS(raw)
    except (dpkt.UnpackError, UnicodeDecodeError, ValueError, struct.error, IndexError):
        # dpkt raises UnicodeDecodeError, not UnpackError, on a label that is no UTF-8.
        return None
    chain = {name}
    current, ttl, links = name, None, 0
    records = [rr for rr in parsed.an if getattr(rr, "cls", 0) == 1]
    # Follow the chain: each CNAME of the current name moves it on.
    progressed = True
    while progressed and links < MAX_CHAIN:
        progressed = False
        for rr in records:
            if rr.type == TYPE_CNAME and _lower(rr.name) == current:
                target = _lower(getattr(rr, "cname", ""))
                if not target or target in chain:
                    continue
                chain.add(target)
                current = target
                ttl = rr.ttl if ttl is None else min(ttl, rr.ttl)
                links += 1
                progressed = True
                break
    addrs: list[bytes] = []
    addr_ttl: int | None = None
    for rr in records:
        if rr.type not in (TYPE_A, TYPE_AAAA) or _lower(rr.name) not in chain:
            continue
        packed = getattr(rr, "ip", None) if rr.type == TYPE_A else getattr(rr, "ip6", None)
        if not isinstance(packed, bytes) or len(packed) != (4 if rr.type == TYPE_A else 16):
            continue
        addrs.append(packed)
        addr_ttl = rr.ttl if addr_ttl is None else min(addr_ttl, rr.ttl)
    total = min(t for t in (ttl, addr_ttl) if t is not None) if addrs else 0
    return Answer(name, q.qtype, parsed.rcode, tuple(dict.fromkeys(addrs)), total)


def _lower(name: object) -> str:
    text = str(name).lower()
    return text[:-1] if text.endswith(".") else text


#: Distinct queries, and answers, a `DnsFilter` remembers (then it starts over).
MEMO_SIZE = 256


class DnsFilter:
    """`screen_query` under one policy and `read_answer`, remembering the last
    `MEMO_SIZE` distinct messages of each kind (by everything but the 2-byte ID, which
    the relay's own replies take from the query)."""

    __slots__ = ("_answers", "_screened", "policy")

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._screened: dict[bytes, Screened] = {}
        self._answers: dict[bytes, Answer | None] = {}

    def screen(self, msg: bytes | memoryview) -> Screened:
        """`screen_query(msg, policy)`, the reply (if any) answering `msg`'s ID."""
        key = bytes(msg[2:])
        screened = self._screened.get(key)
        if screened is None:
            screened = screen_query(msg, self.policy)
            if len(self._screened) >= MEMO_SIZE:
                self._screened.clear()
            self._screened[key] = screened
        elif screened.reply is not None:
            screened = Screened(screened.action, bytes(msg[:2]) + screened.reply[2:],
                                screened.name, screened.qtype)
        return screened

    def read(self, msg: bytes | memoryview) -> Answer | None:
        """`read_answer(msg)`."""
        key = bytes(msg[2:])
        if key in self._answers:
            return self._answers[key]
        answer = read_answer(msg)
        if len(self._answers) >= MEMO_SIZE:
            self._answers.clear()
        self._answers[key] = answer
        return answer
