"""Tests for relaynat.link.dhcpv6: client messages are built by scapy (the real peer's
encoding) and every reply is parsed back by scapy as an independent oracle; hypothesis
fuzzes arbitrary and mutated messages."""

from __future__ import annotations

from ipaddress import IPv6Address

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.dhcp6 import (
    DHCP6,
    DUID_LL,
    DUID_LLT,
    DHCP6_Advertise,
    DHCP6_Confirm,
    DHCP6_Decline,
    DHCP6_InfoRequest,
    DHCP6_Rebind,
    DHCP6_Release,
    DHCP6_Renew,
    DHCP6_Reply,
    DHCP6_Request,
    DHCP6_Solicit,
    DHCP6OptClientId,
    DHCP6OptDNSServers,
    DHCP6OptElapsedTime,
    DHCP6OptIA_NA,
    DHCP6OptIA_PD,
    DHCP6OptIA_TA,
    DHCP6OptIAAddress,
    DHCP6OptOptReq,
    DHCP6OptPref,
    DHCP6OptRapidCommit,
    DHCP6OptServerId,
    DHCP6OptStatusCode,
)
from scapy.layers.inet import UDP
from scapy.packet import NoPayload, Packet, Raw

from relaynat.config import RelayConfig
from relaynat.link.dhcpv6 import MAX_IAS, Dhcpv6Server

CFG = RelayConfig()
GW_MAC = "52:55:0a:00:02:02"
CLIENT_DUID = DUID_LLT(lladdr="52:54:00:12:34:56", timeval=700000000)
CLIENT_ID = DHCP6OptClientId(duid=CLIENT_DUID)
SERVER_ID = DHCP6OptServerId(duid=DUID_LL(lladdr=GW_MAC))
FOREIGN_SERVER_ID = DHCP6OptServerId(duid=DUID_LL(lladdr="52:55:0a:00:02:03"))
XID = 0xABCDEF
GUEST = str(CFG.guest_ipv6)


def parse(reply: bytes | None) -> tuple[Packet, list[Packet]]:
    """The reply parsed by scapy (dispatched on UDP port 546, as a client receives it):
    the message and its top-level options, with no byte left unparsed."""
    assert isinstance(reply, bytes)
    msg = UDP(bytes(UDP(sport=547, dport=546) / reply))[UDP].payload
    assert isinstance(msg, DHCP6_Advertise | DHCP6_Reply), msg.show(dump=True)
    options = []
    layer = msg.payload
    while not isinstance(layer, NoPayload):
        options.append(layer)
        layer = layer.payload
    for option in options:
        # The client's DUID is echoed opaquely (RFC 8415 §11), so scapy may see Raw in it.
        unparsed = isinstance(option, Raw) or (
            option.optcode != 1 and option_alone(option).haslayer(Raw))
        assert not unparsed, msg.show(dump=True)
    codes = [o.optcode for o in options]
    # The identifiers come first and exactly once; every reply names us (§16).
    assert codes.count(2) == 1 and codes.count(1) <= 1
    server_id = next(o for o in options if o.optcode == 2)
    assert own_bytes(server_id) == bytes(SERVER_ID)
    return msg, options


def option_alone(layer: Packet) -> Packet:
    """One option alone (scapy chains the following options as its payload)."""
    alone = layer.copy()
    alone.remove_payload()
    return alone


def own_bytes(layer: Packet) -> bytes:
    return bytes(option_alone(layer))


def by_code(options: list[Packet], code: int) -> list[Packet]:
    return [o for o in options if o.optcode == code]


def ia_status(ia: Packet) -> int | None:
    sub = ia.getfieldval({3: "ianaopts", 4: "iataopts", 25: "iapdopt"}[ia.optcode])
    codes = [o.statuscode for o in sub if isinstance(o, DHCP6OptStatusCode)]
    return codes[0] if codes else None


def check_binding(options: list[Packet], iaid: int = 1) -> None:
    [ia] = by_code(options, 3)
    assert (ia.iaid, ia.T1, ia.T2) == (iaid, 7200, 11520)  # 0.5 / 0.8 of preferred
    [addr] = ia.ianaopts
    assert isinstance(addr, DHCP6OptIAAddress)
    assert (addr.addr, addr.preflft, addr.validlft) == (GUEST, 14400, 86400)
    [dns] = by_code(options, 23)
    assert isinstance(dns, DHCP6OptDNSServers) and dns.dnsservers == ["fd00::3"]


@pytest.fixture
def server() -> Dhcpv6Server:
    return Dhcpv6Server(CFG)


def solicit(*extra: Packet, xid: int = XID) -> Packet:
    pkt = DHCP6_Solicit(trid=xid) / DHCP6OptElapsedTime() / CLIENT_ID / DHCP6OptIA_NA(iaid=1)
    for opt in extra:
        pkt = pkt / opt
    return pkt


def with_server(cls: type[Packet], *extra: Packet, sid: Packet = SERVER_ID) -> Packet:
    pkt = cls(trid=XID) / CLIENT_ID / sid / DHCP6OptIA_NA(
        iaid=1, ianaopts=[DHCP6OptIAAddress(addr=GUEST)])
    for opt in extra:
        pkt = pkt / opt
    return pkt


# --- the exchanges ------------------------------------------------------------------------

def test_solicit_gets_advertise(server: Dhcpv6Server) -> None:
    msg, options = parse(server.handle(bytes(solicit(DHCP6OptOptReq(reqopts=[23])))))
    assert isinstance(msg, DHCP6_Advertise) and msg.trid == XID
    assert own_bytes(by_code(options, 1)[0]) == bytes(CLIENT_ID)  # echoed byte for byte
    check_binding(options)
    assert by_code(options, 7)[0].prefval == 255
    assert not by_code(options, 14)
    assert server.counters == {"solicit": 1, "advertise": 1}


def test_dns_sent_without_oro(server: Dhcpv6Server) -> None:
    _, options = parse(server.handle(bytes(solicit())))
    assert by_code(options, 23)[0].dnsservers == ["fd00::3"]


def test_rapid_commit_gets_reply(server: Dhcpv6Server) -> None:
    msg, options = parse(server.handle(bytes(solicit(DHCP6OptRapidCommit()))))
    assert isinstance(msg, DHCP6_Reply) and msg.trid == XID
    check_binding(options)
    assert isinstance(by_code(options, 14)[0], DHCP6OptRapidCommit)
    assert not by_code(options, 7)
    assert server.counters == {"solicit": 1, "reply": 1}


@pytest.mark.parametrize("cls", [DHCP6_Request, DHCP6_Renew])
def test_request_and_renew_get_binding(server: Dhcpv6Server, cls: type[Packet]) -> None:
    msg, options = parse(server.handle(bytes(with_server(cls))))
    assert isinstance(msg, DHCP6_Reply) and msg.trid == XID
    check_binding(options)


def test_rebind_gets_binding(server: Dhcpv6Server) -> None:
    pkt = DHCP6_Rebind(trid=XID) / CLIENT_ID / DHCP6OptIA_NA(iaid=5)
    _, options = parse(server.handle(bytes(pkt)))
    check_binding(options, iaid=5)


def test_renew_of_foreign_address_returns_it_with_zero_lifetimes(server: Dhcpv6Server) -> None:
    pkt = DHCP6_Renew(trid=XID) / CLIENT_ID / SERVER_ID / DHCP6OptIA_NA(
        iaid=1, ianaopts=[DHCP6OptIAAddress(addr="2001:db8::9"), DHCP6OptIAAddress(addr=GUEST)])
    _, options = parse(server.handle(bytes(pkt)))
    [ia] = by_code(options, 3)
    lifetimes = {a.addr: (a.preflft, a.validlft) for a in ia.ianaopts}
    assert lifetimes == {GUEST: (14400, 86400), "2001:db8::9": (0, 0)}


def test_ia_ta_and_ia_pd_refused_inside_the_ia(server: Dhcpv6Server) -> None:
    pkt = solicit(DHCP6OptIA_TA(iaid=3), DHCP6OptIA_PD(iaid=4), DHCP6OptIA_NA(iaid=2))
    _, options = parse(server.handle(bytes(pkt)))
    [ta], [pd] = by_code(options, 4), by_code(options, 25)
    assert (ta.iaid, ia_status(ta)) == (3, 2)  # NoAddrsAvail
    assert (pd.iaid, ia_status(pd)) == (4, 6)  # NoPrefixAvail
    first, second = by_code(options, 3)
    assert first.iaid == 1 and ia_status(first) is None
    assert second.iaid == 2 and ia_status(second) == 2  # one address only


def test_solicit_without_ia_na_says_no_addrs(server: Dhcpv6Server) -> None:
    pkt = DHCP6_Solicit(trid=XID) / CLIENT_ID / DHCP6OptIA_PD(iaid=4)
    _, options = parse(server.handle(bytes(pkt)))
    assert [o.statuscode for o in by_code(options, 13)] == [2]


def test_ia_count_bounded(server: Dhcpv6Server) -> None:
    pkt = solicit(*[DHCP6OptIA_NA(iaid=i) for i in range(2, 50)])
    _, options = parse(server.handle(bytes(pkt)))
    assert len(by_code(options, 3)) == MAX_IAS


def test_information_request_is_stateless(server: Dhcpv6Server) -> None:
    pkt = DHCP6_InfoRequest(trid=XID) / CLIENT_ID / DHCP6OptOptReq(reqopts=[23, 24])
    msg, options = parse(server.handle(bytes(pkt)))
    assert isinstance(msg, DHCP6_Reply)
    assert sorted(o.optcode for o in options) == [1, 2, 23]
    # Without a client identifier too (§16.12 allows it), and naming us.
    msg, options = parse(server.handle(bytes(DHCP6_InfoRequest(trid=1) / SERVER_ID)))
    assert sorted(o.optcode for o in options) == [2, 23]


@pytest.mark.parametrize(("addr", "code"), [(GUEST, 0), ("fd00::1234:5678", 0),
                                            ("fd01::15", 4), ("2001:db8::1", 4)])
def test_confirm(server: Dhcpv6Server, addr: str, code: int) -> None:
    pkt = DHCP6_Confirm(trid=XID) / CLIENT_ID / DHCP6OptIA_NA(
        iaid=1, ianaopts=[DHCP6OptIAAddress(addr=GUEST), DHCP6OptIAAddress(addr=addr)])
    msg, options = parse(server.handle(bytes(pkt)))
    assert isinstance(msg, DHCP6_Reply) and msg.trid == XID
    assert [o.statuscode for o in by_code(options, 13)] == [code]
    assert not by_code(options, 3)


def test_confirm_without_addresses_not_answered(server: Dhcpv6Server) -> None:
    pkt = DHCP6_Confirm(trid=XID) / CLIENT_ID / DHCP6OptIA_NA(iaid=1)
    assert server.handle(bytes(pkt)) is None
    assert server.counters["confirm_without_addresses"] == 1


@pytest.mark.parametrize("cls", [DHCP6_Release, DHCP6_Decline])
def test_release_and_decline_get_success(server: Dhcpv6Server, cls: type[Packet]) -> None:
    msg, options = parse(server.handle(bytes(with_server(cls))))
    assert isinstance(msg, DHCP6_Reply) and msg.trid == XID
    assert [o.statuscode for o in by_code(options, 13)] == [0]
    assert not by_code(options, 3)


# --- RFC 8415 §16 validation --------------------------------------------------------------

IGNORED = {
    "request-foreign-server": (with_server(DHCP6_Request, sid=FOREIGN_SERVER_ID),
                               "foreign_server_id"),
    "renew-foreign-server": (with_server(DHCP6_Renew, sid=FOREIGN_SERVER_ID), "foreign_server_id"),
    "release-foreign-server": (with_server(DHCP6_Release, sid=FOREIGN_SERVER_ID),
                               "foreign_server_id"),
    "decline-foreign-server": (with_server(DHCP6_Decline, sid=FOREIGN_SERVER_ID),
                               "foreign_server_id"),
    "inforeq-foreign-server": (DHCP6_InfoRequest() / FOREIGN_SERVER_ID, "foreign_server_id"),
    "request-no-server": (DHCP6_Request() / CLIENT_ID / DHCP6OptIA_NA(), "no_server_id"),
    "solicit-with-server": (solicit(SERVER_ID), "unexpected_server_id"),
    "rebind-with-server": (with_server(DHCP6_Rebind), "unexpected_server_id"),
    "confirm-with-server": (with_server(DHCP6_Confirm), "unexpected_server_id"),
    "solicit-no-client": (DHCP6_Solicit() / DHCP6OptIA_NA(), "no_client_id"),
    "renew-no-client": (DHCP6_Renew() / SERVER_ID / DHCP6OptIA_NA(), "no_client_id"),
    "inforeq-with-ia": (DHCP6_InfoRequest() / CLIENT_ID / DHCP6OptIA_NA(),
                        "information_request_with_ia"),
    "advertise": (DHCP6_Advertise() / CLIENT_ID / SERVER_ID, "not_from_client"),
    "reply": (DHCP6_Reply() / CLIENT_ID / SERVER_ID, "not_from_client"),
    "type-0": (Raw(b"\x00\x01\x02\x03"), "unknown_type"),
    "type-200": (Raw(b"\xc8\x01\x02\x03"), "unknown_type"),
}


@pytest.mark.parametrize(("pkt", "counter"), IGNORED.values(), ids=IGNORED.keys())
def test_ignored_messages(pkt: Packet, counter: str) -> None:
    server = Dhcpv6Server(CFG)
    assert server.handle(bytes(pkt)) is None
    assert server.counters[counter] == 1
    assert server.counters["reply"] == server.counters["advertise"] == 0


def opt(code: int, value: bytes) -> bytes:
    return code.to_bytes(2, "big") + len(value).to_bytes(2, "big") + value


SOLICIT_HEAD = bytes(solicit())[:4]
CLIENT = bytes(CLIENT_ID)

MALFORMED = {
    "empty": b"",
    "three-bytes": b"\x01\x00\x00",
    "option-header-cut": SOLICIT_HEAD + CLIENT + b"\x00\x03\x00",
    "option-past-end": SOLICIT_HEAD + CLIENT + opt(3, bytes(12))[:-1],
    "length-lies": SOLICIT_HEAD + CLIENT + b"\x00\x03\x00\x20" + bytes(12),
    "client-id-empty": SOLICIT_HEAD + opt(1, b"") + opt(3, bytes(12)),
    "client-id-huge": SOLICIT_HEAD + opt(1, bytes(200)) + opt(3, bytes(12)),
    "ia-na-short": SOLICIT_HEAD + CLIENT + opt(3, bytes(11)),
    "ia-ta-short": SOLICIT_HEAD + CLIENT + opt(4, bytes(3)),
    "ia-pd-short": SOLICIT_HEAD + CLIENT + opt(25, bytes(8)),
    "iaaddr-short": SOLICIT_HEAD + CLIENT + opt(3, bytes(12) + opt(5, bytes(20))),
    "ia-sub-option-past-ia": SOLICIT_HEAD + CLIENT + opt(3, bytes(12) + b"\x00\x05\x00\x18"),
}


@pytest.mark.parametrize("payload", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_messages_dropped(payload: bytes) -> None:
    server = Dhcpv6Server(CFG)
    assert server.handle(payload) is None
    assert server.counters["malformed"] == 1 and server.counters["error"] == 0


def test_memoryview_accepted_and_released_rejected(server: Dhcpv6Server) -> None:
    parse(server.handle(memoryview(bytearray(bytes(solicit())))))
    released = memoryview(b"x")
    released.release()
    assert server.handle(released) is None
    assert server.counters["malformed"] == 1


def test_other_config() -> None:
    cfg = RelayConfig(prefix_preferred_lifetime_s=1000, prefix_valid_lifetime_s=5000,
                      guest_ipv6=IPv6Address("fd00::abc"), dns_ipv6=IPv6Address("fd00::53"),
                      gateway_mac=bytes.fromhex("020000000001")).validate()
    reply = Dhcpv6Server(cfg).handle(bytes(solicit(DHCP6OptRapidCommit())))
    msg = UDP(bytes(UDP(sport=547, dport=546) / reply))
    ia = msg[DHCP6OptIA_NA]
    assert (ia.T1, ia.T2) == (500, 800)
    assert (ia.ianaopts[0].addr, ia.ianaopts[0].preflft, ia.ianaopts[0].validlft) == (
        "fd00::abc", 1000, 5000)
    assert msg[DHCP6OptDNSServers].dnsservers == ["fd00::53"]
    assert msg[DHCP6OptServerId].duid.lladdr == "02:00:00:00:00:01"


# --- properties ---------------------------------------------------------------------------

VALID = [bytes(p) for p in (
    solicit(DHCP6OptOptReq(reqopts=[23, 24])), solicit(DHCP6OptRapidCommit()),
    with_server(DHCP6_Request), with_server(DHCP6_Renew), with_server(DHCP6_Release),
    DHCP6_Rebind(trid=2) / CLIENT_ID / DHCP6OptIA_NA(iaid=9, ianaopts=[
        DHCP6OptIAAddress(addr=GUEST)]) / DHCP6OptIA_PD(iaid=1),
    DHCP6_Confirm(trid=3) / CLIENT_ID / DHCP6OptIA_NA(iaid=1, ianaopts=[
        DHCP6OptIAAddress(addr=GUEST)]),
    DHCP6_InfoRequest(trid=4) / CLIENT_ID / DHCP6OptOptReq(reqopts=[23]),
)]


def check_any(server: Dhcpv6Server, request: bytes, reply: bytes | None) -> None:
    assert server.counters["error"] == 0
    assert sum(server.counters.values()) >= 1  # every message is accounted for
    if reply is None:
        return
    _, options = parse(reply)
    assert reply[1:4] == request[1:4]  # transaction id echoed
    for ia in by_code(options, 3):
        for addr in ia.ianaopts:
            if isinstance(addr, DHCP6OptIAAddress) and addr.addr == GUEST:
                assert (addr.preflft, addr.validlft) == (14400, 86400)
    assert isinstance(DHCP6(reply), Packet)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    msg = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 5))):
        op = draw(st.sampled_from(["flip", "truncate", "append", "insert", "length"]))
        if op == "truncate":
            del msg[draw(st.integers(0, len(msg))):]
        elif op == "append":
            msg += draw(st.binary(max_size=40))
        elif op == "insert":  # a whole option, possibly nested, possibly lying
            code = draw(st.sampled_from([1, 2, 3, 4, 5, 6, 13, 14, 23, 25, 999]))
            value = draw(st.binary(max_size=40))
            length = draw(st.one_of(st.just(len(value)), st.integers(0, 0xFFFF)))
            i = draw(st.integers(0, len(msg)))
            msg[i:i] = code.to_bytes(2, "big") + length.to_bytes(2, "big") + value
        elif not msg:
            continue
        elif op == "flip":
            msg[draw(st.integers(0, len(msg) - 1))] = draw(st.integers(0, 255))
        else:  # rewrite the low byte of some length field candidate
            if len(msg) > 8:
                msg[draw(st.integers(4, len(msg) - 1))] = draw(st.sampled_from(
                    [0, 1, 2, 3, 4, 11, 12, 23, 24, 0xFF]))
    return bytes(msg)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_messages_never_raise(data: bytes) -> None:
    server = Dhcpv6Server(CFG)
    check_any(server, data, server.handle(data))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 255), st.binary(max_size=200))
def test_arbitrary_bytes_never_raise(kind: int, data: bytes) -> None:
    server = Dhcpv6Server(CFG)
    check_any(server, data, server.handle(data))
    payload = bytes((kind,)) + b"\x01\x02\x03" + CLIENT + data
    check_any(server, payload, server.handle(payload))


@settings(max_examples=100)
@given(xid=st.integers(0, 2**24 - 1), iaid=st.integers(0, 2**32 - 1),
       mac=st.binary(min_size=6, max_size=6), rapid=st.booleans())
def test_round_trip(xid: int, iaid: int, mac: bytes, rapid: bool) -> None:
    server = Dhcpv6Server(CFG)
    client_id = DHCP6OptClientId(duid=DUID_LL(lladdr=":".join(f"{b:02x}" for b in mac)))
    pkt = DHCP6_Solicit(trid=xid) / client_id / DHCP6OptIA_NA(iaid=iaid)
    if rapid:
        pkt = pkt / DHCP6OptRapidCommit()
    msg, options = parse(server.handle(bytes(pkt)))
    assert msg.trid == xid and isinstance(msg, DHCP6_Reply if rapid else DHCP6_Advertise)
    assert own_bytes(by_code(options, 1)[0]) == bytes(client_id)
    check_binding(options, iaid=iaid)
    if not rapid:  # and the Request that follows the Advertise gets the same binding
        server_id = DHCP6OptServerId(own_bytes(by_code(options, 2)[0]))
        request = DHCP6_Request(trid=xid ^ 1) / client_id / server_id / DHCP6OptIA_NA(iaid=iaid)
        reply, options = parse(server.handle(bytes(request)))
        assert isinstance(reply, DHCP6_Reply)
        check_binding(options, iaid=iaid)


def test_pref_option_class_is_scapys() -> None:
    # Guard that the oracle really parses option 7 as a preference, not Raw.
    reply = Dhcpv6Server(CFG).handle(bytes(solicit()))
    assert isinstance(parse(reply)[0][DHCP6OptPref], DHCP6OptPref)
