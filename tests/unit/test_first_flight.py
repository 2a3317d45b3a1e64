"""The name a first flight carries (first_flight.py): real ClientHellos from Python's ssl
module (OpenSSL) and built ones (ECH, several records, broken extensions), HTTP/1
request heads, with hypothesis cutting them into segments and records anywhere."""

from __future__ import annotations

import ssl
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaynat.first_flight import (
    DENY_REASONS,
    FIRST_FLIGHT_MAX,
    FirstFlight,
    Outcome,
    read_name,
)


def openssl_hello(server_name: str | None) -> bytes:
    """The first flight OpenSSL sends as a client (`server_hostname` is its SNI)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        conn.do_handshake()
    return outgoing.read()


def ext(ext_type: int, data: bytes) -> bytes:
    return struct.pack("!HH", ext_type, len(data)) + data


def sni_ext(*names: bytes) -> bytes:
    entries = b"".join(struct.pack("!BH", 0, len(n)) + n for n in names)
    return ext(0, struct.pack("!H", len(entries)) + entries)


def hello_message(extensions: bytes) -> bytes:
    """A TLS 1.2-style ClientHello handshake message with `extensions`."""
    body = (b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
            + struct.pack("!H", len(extensions)) + extensions)
    return b"\x01" + len(body).to_bytes(3, "big") + body


def records(message: bytes, cuts: list[int] | None = None) -> bytes:
    """`message` in handshake records, cut at `cuts` (offsets into it)."""
    points = sorted({c for c in (cuts or []) if 0 < c < len(message)})
    out = b""
    for start, end in zip([0, *points], [*points, len(message)], strict=True):
        out += struct.pack("!BHH", 22, 0x0301, end - start) + message[start:end]
    return out


def feed_in(data: bytes, cuts: list[int], final: bool = False) -> tuple[FirstFlight,
                                                                         list[Outcome | None]]:
    """`data` fed in segments cut at `cuts`; the outcome after each."""
    flight = FirstFlight()
    points = sorted({c for c in cuts if 0 < c < len(data)})
    seen = []
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    for i, piece in enumerate(pieces):
        flight.feed(piece, final=final and i == len(pieces) - 1)
        seen.append(flight.outcome())
    return flight, seen


# --- TLS ---------------------------------------------------------------------------------

def test_openssl_hello_names_its_sni() -> None:
    assert read_name(openssl_hello("pypi.org")) == Outcome("pypi.org", "sni")


def test_openssl_hello_without_sni_is_no_sni() -> None:
    assert read_name(openssl_hello(None)) == Outcome(None, "sni", "no_sni")


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=600), max_size=8))
def test_split_hello_decides_only_when_complete(cuts: list[int]) -> None:
    """Cut into segments anywhere, a hello decides nothing until its last byte came,
    then the same as whole."""
    data = openssl_hello("files.pythonhosted.org")
    flight, seen = feed_in(data, cuts)
    assert seen[-1] == Outcome("files.pythonhosted.org", "sni")
    assert all(o is None for o in seen[:-1])
    assert flight.take() == data


@settings(max_examples=200, deadline=None)
@given(record_cuts=st.lists(st.integers(min_value=1, max_value=300), max_size=5),
       segment_cuts=st.lists(st.integers(min_value=1, max_value=400), max_size=5))
def test_hello_over_several_records(record_cuts: list[int], segment_cuts: list[int]) -> None:
    """RFC 8446 §5.1: a handshake message may span records; the records, segments."""
    message = hello_message(sni_ext(b"a.example.org") + ext(10, b"\x00\x02\x00\x1d"))
    data = records(message, record_cuts)
    _flight, seen = feed_in(data, segment_cuts)
    assert seen[-1] == Outcome("a.example.org", "sni")
    assert all(o is None for o in seen[:-1])


def test_ech_without_outer_sni_is_ech_and_with_one_is_judged_by_it() -> None:
    ech = ext(0xFE0D, b"\x00" + bytes(40))
    assert read_name(records(hello_message(ech))) == Outcome(None, "sni", "ech")
    assert read_name(records(hello_message(sni_ext(b"public.example") + ech))) == Outcome(
        "public.example", "sni")


@pytest.mark.parametrize("extensions", [
    sni_ext(b"a.example", b"b.example"),          # two host_names (RFC 6066 §3)
    ext(0, b"\x00\x10\x00\x00\x03abc"),           # list length past the extension
    sni_ext(b"caf\xc3\xa9.example"),              # not ASCII
    sni_ext(b""),                                 # empty name
])
def test_broken_server_name_is_unknown_protocol(extensions: bytes) -> None:
    outcome = read_name(records(hello_message(extensions)))
    assert outcome is not None and outcome.name is None
    assert outcome.reason == "unknown_protocol"


def test_other_handshake_or_record_type_is_unknown_protocol() -> None:
    server_hello = b"\x02" + hello_message(b"")[1:]
    assert read_name(records(server_hello)) == Outcome(None, "sni", "unknown_protocol")
    alert = struct.pack("!BHH", 21, 0x0303, 2) + b"\x02\x28"
    assert read_name(alert) == Outcome(None, "", "unknown_protocol")
    assert read_name(struct.pack("!BHH", 22, 0x0303, 0)) == Outcome(None, "sni",
                                                                       "unknown_protocol")
    assert read_name(struct.pack("!BHH", 22, 0x0203, 10)) == Outcome(None, "sni",
                                                                        "unknown_protocol")


# --- HTTP/1 --------------------------------------------------------------------------------

@pytest.mark.parametrize(("head", "outcome"), [
    (b"GET / HTTP/1.1\r\nHost: pypi.org\r\n\r\n", Outcome("pypi.org", "host")),
    (b"GET / HTTP/1.1\r\nhOsT:   PyPI.org:8080  \r\nAccept: */*\r\n\r\n",
     Outcome("PyPI.org", "host")),
    (b"GET / HTTP/1.1\r\nHost: [fd00::1]:80\r\n\r\n", Outcome("fd00::1", "host")),
    (b"POST /x HTTP/1.0\r\nHost: a.example\r\nContent-Length: 99\r\n\r\nabc",
     Outcome("a.example", "host")),
    (b"GET http://a.example/x HTTP/1.1\r\nHost: a.example\r\n\r\n", Outcome("a.example",
                                                                             "host")),
    (b"GET http://evil.example/x HTTP/1.1\r\nHost: a.example\r\n\r\n",
     Outcome(None, "host", "no_host")),
    (b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
     Outcome(None, "host", "no_host")),
    (b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n", Outcome(None, "host", "no_host")),
    (b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n",
     Outcome(None, "host", "no_host")),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Outcome(None, "host", "unknown_protocol")),
    (b"SSH-2.0-OpenSSH_9.2\r\n", Outcome(None, "", "unknown_protocol")),
    (b"\x00\x01binary", Outcome(None, "", "unknown_protocol")),
])
def test_http_head(head: bytes, outcome: Outcome) -> None:
    assert read_name(head) == outcome


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=60), max_size=6))
def test_split_http_head_decides_at_its_end(cuts: list[int]) -> None:
    head = b"GET /simple/ HTTP/1.1\r\nHost: pypi.org\r\nUser-Agent: x\r\n\r\n"
    _flight, seen = feed_in(head, cuts)
    assert seen[-1] == Outcome("pypi.org", "host")
    assert all(o is None for o in seen[:-1])


# --- bounds, FIN, timeout ----------------------------------------------------------------

def test_too_big_without_a_name() -> None:
    flight = FirstFlight()
    taken = flight.feed(b"GET / HTTP/1.1\r\n" + b"X-Pad: " + b"a" * FIRST_FLIGHT_MAX)
    assert taken == FIRST_FLIGHT_MAX
    assert flight.outcome() == Outcome(None, "", "first_flight_too_big")
    assert len(flight.held) == FIRST_FLIGHT_MAX
    assert flight.feed(b"more") == 0


def test_fin_before_a_name_and_timeout() -> None:
    flight = FirstFlight()
    flight.feed(b"GET / HTTP/1.1\r\nHost: a", final=True)
    assert flight.outcome() == Outcome(None, "", "unknown_protocol")
    waiting = FirstFlight()
    waiting.feed(openssl_hello("a.example")[:50])
    assert waiting.outcome() is None
    assert waiting.expire() == Outcome(None, "", "first_flight_timeout")
    assert FirstFlight().expire().reason == "first_flight_timeout"


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=3000), cuts=st.lists(st.integers(1, 3000), max_size=5),
       final=st.booleans(), prefix=st.sampled_from([b"", b"\x16\x03\x01", b"GET / HTTP/1.1\r\n"]))
def test_any_bytes_decide_within_bounds(data: bytes, cuts: list[int], final: bool,
                                        prefix: bytes) -> None:
    """Whatever the guest sends: no exception, never more than the limit held, a name
    or a known reason, and with its FIN an outcome."""
    flight, seen = feed_in(prefix + data, cuts, final)
    outcome = seen[-1] if seen else None
    assert len(flight.held) <= FIRST_FLIGHT_MAX
    if outcome is not None:
        assert (outcome.name is None) == (outcome.reason is not None)
        assert outcome.reason is None or outcome.reason in DENY_REASONS
    if final and (prefix or data):
        assert outcome is not None
