"""The name a guest's TCP flow puts on the wire, read from its first flight before the
host connect: the TLS ClientHello's server_name (RFC 6066 §3) or the HTTP/1 request's
Host (RFC 9112 §3.2).

A flow that a domain rule allows on an inspected port (`policy.Decision.inspect`) is
answered by the relay itself; `FirstFlight` holds what the guest sends first, at most
`FIRST_FLIGHT_MAX` bytes, until `outcome()` can name the server it asks for (then the
shell asks the policy, connects and writes the held bytes first) or say why no name
will come. This is the one place the relay holds in-order stream bytes in userspace,
bounded per flow here and per relay by the shell's limit on pending connects.

What is decided:

- A first flight that begins with a TLS handshake record is a ClientHello: its
  records (RFC 8446 §5.1: a handshake message may span several records, and the
  records several segments) are put together until the whole message is there, then
  parsed with dpkt's TLS module. Its `server_name` host_name is the name; none is
  "no_sni".
- Encrypted Client Hello (draft-ietf-tls-esni, extension 0xfe0d): the real name is
  in the encrypted inner hello and the outer one names the client-facing server
  (`public_name`). The outer SNI is judged like any other, so the client-facing
  server must itself be an allowed name learned for the address; a hello with the
  ECH extension and no outer SNI is "ech". The relay's DNS answers HTTPS/SVCB queries
  with no data, so a guest gets no ECH configuration from it; a hello that carries
  the extension with a covered outer SNI is most often GREASE (RFC 8701), which
  browsers send without any configuration, and refusing it would break them.
- A first flight that begins with an HTTP/1 request line is read up to the end of its
  header block; exactly one Host field is the name (port and IPv6 brackets
  removed). None, several, or an absolute-form request target whose host differs
  from Host is "no_host" (RFC 9112 §3.2: a server answers 400 to several Hosts, and
  §3.2.2: it takes an absolute-form target's authority over Host, so that is the
  name that counts, and both must agree). CONNECT is "no_host" too: its authority
  names a tunnel's far end, not this server.
- Anything else (another protocol, HTTP/2 with prior knowledge, a malformed hello)
  is "unknown_protocol"; more than `FIRST_FLIGHT_MAX` bytes without an answer is
  "first_flight_too_big"; the shell's deadline is "first_flight_timeout".

This module does no I/O.
"""

from __future__ import annotations

import io
import re
import struct
from typing import NamedTuple

import dpkt
from dpkt import ssl as dpkt_ssl
from dpkt.http import parse_headers

__all__ = ["DENY_REASONS", "FIRST_FLIGHT_MAX", "FIRST_FLIGHT_TIMEOUT_S", "FirstFlight",
           "Outcome", "read_name"]

#: Bytes of first flight read at most before deciding (the ClientHello of a browser
#: with post-quantum key shares is under 2 KiB; a request's header block rarely
#: exceeds 8 KiB).
FIRST_FLIGHT_MAX = 16 * 1024
#: How long the guest has to send it, from the relay's SYN-ACK.
FIRST_FLIGHT_TIMEOUT_S = 10.0

#: Why a flow's first flight was refused (`FlowDenied.reason`, and the counters
#: `policy_denied_<reason>`). "name_mismatch" is the policy's: a name was read but the
#: rule does not cover it or the address was not learned for it.
DENY_REASONS = ("name_mismatch", "no_sni", "no_host", "ech", "unknown_protocol",
                "first_flight_timeout", "first_flight_too_big")

_TLS_HANDSHAKE = 22
_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_EXT_ECH = 0xFE0D
_SNI_HOST_NAME = 0
_RECORD_HEADER = struct.Struct("!BHH")
_HANDSHAKE_HEADER_LEN = 4
#: RFC 8446 §5.1: a record's plaintext is at most 2^14 bytes.
_RECORD_MAX = 1 << 14
#: RFC 9110 §5.6.2 token characters, then the space after the method.
_REQUEST_START = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ ")
_TOKEN_PREFIX = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]*")
_HEADER_END = b"\r\n\r\n"


class Outcome(NamedTuple):
    """What a first flight says: the name it carries (`name`, with `kind` "sni" or
    "host"), or why it carries none (`reason`, one of `DENY_REASONS`; `name` None)."""

    name: str | None
    kind: str
    reason: str | None = None


def read_name(data: bytes | bytearray | memoryview, final: bool = False) -> Outcome | None:
    """The outcome of the first flight `data`, or None while more bytes could still
    decide it. `final`: no more will come (the guest sent its FIN)."""
    buf = bytes(data)
    if not buf:
        return Outcome(None, "", "unknown_protocol") if final else None
    if buf[0] == _TLS_HANDSHAKE:
        outcome = _tls(buf)
    elif _REQUEST_START.match(buf) or _TOKEN_PREFIX.fullmatch(buf):
        outcome = _http(buf)
    else:
        return Outcome(None, "", "unknown_protocol")
    if outcome is None and final:
        return Outcome(None, "", "unknown_protocol")
    return outcome


def _tls(buf: bytes) -> Outcome | None:
    """The ClientHello's records put together, then the message parsed."""
    message = bytearray()
    pos = 0
    while True:
        if len(message) >= _HANDSHAKE_HEADER_LEN:
            need = _HANDSHAKE_HEADER_LEN + int.from_bytes(message[1:4], "big")
            if message[0] != _CLIENT_HELLO:
                return Outcome(None, "sni", "unknown_protocol")
            if len(message) >= need:
                return _client_hello(bytes(message[:need]))
        if len(buf) - pos < _RECORD_HEADER.size:
            return None
        rtype, version, length = _RECORD_HEADER.unpack_from(buf, pos)
        # RFC 8446 §5.1: handshake records only until the hello is complete; the
        # legacy record version is 0x0301..0x0303 (0x0300 for SSL 3.0, refused too).
        if rtype != _TLS_HANDSHAKE or version >> 8 != 3 or length == 0 or length > _RECORD_MAX:
            return Outcome(None, "sni", "unknown_protocol")
        if len(buf) - pos < _RECORD_HEADER.size + length:
            return None
        record = dpkt_ssl.TLSRecord(buf[pos:pos + _RECORD_HEADER.size + length])
        message += record.data
        pos += _RECORD_HEADER.size + length


def _client_hello(message: bytes) -> Outcome:
    try:
        hello = dpkt_ssl.TLSHandshake(message).data
        extensions: list[tuple[int, bytes]] = getattr(hello, "extensions", [])
    except (dpkt.Error, dpkt_ssl.SSL3Exception, struct.error, ValueError, IndexError):
        return Outcome(None, "sni", "unknown_protocol")
    ech = False
    names: list[str] = []
    for ext_type, ext_data in extensions:
        if ext_type == _EXT_ECH:
            ech = True
        elif ext_type == _EXT_SERVER_NAME:
            parsed = _server_names(ext_data)
            if parsed is None:
                return Outcome(None, "sni", "unknown_protocol")
            names.extend(parsed)
    # RFC 6066 §3: at most one name of each type; several host_names is malformed.
    if len(names) > 1:
        return Outcome(None, "sni", "unknown_protocol")
    if names:
        return Outcome(names[0], "sni")
    return Outcome(None, "sni", "ech" if ech else "no_sni")


def _server_names(data: bytes) -> list[str] | None:
    """The host_name entries of a server_name extension (RFC 6066 §3), None when it
    does not parse."""
    if len(data) < 2:
        return None
    (total,) = struct.unpack_from("!H", data)
    if total != len(data) - 2:
        return None
    names = []
    pos = 2
    while pos < len(data):
        if len(data) - pos < 3:
            return None
        name_type, length = struct.unpack_from("!BH", data, pos)
        pos += 3
        if len(data) - pos < length:
            return None
        if name_type == _SNI_HOST_NAME:
            raw = data[pos:pos + length]
            if not raw or not raw.isascii():
                return None
            names.append(raw.decode("ascii"))
        pos += length
    return names


def _http(buf: bytes) -> Outcome | None:
    end = buf.find(_HEADER_END)
    if end < 0:
        return None
    line_end = buf.find(b"\r\n")
    request_line = buf[:line_end].decode("latin-1").split(" ")
    if len(request_line) != 3 or not request_line[2].startswith("HTTP/1."):
        return Outcome(None, "host", "unknown_protocol")
    method, target, _version = request_line
    try:
        headers = parse_headers(io.BytesIO(buf[line_end + 2:end + 4]))
    except dpkt.Error:
        return Outcome(None, "host", "no_host")
    host = headers.get("host")
    if not isinstance(host, str) or method == "CONNECT":
        return Outcome(None, "host", "no_host")
    name = _host_of(host)
    if name is None:
        return Outcome(None, "host", "no_host")
    if "://" in target:
        # RFC 9112 §3.2.2: the target's authority wins over Host; both must agree.
        authority = target.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
        if _host_of(authority) != name:
            return Outcome(None, "host", "no_host")
    return Outcome(name, "host")


def _host_of(authority: str) -> str | None:
    """The host of an authority (RFC 3986 §3.2.2), port and IPv6 brackets removed."""
    authority = authority.strip()
    if authority.startswith("["):
        close = authority.find("]")
        host = authority[1:close] if close > 0 else ""
    else:
        # One colon: host and port; more: an IPv6 address without brackets, all host.
        head, colon, _port = authority.rpartition(":")
        host = head if colon and ":" not in head else authority
    return host or None


class FirstFlight:
    """The first flight of one inspected flow, held until `outcome()` decides. `feed`
    takes what the guest sent, up to `limit` bytes in all."""

    __slots__ = ("_outcome", "held", "limit")

    def __init__(self, limit: int = FIRST_FLIGHT_MAX) -> None:
        self.limit = limit
        self.held = bytearray()
        self._outcome: Outcome | None = None

    def feed(self, data: bytes | memoryview, final: bool = False) -> int:
        """Hold `data` (or as much as fits); returns the bytes taken. `final`: the
        guest sent its FIN after it. Nothing is taken once the outcome is known."""
        if self._outcome is not None:
            return 0
        room = self.limit - len(self.held)
        take = min(room, len(data))
        self.held += data[:take]
        outcome = read_name(self.held, final and take == len(data))
        if outcome is None and (take < len(data) or len(self.held) >= self.limit):
            outcome = Outcome(None, "", "first_flight_too_big")
        self._outcome = outcome
        return take

    def outcome(self) -> Outcome | None:
        """The outcome, once the bytes held decide it; None while more may come."""
        return self._outcome

    def expire(self) -> Outcome:
        """The guest took too long: the outcome is a timeout unless already known."""
        if self._outcome is None:
            self._outcome = Outcome(None, "", "first_flight_timeout")
        return self._outcome

    def take(self) -> bytes:
        """The held bytes, for the host socket; nothing is held after."""
        held = bytes(self.held)
        self.held = bytearray()
        return held
