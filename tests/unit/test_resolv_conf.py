"""Following the host's resolv.conf, the pure part (link/dns.py): when the relay looks
again, which versions it reads, which upstream a version leaves, and what it reports;
the versions of real files (rewritten, replaced, a link pointed elsewhere, gone); the
`resolv_conf` field and `--resolv-conf`. A relay following a real file between two real
resolvers: tests/integration/test_dns_upstream_change.py.
"""

from __future__ import annotations

import os
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relaynat.config import ConfigError, RelayConfig
from relaynat.link.dns import (
    RESOLV_CONF_CHECK_S,
    RESOLV_CONF_SETTLE_NS,
    FileVersion,
    ResolvConfWatch,
    resolv_conf_version,
    upstream_from_resolv_conf,
)

SETTLED = 10 * RESOLV_CONF_SETTLE_NS  # a wall clock long after every mtime below


def version(n: int, mtime_ns: int = 0) -> FileVersion:
    """The n-th version of a file (distinct for distinct n)."""
    return FileVersion(None, (1, n, 100, mtime_ns, mtime_ns))


# -- when to look -------------------------------------------------------------------------

@given(st.lists(st.floats(min_value=0, max_value=10, allow_nan=False), max_size=40))
def test_looks_at_most_once_per_interval_and_whenever_one_has_passed(
        gaps: list[float]) -> None:
    watch = ResolvConfWatch()
    now, last = 1000.0, None
    for gap in gaps:
        now += gap
        due = watch.due(now)
        if last is None or now - last >= RESOLV_CONF_CHECK_S:
            assert due
        else:
            assert not due
        if due:
            last = now


# -- what a version means ------------------------------------------------------------------

_server = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str)
_line = st.one_of(
    _server.map(lambda a: ("ns", a)),
    st.sampled_from(["nameserver", "nameserver not-an-address", "nameserver 10.0.0.300",
                     "# nameserver 192.0.2.9", "search example.com", "options edns0 trust-ad",
                     "domain lan", "", "   "]).map(lambda t: ("other", t)),
)


@given(st.lists(_line, max_size=8), st.sampled_from([" ", "\t", "  "]))
def test_the_upstream_is_the_first_valid_nameserver(lines: list[tuple[str, str]],
                                                    sep: str) -> None:
    text = "\n".join(f"nameserver{sep}{v}" if kind == "ns" else v for kind, v in lines)
    first = next((ip_address(v) for kind, v in lines if kind == "ns"), None)
    assert upstream_from_resolv_conf(text) == first


#: A sequence of versions of the file: each its text's nameserver (None: the version
#: names none, or could not be read) and how often the relay reads it (a version still
#: settling is read again).
_history = st.lists(st.tuples(st.one_of(st.none(), st.sampled_from(
    ["127.0.0.53", "127.0.0.54", "10.8.0.1", "fd00:53::1"])), st.integers(1, 3),
    st.booleans()), max_size=12)


@given(_history)
def test_a_history_of_versions(history: list[tuple[str | None, int, bool]]) -> None:
    """The upstream is the nameserver of the last version that named one; a change of
    it is reported once, and so is each version naming none, however often read."""
    watch = ResolvConfWatch()
    upstream: IPv4Address | IPv6Address | None = None
    for n, (server, reads, unreadable) in enumerate(history):
        v = version(n)
        text = None if server is None and unreadable else (
            f"search lan\nnameserver {server}\n" if server else "search lan\n")
        assert watch.changed(v)
        outcomes = []
        for _ in range(reads):
            outcomes.append(watch.read(v, text, SETTLED))
        assert not watch.changed(v)  # settled: not read again
        assert outcomes[1:] == [None] * (reads - 1)
        if server is None:
            assert outcomes[0] == "unusable"
        elif ip_address(server) != upstream:
            assert outcomes[0] == "changed"
            upstream = ip_address(server)
        else:
            assert outcomes[0] is None
        assert watch.upstream == upstream


def test_a_version_read_while_it_may_still_change_is_read_again_until_settled() -> None:
    watch = ResolvConfWatch()
    v = version(1, mtime_ns=5 * RESOLV_CONF_SETTLE_NS)
    just_written = v.mtime_ns or 0
    assert watch.read(v, "nameserver 127.0.0.53\n", just_written + 1000) == "changed"
    # The same stat, but written again within the timestamp's tick: only reading tells.
    assert watch.changed(v)
    assert watch.read(v, "nameserver 127.0.0.54\n", just_written + 2000) == "changed"
    assert watch.upstream == IPv4Address("127.0.0.54")
    assert watch.read(v, "nameserver 127.0.0.54\n", just_written + RESOLV_CONF_SETTLE_NS) is None
    assert not watch.changed(v)


def test_a_version_naming_none_keeps_the_last_upstream_and_is_reported_once() -> None:
    watch = ResolvConfWatch()
    assert watch.read(version(1), "nameserver 127.0.0.53\n", SETTLED) == "changed"
    gone = FileVersion(None, None)
    for _ in range(3):  # a missing file has no timestamp to trust: read at every look
        assert watch.changed(gone)
        outcome = watch.read(gone, None, SETTLED)
        assert watch.upstream == IPv4Address("127.0.0.53")
    assert outcome is None
    assert watch.read(version(2), "# empty\n", SETTLED) == "unusable"  # another version
    assert watch.read(version(3), "nameserver 127.0.0.53\n", SETTLED) is None  # same again
    assert watch.read(version(4), "nameserver ::1\n", SETTLED) == "changed"
    assert watch.upstream == IPv6Address("::1")


# -- versions of real files ----------------------------------------------------------------

def test_file_versions(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    assert resolv_conf_version(str(path)) == FileVersion(None, None)
    path.write_text("nameserver 127.0.0.53\n")
    first = resolv_conf_version(str(path))
    assert first.link is None and first.identity is not None
    assert resolv_conf_version(str(path)) == first  # nothing changed, nothing differs
    # Rewritten in place with the same size: the same inode, another modification time.
    path.write_text("nameserver 127.0.0.54\n")
    os.utime(path, ns=(first.identity[3] + 10**9, first.identity[3] + 10**9))
    rewritten = resolv_conf_version(str(path))
    assert rewritten.identity is not None
    assert rewritten.identity[:3] == first.identity[:3] and rewritten != first
    # A link, then the link pointed at another file (replaced by rename, as tools do).
    other = tmp_path / "other.conf"
    other.write_text("nameserver 10.8.0.1\n")
    link = tmp_path / "link.conf"
    link.symlink_to(path)
    via_link = resolv_conf_version(str(link))
    assert via_link == FileVersion(str(path), rewritten.identity)
    (tmp_path / "next").symlink_to(other)
    os.replace(tmp_path / "next", link)
    moved = resolv_conf_version(str(link))
    assert moved.link == str(other) and moved.identity != rewritten.identity
    other.unlink()
    assert resolv_conf_version(str(link)) == FileVersion(str(other), None)  # dangling


# -- the option ----------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["", "etc/resolv.conf", "/etc/resolv\0.conf", Path("/x")])
def test_resolv_conf_must_be_an_absolute_path(bad: object) -> None:
    with pytest.raises(ConfigError, match="resolv_conf"):
        RelayConfig(resolv_conf=bad).validate()  # type: ignore[arg-type]


def test_the_option_gives_an_absolute_path(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from relaynat.cli.options import build_parser, config_from_args

    monkeypatch.chdir(tmp_path)

    def config(*options: str) -> RelayConfig:
        return config_from_args(build_parser().parse_args(["run", *options, "--", "x"]))

    assert config().resolv_conf == "/etc/resolv.conf"
    assert config("--resolv-conf", "my.conf").resolv_conf == str(tmp_path / "my.conf")
    with pytest.raises(ConfigError, match="--resolv-conf"):
        config("--resolv-conf", "")
