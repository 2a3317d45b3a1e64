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

The upstream is the first nameserver of the host's resolv.conf, unless the
configuration names one (`dns_upstream`). The file changes under a running relay (a VPN
up or down, a DHCP renewal, NetworkManager, a symbolic link pointed at another file),
so the relay looks at it again, at most once a second (RESOLV_CONF_CHECK_S, libslirp's
interval too), when the guest asks its DNS address: a stat of the path and of the file
it leads to (`resolv_conf_version`) says whether anything changed, and only then is it
read and parsed again. `ResolvConfWatch` decides, without I/O, when to look and what a
new version means; the relay does the looking and reading. A new upstream serves new
DNS flows; open ones keep their host socket to the old resolver, so answers in flight
still arrive. A version that names no nameserver (or a file gone) keeps the last
upstream: libslirp too keeps its cached address when a changed file has none, and a
resolver that is briefly missing while a network manager rewrites the file is likelier
than a host that really lost DNS, whose guest would get no answer either way.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Literal

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


#: At most this often (seconds) the relay looks at the host's resolv.conf again.
RESOLV_CONF_CHECK_S = 1.0
#: A version modified this recently (nanoseconds) before it was read may still be
#: changing within one timestamp tick (the kernel's coarse clock; 2 s on FAT), unseen
#: by its stat: it is read again at the next look ("racy git" in git's index).
RESOLV_CONF_SETTLE_NS = 2_000_000_000

Upstream = IPv4Address | IPv6Address


@dataclass(frozen=True, slots=True)
class FileVersion:
    """What tells one version of a file from another without reading it."""

    #: The path's symbolic link target (os.readlink), None when it is no link.
    link: str | None
    #: st_dev, st_ino, st_size, st_mtime_ns and st_ctime_ns of the file the path leads
    #: to (links followed), None when there is none.
    identity: tuple[int, int, int, int, int] | None

    @property
    def mtime_ns(self) -> int | None:
        return self.identity[3] if self.identity is not None else None


def resolv_conf_version(path: str, dir_fd: int | None = None) -> FileVersion:
    """The version of the file at `path` now: two stat calls and, for a link, a readlink.
    With `dir_fd`, `path` is relative to that directory (a confined relay has no root
    to start from)."""
    try:
        link = os.readlink(path, dir_fd=dir_fd) if stat.S_ISLNK(
            os.lstat(path, dir_fd=dir_fd).st_mode) else None
    except OSError:
        link = None
    try:
        st = os.stat(path, dir_fd=dir_fd)
    except OSError:
        return FileVersion(link, None)
    return FileVersion(link, _identity(st))


def _identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """`FileVersion.identity` of a file's stat."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _mount_id(fd: int) -> int | None:
    """The id of the mount the descriptor `fd` is on (proc(5), /proc/PID/fdinfo)."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == "mnt_id":
                    return int(value)
    except (OSError, ValueError):
        pass
    return None


def _is_mount_point(path: str) -> bool:
    """Whether the file at `path` is mounted on its directory (a bind-mounted file)."""
    fds = []
    try:
        for where in (path, os.path.dirname(path)):
            fds.append(os.open(where, os.O_PATH | os.O_CLOEXEC))
        ids = [_mount_id(fd) for fd in fds]
    except OSError:
        return False
    finally:
        for fd in fds:
            os.close(fd)
    return None not in ids and ids[0] != ids[1]


class HeldResolvConf:
    """resolv.conf as a process holds it once it has left the filesystem
    (relaynat.confine): descriptors of the directory of the path itself and of that of
    the file its symbolic link leads to now, or of the file itself when it is a mount.

    A network manager that switches resolvers replaces the file, or the link, by
    rename(2); the link is read again each time, so a switch between files of these
    directories is followed. One to a file of a directory not held (NetworkManager's
    /run/NetworkManager to systemd-resolved's /run/systemd/resolve, say) cannot be: no
    path leads there any more, and `reachable` says so.

    A file mounted on the path (`ip netns exec` binds /etc/netns/NAME/resolv.conf there,
    container runtimes their own) is not seen through the directory's descriptor once
    the process is in a mount namespace of its own: a lookup does not cross into another
    namespace's mounts, and would read the file beneath it, another resolver's. Such a
    file is held open instead; it cannot be renamed over while it is mounted, so it is
    written in place, and a re-read sees that."""

    #: Links followed at most (the kernel gives up after 40, MAXSYMLINKS).
    MAX_LINKS = 8

    def __init__(self, path: str) -> None:
        full = os.path.abspath(path)
        self.link_dir = os.path.realpath(os.path.dirname(full))
        self.name = os.path.basename(full)
        self.dirs: dict[str, int] = {}
        real = os.path.realpath(full)
        self.pinned = (os.open(real, os.O_RDONLY | os.O_CLOEXEC)
                       if _is_mount_point(real) else None)
        for directory in (self.link_dir, os.path.dirname(real)):
            if directory not in self.dirs:
                self.dirs[directory] = os.open(
                    directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def descriptors(self) -> list[int]:
        """The directories' descriptors (for a Landlock rule that lets them be read)."""
        return list(self.dirs.values())

    def where(self) -> tuple[str, int] | None:
        """The name and directory descriptor to read resolv.conf at now, its links
        followed; None when they lead to a directory not held."""
        directory, name = self.link_dir, self.name
        for _ in range(self.MAX_LINKS):
            fd = self.dirs.get(directory)
            if fd is None:
                return None
            try:
                target = os.readlink(name, dir_fd=fd)
            except OSError:
                return name, fd  # no link (EINVAL), or no file: reading says which
            directory, name = os.path.split(os.path.normpath(os.path.join(directory, target)))
        return None

    def reachable(self) -> bool:
        """Whether the file can be read now."""
        return self.pinned is not None or self.where() is not None

    def version(self) -> FileVersion:
        """As `resolv_conf_version`, of the file held or reached now."""
        if self.pinned is not None:
            try:
                return FileVersion(None, _identity(os.fstat(self.pinned)))
            except OSError:
                return FileVersion(None, None)
        at = self.where()
        return resolv_conf_version(*at) if at is not None else FileVersion(None, None)

    def read(self) -> str | None:
        """As `read_resolv_conf`, of the file held or reached now."""
        if self.pinned is not None:
            try:
                return os.pread(self.pinned, 1 << 20, 0).decode("utf-8", "replace")
            except OSError:
                return None
        at = self.where()
        return read_resolv_conf(*at) if at is not None else None

    def close(self) -> None:
        for fd in self.dirs.values():
            os.close(fd)
        self.dirs.clear()
        if self.pinned is not None:
            os.close(self.pinned)
            self.pinned = None


def read_resolv_conf(path: str, dir_fd: int | None = None) -> str | None:
    """The text of the resolv.conf at `path` (relative to `dir_fd`, if given), or None
    when it cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="replace",
                  opener=lambda name, flags: os.open(name, flags, dir_fd=dir_fd)) as f:
            return f.read(1 << 20)  # a resolv.conf is a few lines; bound what a bad one costs
    except OSError:
        return None


def host_upstream(path: str = "/etc/resolv.conf") -> Upstream | None:
    text = read_resolv_conf(path)
    return upstream_from_resolv_conf(text) if text is not None else None


#: What a look at a changed resolv.conf found: another upstream ("changed"), a version
#: naming none, the last upstream kept ("unusable"), or nothing that matters (None).
Outcome = Literal["changed", "unusable"] | None


class ResolvConfWatch:
    """The upstream that the host's resolv.conf names, followed as the file changes,
    without I/O: the caller stats and reads the file when asked (see the module
    docstring for the protocol).

    `due(now)` says whether to look (at most every RESOLV_CONF_CHECK_S of `now`, any
    monotonic clock); `changed(version)` whether the version looked at is one not read
    yet; `read(version, text, wall_ns)` takes the text of that version (None: it could
    not be read) and returns the outcome. `upstream` is the one to use (None until a
    version names one). Each version is reported once, however often it is read again.
    """

    __slots__ = ("_next_look", "_reported", "_version", "upstream")

    def __init__(self) -> None:
        self.upstream: Upstream | None = None
        self._next_look: float | None = None
        #: The version whose text was read and can be trusted to stay as read.
        self._version: FileVersion | None = None
        #: The version last reported on (read again while it settles, it is not twice).
        self._reported: FileVersion | None = None

    def due(self, now: float) -> bool:
        """Whether to look at the file now; if so, the next look is due a check interval later."""
        if self._next_look is not None and now < self._next_look:
            return False
        self._next_look = now + RESOLV_CONF_CHECK_S
        return True

    def changed(self, version: FileVersion) -> bool:
        """Whether `version` must be read: it is not the version read last (or that one
        was still settling when it was read)."""
        return version != self._version

    def read(self, version: FileVersion, text: str | None, wall_ns: int) -> Outcome:
        """The text of `version`, read after it was looked at (at wall clock `wall_ns`,
        time.time_ns()): what it means for the upstream."""
        mtime = version.mtime_ns
        settled = mtime is not None and wall_ns - mtime >= RESOLV_CONF_SETTLE_NS
        self._version = version if settled else None
        found = upstream_from_resolv_conf(text) if text is not None else None
        if found is None:
            if version == self._reported:
                return None
            self._reported = version
            return "unusable"
        self._reported = version
        if found == self.upstream:
            return None
        self.upstream = found
        return "changed"
