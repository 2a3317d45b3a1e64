"""Domain names for the egress policy: normalising and matching them, and the table of
addresses the relay's DNS forwarder saw answered for each name.

A policy rule may name domains (`pypi.org`, `*.pythonhosted.org`). A guest's flow goes to
an address, not a name, so a domain rule can only be judged by what the relay itself saw:
the A and AAAA answers its DNS forwarder passed to this guest (the approach of Cilium's
DNS-aware policies). `NameTable` keeps them, one table per guest:

- `learn(name, addrs, ttl, now)` records that `name` resolved to `addrs` for `ttl`
  seconds (clamped to the table's floor and cap: an answer with TTL 0, which dnsmasq
  gives for its local names, must still let the connect that follows it through, and a
  week-long TTL must not keep an address valid for a week);
- `names_for(addr, now)` is every name a still-valid answer held `addr` for: a rule
  covering one of them matches a flow to `addr`. An address never answered matches no
  domain rule at all;
- `hold(addr, now)` / `release(addr, now)`: a flow to `addr` is open / has ended. An
  address of an open flow stays valid for its names however old the answer (a long download
  outlives a 60 s TTL), and for `grace_s` after its last flow ends, so that a client
  reconnecting to the address it still caches is not refused the moment the TTL passes;
- the table is bounded (`max_entries` (name, address) pairs): the oldest answer learned
  goes first, counted in `evicted`.

Names are compared in one form (`normalize_domain`): lower case, without the final dot,
IDNA labels in their A-label (`xn--`) form, so that `Example.ORG.`, `example.org` and
`EXAMPLE.org` are one name and `bücher.example` matches the `xn--bcher-kva.example` the
guest's resolver sends. A `*.` pattern matches names strictly below its suffix: not the
suffix itself and not a name that merely ends in the same letters (`*.example.org`
matches `a.example.org` and `a.b.example.org`, not `example.org` nor `evilexample.org`).

This module does no I/O and keeps no clock: `now` is a parameter (any monotonic clock).
"""

from __future__ import annotations

import unicodedata
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from relaynat.config import ConfigError

#: RFC 1035 §2.3.4: a label is at most 63 octets, a name at most 255 on the wire (253
#: characters in dotted form without the final dot).
MAX_LABEL = 63
MAX_NAME = 253


def normalize_domain(name: str) -> str:
    """`name` in the one form names are compared in: lower case, one final dot removed,
    each label in its IDNA A-label form. ConfigError for what is no domain name (empty,
    an empty label, a label or a name too long, a label IDNA refuses)."""
    if not isinstance(name, str):
        raise ConfigError(f"domain {name!r} is not a string")
    text = name.strip()
    if text.endswith("."):
        text = text[:-1]
    if not text:
        raise ConfigError(f"domain {name!r} is empty")
    labels = []
    for label in text.split("."):
        if not label:
            raise ConfigError(f"domain {name!r} has an empty label")
        if label.isascii():
            out = label.lower()
        else:
            wanted = unicodedata.normalize("NFC", label.lower())
            try:
                # The idna codec (IDNA 2003, RFC 3490 ToASCII with nameprep) turns a
                # Unicode label into its xn-- form.
                out = wanted.encode("idna").decode("ascii")
                back = out.encode("ascii").decode("idna")
            except UnicodeError as exc:
                raise ConfigError(f"domain {name!r}: label {label!r} is not a valid "
                                  f"IDNA label ({exc})") from None
            if back != wanted:
                # Nameprep mapped the label to another one (ß to ss, final sigma to
                # sigma, full-width letters, joiners dropped): IDNA 2008 (RFC 5891), as
                # resolvers and browsers use it, keeps them apart, so the two codecs
                # would name different domains. Refused rather than guessed.
                raise ConfigError(f"domain {name!r}: label {label!r} becomes {back!r} "
                                  "under IDNA 2003, which IDNA 2008 does not do: give "
                                  "the label in its xn-- form")
        if len(out) > MAX_LABEL:
            raise ConfigError(f"domain {name!r}: label {label!r} is longer than "
                              f"{MAX_LABEL} octets")
        if any(c in out for c in " \t\\*"):
            raise ConfigError(f"domain {name!r}: label {label!r} has a character no "
                              "domain name label has here (space, backslash or '*')")
        labels.append(out)
    normalized = ".".join(labels)
    if len(normalized) > MAX_NAME:
        raise ConfigError(f"domain {name!r} is longer than {MAX_NAME} characters")
    return normalized


def normalize_pattern(pattern: str) -> str:
    """A rule's domain: a name (`normalize_domain`), or `*.` and a name for every name
    strictly below it. A `*` anywhere else is refused (`a.*.org`, `*example.org`, `*`)."""
    if not isinstance(pattern, str):
        raise ConfigError(f"domain {pattern!r} is not a string")
    text = pattern.strip()
    if text.startswith("*."):
        return "*." + normalize_domain(text[2:])
    if "*" in text:
        raise ConfigError(f"domain {pattern!r}: '*' may only be the first label, as "
                          "'*.example.org'")
    return normalize_domain(text)


def wire_name(name: str) -> str | None:
    """A name as a guest sent it (a DNS question, a TLS SNI, an HTTP Host) in the
    compared form, or None when it is no domain name: it is not IDNA-normalised again
    (on the wire a name is already in A-labels; a non-ASCII one is refused), only
    lowered and stripped of one final dot."""
    if not name.isascii():
        return None
    text = name.lower()
    if text.endswith("."):
        text = text[:-1]
    if not text or len(text) > MAX_NAME or ".." in text or text.startswith("."):
        return None
    return text


def domain_matches(pattern: str, name: str) -> bool:
    """Whether normalised `name` is covered by normalised `pattern`: the same name, or
    for `*.suffix` a name strictly below suffix (label boundary included)."""
    if pattern.startswith("*."):
        suffix = pattern[1:]  # ".example.org": the dot keeps evilexample.org out
        return len(name) > len(suffix) and name.endswith(suffix)
    return name == pattern


@dataclass(frozen=True, slots=True)
class LearnedName:
    """One (name, address) pair of a `NameTable`, as `entries` lists it."""

    name: str
    addr: bytes
    #: Seconds the answer stays valid from `now` (0 once it ran out: valid only because
    #: a flow holds the address, or within the grace after one).
    expires_in: float
    #: Open flows to the address.
    flows: int


class NameTable:
    """The (name, address) pairs this guest's DNS answers held, each valid until its
    TTL (or the grace after the address's last flow) runs out; see the module
    docstring. Names given to it are normalised already."""

    __slots__ = ("_by_addr", "_entries", "_holds", "evicted", "grace_s", "max_entries",
                 "ttl_max_s", "ttl_min_s")

    def __init__(self, max_entries: int = 4096, ttl_min_s: float = 10.0,
                 ttl_max_s: float = 3600.0, grace_s: float = 60.0) -> None:
        self.max_entries = max_entries
        self.ttl_min_s = ttl_min_s
        self.ttl_max_s = ttl_max_s
        self.grace_s = grace_s
        #: (name, addr) -> expiry, oldest learned first (re-learning moves to the end).
        self._entries: OrderedDict[tuple[str, bytes], float] = OrderedDict()
        #: addr -> the names with an entry for it.
        self._by_addr: dict[bytes, set[str]] = {}
        #: addr -> open flows to it.
        self._holds: dict[bytes, int] = {}
        #: Entries pushed out by the bound (the relay counts them as dns_names_evicted).
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def learn(self, name: str, addrs: Iterable[bytes], ttl: float, now: float) -> None:
        """`name` resolved to `addrs` (packed, 4 or 16 bytes) with `ttl` seconds."""
        expiry = now + min(max(float(ttl), self.ttl_min_s), self.ttl_max_s)
        entries = self._entries
        for addr in addrs:
            key = (name, addr)
            old = entries.pop(key, None)
            # An answer never shortens what an earlier one granted (a second resolver
            # in a chain may hand out a smaller remaining TTL).
            entries[key] = expiry if old is None else max(old, expiry)
            self._by_addr.setdefault(addr, set()).add(name)
        while len(entries) > self.max_entries:
            (old_name, old_addr), _ = entries.popitem(last=False)
            self._unindex(old_name, old_addr)
            self.evicted += 1

    def _unindex(self, name: str, addr: bytes) -> None:
        names = self._by_addr.get(addr)
        if names is not None:
            names.discard(name)
            if not names:
                del self._by_addr[addr]

    def _valid(self, key: tuple[str, bytes], now: float) -> bool:
        expiry = self._entries.get(key)
        if expiry is None:
            return False
        if expiry > now or self._holds.get(key[1], 0) > 0:
            return True
        del self._entries[key]  # ran out: forgotten, so the table holds live answers
        self._unindex(*key)
        return False

    def names_for(self, addr: bytes, now: float) -> tuple[str, ...]:
        """The names still-valid answers held `addr` for (sorted), () for none."""
        names = self._by_addr.get(addr)
        if not names:
            return ()
        return tuple(sorted(n for n in list(names) if self._valid((n, addr), now)))

    def learned(self, addr: bytes, name: str, now: float) -> bool:
        """Whether a still-valid answer for `name` held `addr`."""
        return self._valid((name, addr), now)

    def hold(self, addr: bytes, now: float) -> None:
        """A flow to `addr` opened at `now`: the answers for it still valid then stay
        valid while it is open (one that ran out before is not brought back)."""
        count = self._holds.get(addr, 0)
        if count == 0:
            for name in list(self._by_addr.get(addr, ())):
                self._valid((name, addr), now)  # drops what ran out
        self._holds[addr] = count + 1

    def release(self, addr: bytes, now: float) -> None:
        """A flow to `addr` ended: once none is left, the address's answers stay valid
        `grace_s` more (or until their TTL, if later)."""
        count = self._holds.get(addr, 0)
        if count <= 0:
            return  # a flow opened before the table knew of it
        if count > 1:
            self._holds[addr] = count - 1
            return
        del self._holds[addr]
        until = now + self.grace_s
        for name in self._by_addr.get(addr, ()):
            key = (name, addr)
            if self._entries[key] < until:
                self._entries[key] = until

    def held(self, addr: bytes) -> int:
        """Open flows to `addr`."""
        return self._holds.get(addr, 0)

    def entries(self, now: float) -> list[LearnedName]:
        """Every valid pair, oldest learned first (answers that ran out are dropped)."""
        out = []
        for key in list(self._entries):
            if self._valid(key, now):
                name, addr = key
                out.append(LearnedName(name, addr, max(0.0, self._entries[key] - now),
                                       self._holds.get(addr, 0)))
        return out

    def clear(self) -> None:
        """Forget every answer (open flows stay held)."""
        self._entries.clear()
        self._by_addr.clear()
