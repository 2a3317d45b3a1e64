"""Tests for relaynat.portspec: passt's examples from `man passt`, error messages, and
hypothesis round trips (parse -> format -> parse) and fuzzing of arbitrary text."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaynat.config import ConfigError
from relaynat.portspec import (
    EPHEMERAL_FIRST,
    Forward,
    format_portspec,
    iter_ports,
    parse_portspec,
)


def ranges(spec: str, proto: str = "tcp") -> list[tuple[int, int, int, int]]:
    return [(f.host_first, f.host_last, f.guest_first, f.guest_last)
            for f in parse_portspec(spec, proto)]


# --- passt's documented examples ------------------------------------------------------

def test_man_page_examples() -> None:
    assert ranges("22") == [(22, 22, 22, 22)]
    assert ranges("22:23") == [(22, 22, 23, 23)]
    assert ranges("22,25") == [(22, 22, 22, 22), (25, 25, 25, 25)]
    assert ranges("22-80") == [(22, 80, 22, 80)]
    assert ranges("22-80:32-90") == [(22, 80, 32, 90)]
    assert ranges("2000-5000,~3000-3010") == [(2000, 2999, 2000, 2999),
                                              (3011, 5000, 3011, 5000)]
    assert ranges("~20000-20010") == [(1, 19999, 1, 19999),
                                      (20011, EPHEMERAL_FIRST - 1, 20011, EPHEMERAL_FIRST - 1)]
    [fwd] = parse_portspec("192.0.2.1%eth0/22", "udp")
    assert fwd == Forward("udp", IPv4Address("192.0.2.1"), "eth0", 22, 22, 22)
    fwds = parse_portspec("192.0.2.1/20-30,~25")
    assert [(f.address, f.host_first, f.host_last) for f in fwds] == [
        (IPv4Address("192.0.2.1"), 20, 24), (IPv4Address("192.0.2.1"), 26, 30)]


def test_all_none_and_ipv6() -> None:
    assert parse_portspec("none") == []
    assert format_portspec([]) == "none"
    [fwd] = parse_portspec("all")
    assert (fwd.host_first, fwd.host_last, len(fwd)) == (1, 49151, 49151)
    [fwd] = parse_portspec("all", ephemeral_first=65536)
    assert len(fwd) == 65535
    [fwd] = parse_portspec("::1/8080:80")
    assert (fwd.address, fwd.guest_first) == (IPv6Address("::1"), 80)
    [fwd] = parse_portspec("fe80::1%eth0/22")
    assert (fwd.address, fwd.interface) == (IPv6Address("fe80::1"), "eth0")
    [fwd] = parse_portspec("%lo/22")
    assert (fwd.address, fwd.interface) == (None, "lo")
    assert format_portspec(parse_portspec("fe80::1%eth0/22")) == "fe80::1%eth0/22"
    assert format_portspec(parse_portspec("%lo/22")) == "%lo/22"


def test_exclusion_before_range_and_mapping_shift() -> None:
    assert ranges("~25,22-80:32-90") == [(22, 24, 32, 34), (26, 80, 36, 90)]


def test_pick_one_port() -> None:
    assert ranges("0:8080,0:8081") == [(0, 0, 8080, 8080), (0, 0, 8081, 8081)]
    assert format_portspec(parse_portspec("0:8080")) == "0:8080"


def test_lazy_expansion() -> None:
    fwds = parse_portspec("100-102:200-202,~101")
    assert list(iter_ports(fwds)) == [(100, 200), (102, 202)]
    [fwd] = parse_portspec("all")
    assert next(fwd.pairs()) == (1, 1)


@pytest.mark.parametrize(("spec", "message"), [
    ("70000", "port 70000 is above 65535"),
    ("22:99999", "port 99999 in '22:99999' is above 65535"),
    ("80-22", "range '80-22' is reversed (80 > 22)"),
    ("22-23:30-40", "'22-23:30-40' maps 2 host ports to 11 guest ports"),
    ("22-80,~100", "exclusion ~100 is outside the forwarded ports"),
    ("22-80,~70-90", "exclusion ~70-90 is outside the forwarded ports"),
    ("~60000", "exclusion ~60000 is outside the forwarded ports"),
    ("~1-5,~3", "exclusion '~3' overlaps another exclusion"),
    ("22,20-30", "port 22 is forwarded twice"),
    ("22,~22", "the exclusions leave no port to forward"),
    ("ssh", "'ssh' is not a port number"),
    ("22,", "empty item"),
    ("22-", "a port number is missing in '22-'"),
    ("+22", "'+22' is not a port number"),
    ("0", "host port 0 (let the kernel pick) needs a guest port"),
    ("0-5:10-15", "port 0 (let the kernel pick) cannot start a range"),
    ("22:0", "guest port 0 is not a port"),
    ("1.2.3/22", "'1.2.3' is not an IPv4 or IPv6 address"),
    ("[::1]/22", "'[::1]' is not an IPv4 or IPv6 address"),
    ("1.2.3.4%/22", "interface name '' must be"),
    ("1.2.3.4%averyveryverylongname/22", "interface name 'averyveryverylongname' must"),
    ("1.2.3.4%e:0/22", "interface name 'e:0' has a character"),
    ("/22", "'' is not an IPv4 or IPv6 address"),
    ("ALL", "'ALL' is not a port number"),
])
def test_errors_quote_spec(spec: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_portspec(spec)
    assert str(info.value) == f"port spec {spec!r}: {message}" or (
        str(info.value).startswith(f"port spec {spec!r}: {message}")), str(info.value)


def test_bad_protocol() -> None:
    with pytest.raises(ConfigError, match="tcp or udp"):
        parse_portspec("22", "sctp")


# --- hypothesis -----------------------------------------------------------------------

prefixes = st.one_of(
    st.just(""),
    st.sampled_from(["127.0.0.1/", "0.0.0.0/", "::/", "::1/", "2001:db8::5/", "%lo/",
                     "10.0.0.1%eth0/", "fe80::1%veth-a/", "::ffff:1.2.3.4/"]))


@st.composite
def specs(draw) -> str:
    """Well-formed specs: disjoint host ranges, optional guest shifts, exclusions inside."""
    cuts = sorted(draw(st.sets(st.integers(1, 65535), min_size=1, max_size=8)))
    items, spans = [], []
    for first, last in zip(cuts[::2], [*cuts[1::2], cuts[-1]], strict=False):
        if draw(st.booleans()):
            last = first
        spans.append((first, last))
        text = str(first) if first == last else f"{first}-{last}"
        if draw(st.booleans()):
            guest = draw(st.integers(1, 65535 - (last - first)))
            text += f":{guest}" if first == last else f":{guest}-{guest + last - first}"
        items.append(text)
    for first, last in spans:
        if last - first >= 2 and draw(st.booleans()):
            items.append(f"~{first + 1}" if draw(st.booleans()) else f"~{first + 1}-{last - 1}")
    if draw(st.booleans()):
        items.append(f"0:{draw(st.integers(1, 65535))}")
    return draw(prefixes) + ",".join(draw(st.permutations(items)))


@settings(max_examples=200, deadline=None)
@given(spec=specs(), proto=st.sampled_from(["tcp", "udp"]))
def test_round_trip(spec: str, proto: str) -> None:
    fwds = parse_portspec(spec, proto)
    text = format_portspec(fwds)
    assert parse_portspec(text, proto) == fwds
    assert format_portspec(parse_portspec(text, proto)) == text
    for fwd in fwds:
        assert fwd.proto == proto
        if fwd.host_first == 0:
            assert fwd.host_last == 0 and 1 <= fwd.guest_first <= 65535
        else:
            assert 1 <= fwd.host_first <= fwd.host_last <= 65535
            assert 1 <= fwd.guest_first <= fwd.guest_last <= 65535


spec_alphabet = st.sampled_from([*"0123456789-,:~/%.abef", "::", "65535", "65536", "all",
                                 "none", "lo", " ", "\x00", "\u0663"])


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=20),
                 st.lists(spec_alphabet, max_size=12).map("".join)))
def test_arbitrary_text_parses_or_raises_config_error(spec: str) -> None:
    try:
        fwds = parse_portspec(spec)
    except ConfigError:
        return
    host_ports = set()
    for fwd in fwds:
        if fwd.host_first == 0:
            assert 1 <= fwd.guest_first <= 65535
            continue
        assert 1 <= fwd.host_first <= fwd.host_last <= 65535
        assert 1 <= fwd.guest_first <= fwd.guest_last <= 65535
        span = range(fwd.host_first, fwd.host_last + 1)
        assert not host_ports.intersection(span) if len(span) < 5000 else True
        if len(span) < 5000:
            host_ports.update(span)
    assert parse_portspec(format_portspec(fwds)) == fwds
