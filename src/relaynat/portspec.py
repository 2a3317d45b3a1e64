"""passt's port-forwarding specification (`-t` / `-u`), parsed into forward ranges.

The syntax is passt's (man passt, -t/--tcp-ports), so people can move their command lines
over unchanged::

    none | all | [ADDR[%IF]/]ITEM[,ITEM...]
    ITEM    = PORT[-PORT][:GUESTPORT[-GUESTPORT]] | ~PORT[-PORT]

- ADDR is an IPv4 or IPv6 host address to listen on, written plainly (passt hands the part
  before the first '/' to inet_pton, so `::1/22` and `fe80::1%eth0/22` need no brackets);
  `%IF` binds the listener to an interface (SO_BINDTODEVICE); `%IF/` alone is an interface
  without an address. The prefix applies to every item of the list.
- `~RANGE` excludes ports from every range of the list, wherever it appears; a list of only
  exclusions means "all, except these".
- `all` (and the exclusion-only form) cover the non-ephemeral ports 1..49151, as passt
  does: ports from 49152 up are the dynamic range (RFC 6335 §6) that the host's own
  outgoing connections use. Pass `ephemeral_first=65536` for every port.

Differences from passt, all stricter: an exclusion must lie inside the forwarded ports (passt
ignores it silently), a port forwarded twice is an error (passt warns and remaps), a spec
that ends up forwarding nothing is an error. Our addition: host port 0 means "let the
kernel pick a port" and needs an explicit guest port (`0:8080`); it is never part of a range.

Ranges stay ranges: `all` is one `Forward`, not 49151 objects; `Forward.pairs()` expands
lazily. This module is pure: binding the listeners is the relay's job.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

from relaynat.config import ConfigError

MAX_PORT = 65535
#: RFC 6335 §6: 49152..65535 are dynamic/private ports; `all` stops below them (as passt).
EPHEMERAL_FIRST = 49152
#: Linux IFNAMSIZ is 16 including the terminating NUL.
IFNAMSIZ = 16
PROTOS = ("tcp", "udp")

_NUMBER = re.compile(r"[0-9]+")
#: Builds the ConfigError for one spec from the reason alone.
_Bad = Callable[[str], ConfigError]


@dataclass(slots=True, frozen=True)
class Forward:
    """Host ports host_first..host_last (inclusive) forward to guest ports guest_first.. of
    the same length. `address` None listens on every address (both families); `interface`
    None on every interface. host_first == host_last == 0: one port the kernel picks."""

    proto: str
    address: IPv4Address | IPv6Address | None
    interface: str | None
    host_first: int
    host_last: int
    guest_first: int

    @property
    def guest_last(self) -> int:
        return self.guest_first + (self.host_last - self.host_first)

    def __len__(self) -> int:
        return self.host_last - self.host_first + 1

    def pairs(self) -> Iterator[tuple[int, int]]:
        """(host port, guest port) for each port of the range, lazily."""
        delta = self.guest_first - self.host_first
        for port in range(self.host_first, self.host_last + 1):
            yield port, port + delta


def iter_ports(forwards: Iterable[Forward]) -> Iterator[tuple[int, int]]:
    """Every (host port, guest port) of a list of forwards, lazily."""
    for fwd in forwards:
        yield from fwd.pairs()


def parse_portspec(spec: str, proto: str = "tcp", *,
                   ephemeral_first: int = EPHEMERAL_FIRST) -> list[Forward]:
    """Parse one `-t`/`-u` argument. Raises ConfigError quoting `spec` and the problem."""
    if proto not in PROTOS:
        raise ConfigError(f"port spec protocol must be tcp or udp, not {proto!r}")
    if not 1 < ephemeral_first <= MAX_PORT + 1:
        raise ConfigError(f"first ephemeral port {ephemeral_first} must be 2..{MAX_PORT + 1}")
    if not isinstance(spec, str):
        raise ConfigError(f"port spec {spec!r} is not a string")
    if spec == "none":
        return []
    if spec == "all":
        return [Forward(proto, None, None, 1, ephemeral_first - 1, 1)]

    def bad(why: str) -> ConfigError:
        return ConfigError(f"port spec {spec!r}: {why}")

    address, interface, body = _split_prefix(spec, bad)
    items = body.split(",")
    excludes: list[tuple[int, int]] = []
    bases: list[tuple[int, int, int]] = []  # host first, host last, guest first
    for item in items:
        if not item:
            raise bad("empty item in the comma-separated list")
        if item.startswith("~"):
            first, last = _parse_range(item[1:], item, bad)
            if first == 0:
                raise bad(f"exclusion {item!r} contains port 0")
            for xf, xl in excludes:
                if first <= xl and xf <= last:
                    raise bad(f"exclusion {item!r} overlaps another exclusion")
            excludes.append((first, last))
            continue
        host, colon, guest = item.partition(":")
        first, last = _parse_range(host, item, bad)
        if colon:
            gfirst, glast = _parse_range(guest, item, bad)
            if glast - gfirst != last - first:
                raise bad(f"{item!r} maps {last - first + 1} host ports to "
                          f"{glast - gfirst + 1} guest ports")
        else:
            gfirst, glast = first, last
        where = "" if item == body else f" in {item!r}"
        if first == 0 and last != 0:
            raise bad(f"port 0 (let the kernel pick) cannot start a range{where}")
        if first == 0 and not colon:
            raise bad(f"host port 0 (let the kernel pick) needs a guest port, e.g. '0:8080'"
                      f"{where}")
        if gfirst == 0:
            raise bad(f"guest port 0 is not a port{where}")
        bases.append((first, last, gfirst))

    if not bases:  # only exclusions: everything else that `all` would forward
        bases = [(1, ephemeral_first - 1, 1)]
    for i, (first, last, _) in enumerate(bases):
        for other_first, other_last, _ in bases[:i]:
            if first and first <= other_last and other_first <= last:
                overlap = max(first, other_first)
                raise bad(f"port {overlap} is forwarded twice")
    for xf, xl in excludes:
        inside = sum(max(0, min(xl, last) - max(xf, first) + 1) for first, last, _ in bases
                     if first)
        if inside != xl - xf + 1:
            raise bad(f"exclusion ~{_fmt_range(xf, xl)} is outside the forwarded ports")

    forwards = []
    for first, last, gfirst in bases:
        for piece_first, piece_last in _subtract(first, last, excludes):
            forwards.append(Forward(proto, address, interface, piece_first, piece_last,
                                    gfirst + piece_first - first))
    if not forwards:
        raise bad("the exclusions leave no port to forward")
    return forwards


def _split_prefix(spec: str, bad: _Bad) -> tuple[IPv4Address | IPv6Address | None,
                                                  str | None, str]:
    """Split `[ADDR[%IF]/]BODY` as passt does: at the first '/', then at '%'."""
    head, slash, body = spec.partition("/")
    if not slash:
        return None, None, spec
    text, percent, interface = head.partition("%")
    if percent:
        if not interface or len(interface) >= IFNAMSIZ or interface in (".", ".."):
            raise bad(f"interface name {interface!r} must be 1..{IFNAMSIZ - 1} characters")
        if not interface.isascii() or not interface.isprintable() or any(
                c in interface for c in " :/%,~"):
            raise bad(f"interface name {interface!r} has a character Linux refuses")
    address: IPv4Address | IPv6Address | None = None
    if text or not percent:
        try:
            address = ip_address(text)
        except ValueError:
            raise bad(f"{text!r} is not an IPv4 or IPv6 address") from None
    return address, interface if percent else None, body


def _parse_range(text: str, item: str, bad: _Bad) -> tuple[int, int]:
    first_text, dash, last_text = text.partition("-")
    first = _parse_port(first_text, item, bad)
    last = _parse_port(last_text, item, bad) if dash else first
    if first > last:
        raise bad(f"range {text!r} is reversed ({first} > {last})")
    return first, last


def _parse_port(text: str, item: str, bad: _Bad) -> int:
    where = "" if text == item else f" in {item!r}"
    if not _NUMBER.fullmatch(text):
        raise bad(f"{text!r}{where} is not a port number" if text else
                  f"a port number is missing in {item!r}")
    if len(text.lstrip("0")) > 5 or int(text) > MAX_PORT:
        raise bad(f"port {text}{where} is above {MAX_PORT}")
    return int(text)


def _subtract(first: int, last: int, excludes: list[tuple[int, int]]
              ) -> Iterator[tuple[int, int]]:
    """The pieces of first..last not covered by any (non-overlapping) exclusion."""
    start = first
    for xf, xl in sorted(excludes):
        if xl < start or xf > last:
            continue
        if xf > start:
            yield start, xf - 1
        start = xl + 1
    if start <= last:
        yield start, last


def _fmt_range(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


def format_portspec(forwards: Iterable[Forward]) -> str:
    """Spec text that parses back to the same forwards (`none` for an empty list).
    All forwards must share protocol, address and interface, as one spec's do."""
    forwards = list(forwards)
    if not forwards:
        return "none"
    head = forwards[0]
    if any((f.proto, f.address, f.interface) != (head.proto, head.address, head.interface)
           for f in forwards):
        raise ValueError("forwards with different protocols, addresses or interfaces "
                         "need one spec each")
    items = []
    for fwd in forwards:
        text = _fmt_range(fwd.host_first, fwd.host_last)
        if fwd.guest_first != fwd.host_first:
            text += ":" + _fmt_range(fwd.guest_first, fwd.guest_last)
        items.append(text)
    prefix = ""
    if head.address is not None or head.interface is not None:
        prefix = (str(head.address) if head.address is not None else "")
        prefix += f"%{head.interface}/" if head.interface is not None else "/"
    return prefix + ",".join(items)
