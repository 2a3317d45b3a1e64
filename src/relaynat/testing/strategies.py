"""Hypothesis strategies of guest frames, addressed to the relay's default addressing.

* `valid_frames()`: well-formed frames of every protocol the relay serves (ARP,
  DHCP, DHCPv6, NDP RS/NS, DNS, UDP, ICMP/ICMPv6 echo, TCP with any flags and options,
  IPv6 with extension headers), labeled with ``expect=None``.
* `broken_frames()`: malformed frames, each labeled with the stats counter the relay
  must bump (frames.py explains the labels).
* `tcp_conversations()`: a guest's side of one TCP connection (handshake, data with
  loss, reordering and duplication, half-close, reset) as a `TcpConversation`, which
  builds its frames once the relay's initial sequence number is known (or with 0,
  for fuzzing, where the relay then answers unacceptable ACKs as RFC 9293 §3.10.7 says).
* `frame_sequences()`: lists mixing all three.

TCP and UDP toward the gateway (which the relay maps to the host's loopback) go to the
kit's sink by default (relaynat.testing.sink: a port the kit binds on 127.0.0.1 and ::1
and a running `InMemoryGuest` serves), never to a port of the machine's own services.
Each strategy's `tcp_port`/`udp_port` (`dport` for conversations) is a `Port`: None for
the sink, a number for that port (a server of your test's), or "any" for ports drawn
from the whole range, edge values first, which reach whatever listens on the host's
loopback there: only for a relay whose host side is an isolated network namespace.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import partial
from ipaddress import IPv4Address
from typing import Literal

from hypothesis import strategies as st

from relaynat.checksum import internet_checksum
from relaynat.testing import frames as f
from relaynat.testing.frames import DEFAULT_ADDRESSING, Addressing, LabeledFrame
from relaynat.testing.sink import sink
from relaynat.wire import ACK, ETH_HLEN, FIN, PSH, RST, SYN

M32 = 0xFFFFFFFF
ports = st.one_of(st.sampled_from([0, 1, 1023, 1024, 65535]), st.integers(1, 65535))
seqs = st.one_of(st.sampled_from([0, 1, M32 - 1, M32, 0x7FFFFFFF, 0x80000000]),
                 st.integers(0, M32))
payloads = st.binary(max_size=64)
families = st.booleans()  # True: IPv6

Port = int | Literal["any"] | None
"""Where a strategy's TCP or UDP frames to the gateway go: None, the kit's sink; a
number, that port; "any", any port (see the module docstring)."""


def _sink_port() -> int:
    return sink().port


def _dports(port: Port) -> st.SearchStrategy[int]:
    """Destination ports for `port`; the sink is bound when the first is drawn."""
    if port is None:
        return st.builds(_sink_port)
    if port == "any":
        return ports
    if isinstance(port, int) and 0 <= port <= 0xFFFF:
        return st.just(port)
    raise ValueError(f"port {port!r}: expected None (the sink), 0..65535 or 'any'")


@st.composite
def tcp_options(draw: st.DrawFn) -> bytes:
    """TCP options (RFC 9293 §3.1, RFC 7323, RFC 2018) in any order, including
    unknown kinds, EOL mid-list and an option whose length runs past the header."""
    piece = st.one_of(
        st.integers(0, 0xFFFF).map(lambda v: struct.pack("!BBH", 2, 4, v)),  # MSS
        st.integers(0, 255).map(lambda s: bytes([3, 3, s])),  # window scale
        st.just(b"\x04\x02"),  # SACK permitted
        st.tuples(seqs, seqs).map(lambda t: b"\x08\x0a" + struct.pack("!II", *t)),
        st.just(b"\x01"), st.just(b"\x00"),
        st.tuples(st.integers(9, 255), st.binary(max_size=6)).map(
            lambda t: bytes([t[0], len(t[1]) + 2]) + t[1]),
    )
    opts = b"".join(draw(st.lists(piece, max_size=6)))
    if draw(st.booleans()):
        opts += bytes([draw(st.integers(2, 255)), draw(st.integers(3, 255))])  # past the end
    return opts[:40]


def _tcp(a: Addressing, dport: st.SearchStrategy[int]) -> st.SearchStrategy[bytes]:
    return st.builds(
        lambda v6, sport, dp, seq, ack, flags, win, payload, opts: f.tcp_segment(
            a, v6, sport, dp, seq, ack, flags, win, payload, opts),
        families, ports, dport, seqs, seqs, st.integers(0, 0xFF), st.integers(0, 0xFFFF),
        payloads, tcp_options())


def _bases(a: Addressing, tcp_port: Port, udp_port: Port
           ) -> dict[str, st.SearchStrategy[bytes]]:
    """Named strategies of well-formed frames (no extension headers)."""
    tcp_dport = _dports(tcp_port)
    udp_dport = _dports(udp_port)
    names = st.sampled_from(["example.com", "relaynat.test", "a.b.c", "x" * 63 + ".org"])
    return {
        "arp": st.sampled_from([a.gateway4, a.dns4, bytes((10, 0, 2, 200))]).map(
            lambda t: f.arp_request(a, t)),
        "dhcp": st.integers(0, M32).map(lambda xid: f.dhcp_discover(a, xid)),
        "dhcpv6": st.integers(0, 0xFFFFFF).map(lambda xid: f.dhcpv6_solicit(a, xid)),
        "ndp_rs": st.just(f.router_solicitation(a)),
        "ndp_ns": st.just(f.neighbour_solicitation(a)),
        "dns": st.builds(lambda v6, sport, qid, name, qtype: f.dns_query(
            a, v6, sport, qid, name, qtype), families, st.integers(1024, 65535),
            st.integers(0, 0xFFFF), names, st.sampled_from([1, 28, 15, 255])),
        "udp": st.builds(lambda v6, sport, dport, payload: f.udp_datagram(
            a, v6, sport, dport, payload), families, ports, udp_dport, payloads),
        "icmp_echo": st.builds(lambda v6, ident, seq, payload: f.echo_request(
            a, v6, ident, seq, payload), families, st.integers(0, 0xFFFF),
            st.integers(0, 0xFFFF), payloads),
        "tcp": _tcp(a, tcp_dport),
    }


def _ipv6_upper(a: Addressing, tcp_port: Port, udp_port: Port
                ) -> st.SearchStrategy[bytes]:
    b = _bases(a, tcp_port, udp_port)
    return st.one_of(b["udp"], b["icmp_echo"], b["tcp"], b["dns"]).filter(f.is_ipv6)


def valid_frames(a: Addressing = DEFAULT_ADDRESSING, *, tcp_port: Port = None,
                 udp_port: Port = None) -> st.SearchStrategy[LabeledFrame]:
    """Well-formed guest frames of every protocol; TCP/UDP go to the gateway (the
    mapped host loopback) at `tcp_port`/`udp_port`: by default the kit's sink."""
    b = _bases(a, tcp_port, udp_port)
    plain = st.one_of(*(s.map(partial(LabeledFrame, kind=k)) for k, s in b.items()))
    # RFC 8200 §4.1 order is only a recommendation; receivers must accept any order.
    ext = st.tuples(_ipv6_upper(a, tcp_port, udp_port),
                    st.lists(st.sampled_from([0, 60, 43]), min_size=1, max_size=4)).map(
        lambda t: LabeledFrame(f.with_ipv6_extensions(t[0], t[1]), "ipv6_extensions"))
    return st.one_of(plain, ext)


@st.composite
def _mutation(draw: st.DrawFn, a: Addressing, tcp_port: Port, udp_port: Port) -> LabeledFrame:
    b = _bases(a, tcp_port, udp_port)
    v4 = st.one_of(b["udp"], b["tcp"], b["icmp_echo"], b["dns"]).filter(f.is_ipv4)
    v6 = st.one_of(b["udp"], b["tcp"], b["icmp_echo"], b["dns"]).filter(f.is_ipv6)
    kind = draw(st.sampled_from([
        "truncated", "ihl", "total_len", "fragment", "ip_checksum", "version", "tcp_doff",
        "udp_len", "icmp_checksum", "ndp_checksum", "ndp_hop_limit", "l4_checksum",
        "bad_src_mac", "spoofed_src", "ethertype", "ip_proto", "ip6_fragment",
        "ip6_ext_past_end", "ip6_ext_too_many"]))
    if kind == "truncated":
        frame = draw(st.one_of(*b.values()))
        return f.truncated(frame, draw(st.integers(0, len(frame) - 1)))
    if kind == "ihl":
        frame = draw(v4)
        total = len(frame) - ETH_HLEN
        return f.ipv4_bad_ihl(frame, draw(st.sampled_from(
            [i for i in range(16) if i < 5 or i * 4 > total])))
    if kind == "total_len":
        frame = draw(v4)
        return f.ipv4_bad_total_length(frame, draw(st.one_of(
            st.integers(0, 19), st.integers(len(frame) - ETH_HLEN + 1, 0xFFFF))))
    if kind == "fragment":
        more, offset = draw(st.tuples(st.booleans(), st.integers(0, 0x1FFF)).filter(any))
        return f.ipv4_fragment(draw(v4), more, offset)
    if kind == "ip_checksum":
        return f.ipv4_bad_checksum(draw(v4), draw(st.integers(0, 254)))
    if kind == "version":
        frame = draw(st.one_of(v4, v6))
        right = 6 if f.is_ipv6(frame) else 4
        return f.bad_ip_version(frame, draw(st.integers(0, 15).filter(lambda v: v != right)))
    if kind == "tcp_doff":
        frame = draw(b["tcp"])
        room = len(frame) - f.transport_offset(frame)
        return f.tcp_bad_data_offset(frame, draw(st.sampled_from(
            [d for d in range(16) if d < 5 or d * 4 > room])))
    if kind == "udp_len":
        frame = draw(b["udp"])
        room = len(frame) - f.transport_offset(frame)
        return f.udp_bad_length(frame, draw(st.one_of(st.integers(0, 7),
                                                      st.integers(room + 1, 0xFFFF))))
    if kind == "icmp_checksum":
        return f.l4_bad_checksum(draw(b["icmp_echo"]), "drop_icmp_checksum")
    if kind == "ndp_checksum":
        return f.l4_bad_checksum(draw(st.one_of(b["ndp_rs"], b["ndp_ns"])), "ndp_bad_checksum")
    if kind == "ndp_hop_limit":
        return LabeledFrame(f.router_solicitation(a, draw(st.integers(0, 254))),
                            "ndp_hop_limit", "ndp_bad_hop_limit")
    if kind == "l4_checksum":
        # On a socket transport (InMemoryGuest's stream) a TCP checksum that is neither
        # right nor a partial offload value is dropped: a damaged segment must not
        # become stream data. UDP checksums are trusted as passt does.
        if draw(st.booleans()):
            return f.l4_bad_checksum(draw(b["tcp"]), "drop_tcp_checksum")
        return f.l4_bad_checksum(draw(b["udp"]), None)
    if kind == "bad_src_mac":
        mac = draw(st.one_of(st.just(a.gateway_mac), st.just(b"\xff" * 6),
                             st.binary(min_size=6, max_size=6).map(
                                 lambda m: bytes([m[0] | 1]) + m[1:])))
        return LabeledFrame(f.with_source_mac(draw(st.one_of(*b.values())), mac),
                            "bad_src_mac", "drop_eth_bad_source")
    if kind == "spoofed_src":
        src = draw(st.integers(1, M32).map(IPv4Address).filter(
            lambda ip: ip.packed != a.guest4))
        frame = draw(st.one_of(b["tcp"], b["icmp_echo"]).filter(f.is_ipv4))
        return LabeledFrame(f.with_ipv4_source(frame, src), "spoofed_src",
                            "drop_ip_spoofed_source")
    if kind == "ethertype":
        etype = draw(st.integers(0, 0xFFFF).filter(lambda t: t not in (0x0800, 0x0806, 0x86DD)))
        frame = draw(st.one_of(*b.values()))
        return LabeledFrame(frame[:12] + struct.pack("!H", etype) + frame[14:], "ethertype",
                            "drop_ethertype_unsupported")
    if kind == "ip_proto":
        proto = draw(st.integers(0, 255).filter(lambda p: p not in (1, 6, 17)))
        frame = _with_ipv4_proto(draw(b["icmp_echo"].filter(f.is_ipv4)), proto)
        return LabeledFrame(frame, "ip_proto", "drop_ip_proto_unsupported")
    frame = draw(v6)
    if kind == "ip6_fragment":
        chain = [*draw(st.lists(st.sampled_from([0, 60]), max_size=2)), 44]
        return LabeledFrame(f.with_ipv6_extensions(frame, chain), kind, "drop_ip6_fragment")
    if kind == "ip6_ext_too_many":
        # wire.py skips at most 8 extension headers, passt's and Linux's sane bound.
        return LabeledFrame(f.with_ipv6_extensions(frame, [60] * 9), kind,
                            "drop_ip6_ext_header")
    out = bytearray(f.with_ipv6_extensions(frame, [draw(st.sampled_from([0, 60]))]))
    out[ETH_HLEN + 40 + 1] = 255  # Hdr Ext Len: 2 KiB, past the payload
    return LabeledFrame(bytes(out), kind, "drop_ip6_ext_header")


def _with_ipv4_proto(frame: bytes, proto: int) -> bytes:
    """IPv4 `frame` with protocol number `proto`, its header checksum good again."""
    out = bytearray(frame)
    out[ETH_HLEN + 9] = proto
    header = slice(ETH_HLEN, ETH_HLEN + (out[ETH_HLEN] & 0x0F) * 4)
    struct.pack_into("!H", out, ETH_HLEN + 10, 0)
    struct.pack_into("!H", out, ETH_HLEN + 10, internet_checksum(out[header]))
    return bytes(out)


def broken_frames(a: Addressing = DEFAULT_ADDRESSING, *, tcp_port: Port = None,
                  udp_port: Port = None) -> st.SearchStrategy[LabeledFrame]:
    """Malformed frames, each labeled with the counter the relay must bump for it
    (``expect=None`` only for breakage the relay tolerates on purpose, which then
    reaches the host: to `tcp_port`/`udp_port`, by default the kit's sink)."""
    return _mutation(a, tcp_port, udp_port)


@dataclass(frozen=True, slots=True)
class GuestSegment:
    """One segment of a guest's connection: sequence `offset` from the ISN (0 is the
    SYN), flags, payload; ACK and window are filled in by `TcpConversation.frames`."""

    offset: int
    flags: int
    payload: bytes = b""
    options: bytes = b""


@dataclass(frozen=True, slots=True)
class TcpConversation:
    """A guest's side of one TCP connection, in the order it goes on the wire."""

    v6: bool
    sport: int
    dport: int
    isn: int
    data: bytes
    segments: tuple[GuestSegment, ...]

    def frames(self, relay_isn: int = 0, a: Addressing = DEFAULT_ADDRESSING) -> list[bytes]:
        """The frames, acknowledging the relay's SYN-ACK at `relay_isn`."""
        return [f.tcp_segment(a, self.v6, self.sport, self.dport, self.isn + s.offset,
                              0 if s.flags == SYN else relay_isn + 1, s.flags, 65535,
                              s.payload, s.options) for s in self.segments]


def tcp_conversations(dport: Port = None, v6: bool | None = None
                      ) -> st.SearchStrategy[TcpConversation]:
    """Handshake, data in segments of up to an MSS drawn from 1..1460 with loss,
    duplication and reordering, then a FIN (half-close), a RST, or nothing; to the
    gateway's port `dport` (by default the kit's sink), in family `v6` when given, else
    drawn."""
    # A plain function around the composite: hypothesis's composite wrapper lives in a
    # generated module, where documentation tools cannot resolve its annotations.
    return _conversation(dport, v6)


@st.composite
def _conversation(draw: st.DrawFn, dport: Port, v6: bool | None) -> TcpConversation:
    fam = draw(families) if v6 is None else v6
    port = draw(_dports(dport))
    isn = draw(seqs)
    data = draw(st.binary(max_size=2048))
    mss = draw(st.integers(1, 1460))
    # MSS, then NOP + window scale 7, as Linux lays out a SYN (RFC 7323 §2.2).
    opts = struct.pack("!BBH", 2, 4, mss) + b"\x01\x03\x03\x07"
    segs = [GuestSegment(0, SYN, b"", opts), GuestSegment(1, ACK)]
    chunks = [GuestSegment(1 + off, ACK | PSH, data[off:off + mss])
              for off in range(0, len(data), mss)]
    out: list[GuestSegment] = []
    for seg in chunks:
        fate = draw(st.sampled_from(["send", "send", "send", "lose", "dup"]))
        if fate != "lose":
            out.append(seg)
        if fate == "dup":
            out.append(seg)
    if len(out) > 1 and draw(st.booleans()):
        i = draw(st.integers(0, len(out) - 2))
        out[i], out[i + 1] = out[i + 1], out[i]
    out.extend(s for s in chunks if s not in out)  # retransmit what was lost
    end = draw(st.sampled_from(["fin", "rst", "none"]))
    if end == "fin":
        out.append(GuestSegment(1 + len(data), FIN | ACK))
    elif end == "rst":
        out.insert(draw(st.integers(0, len(out))), GuestSegment(1 + len(data), RST))
    return TcpConversation(fam, draw(st.integers(1024, 65535)), port, isn, data,
                           tuple(segs + out))


def frame_sequences(a: Addressing = DEFAULT_ADDRESSING, *, tcp_port: Port = None,
                    udp_port: Port = None, max_size: int = 20
                    ) -> st.SearchStrategy[list[LabeledFrame]]:
    """Lists of valid and broken frames and whole conversations' frames, interleaved;
    TCP and UDP to the gateway at `tcp_port`/`udp_port` (by default the kit's sink)."""
    conv = tcp_conversations(tcp_port).map(
        lambda c: [LabeledFrame(d, "conversation") for d in c.frames(0, a)])
    single = st.one_of(valid_frames(a, tcp_port=tcp_port, udp_port=udp_port),
                       broken_frames(a, tcp_port=tcp_port, udp_port=udp_port)
                       ).map(lambda x: [x])
    return st.lists(st.one_of(single, single, conv), max_size=max_size).map(
        lambda groups: [x for g in groups for x in g])
