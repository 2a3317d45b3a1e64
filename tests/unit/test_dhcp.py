"""Tests for relaynat.link.dhcp: replies checked field by field with dpkt as the oracle,
and hypothesis fuzzing of arbitrary and mutated messages."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import dpkt
import pytest
from dpkt import dhcp as D
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relaynat.config import RelayConfig
from relaynat.link.dhcp import DhcpReply, DhcpServer

CFG = RelayConfig()
MAC = bytes.fromhex("525400123456")
GUEST = IPv4Address("10.0.2.15")
GATEWAY = IPv4Address("10.0.2.2")
XID = 0x1234ABCD


def ip(addr: str | IPv4Address) -> bytes:
    return IPv4Address(addr).packed


def ip_int(addr: str | IPv4Address) -> int:
    return int(IPv4Address(addr))


def client_msg(
    kind: int,
    *,
    xid: int = XID,
    chaddr: bytes = MAC,
    flags: int = 0,
    ciaddr: str = "0.0.0.0",
    giaddr: str = "0.0.0.0",
    opts: list[tuple[int, bytes]] | None = None,
) -> bytes:
    """A client message built by dpkt; `kind` goes first as option 53."""
    msg = D.DHCP(
        op=D.DHCP_OP_REQUEST, xid=xid, flags=flags, secs=3, ciaddr=ip_int(ciaddr),
        giaddr=ip_int(giaddr), chaddr=chaddr.ljust(16, b"\0"),
        opts=[(D.DHCP_OPT_MSGTYPE, bytes((kind,))), (D.DHCP_OPT_PARAM_REQ, b"\x01\x03\x06\x0f")]
        + (opts or []),
    )
    return bytes(msg)


def parse_reply(reply: DhcpReply | None) -> tuple[D.DHCP, dict[int, bytes]]:
    """Parse with dpkt and check what dpkt is lax about: option bounds, END, padding."""
    assert isinstance(reply, DhcpReply)
    payload = reply.payload
    assert isinstance(payload, bytes)
    assert len(payload) >= 300
    msg = D.DHCP(payload)
    assert (msg.op, msg.hrd, msg.hln, msg.hops, msg.secs) == (2, 1, 6, 0, 0)
    assert msg.magic == D.DHCP_MAGIC
    assert msg.sname == bytes(64) and msg.file == bytes(128) and msg.siaddr == 0
    i = 240
    while payload[i] != 255:
        assert payload[i] != 0, "no PAD expected before END"
        assert i + 2 + payload[i + 1] <= len(payload)
        i += 2 + payload[i + 1]
    assert payload[i + 1:] == bytes(len(payload) - i - 1), "only PAD after END"
    opts = dict(msg.opts)
    assert len(opts) == len(msg.opts), "no option repeated"
    assert opts[D.DHCP_OPT_MSGTYPE] in (bytes((D.DHCPOFFER,)), bytes((D.DHCPACK,)),
                                        bytes((D.DHCPNAK,)))
    return msg, opts


def config_opts(mask: str = "255.255.255.0", bcast: str = "10.0.2.255", router: str = "10.0.2.2",
                dns: str = "10.0.2.3", mtu: int = 65520) -> dict[int, bytes]:
    return {
        D.DHCP_OPT_SERVER_ID: ip(router),
        D.DHCP_OPT_NETMASK: ip(mask),
        D.DHCP_OPT_BROADCASTADDR: ip(bcast),
        D.DHCP_OPT_ROUTER: ip(router),
        D.DHCP_OPT_DNS_SVRS: ip(dns),
        D.DHCP_OPT_MTUSIZE: struct.pack("!H", mtu),
    }


def lease_opts(lease: int = 3600, t1: int = 1800, t2: int = 3150) -> dict[int, bytes]:
    return {
        D.DHCP_OPT_LEASE_SEC: struct.pack("!I", lease),
        D.DHCP_OPT_RENEWTIME: struct.pack("!I", t1),
        D.DHCP_OPT_REBINDTIME: struct.pack("!I", t2),
    }


@pytest.fixture
def server() -> DhcpServer:
    return DhcpServer(CFG)


def test_discover_gets_offer_with_every_field(server: DhcpServer) -> None:
    reply = server.handle(client_msg(D.DHCPDISCOVER, opts=[(50, ip("10.0.2.99"))]))
    msg, opts = parse_reply(reply)
    assert reply is not None and reply.broadcast is False  # unicast to yiaddr at chaddr
    assert msg.xid == XID and msg.flags == 0 and msg.chaddr == MAC
    assert msg.ciaddr == 0 and msg.giaddr == 0
    assert msg.yiaddr == ip_int(GUEST)  # the one address, whatever was asked for
    assert opts == {D.DHCP_OPT_MSGTYPE: bytes((D.DHCPOFFER,))} | config_opts() | lease_opts()
    assert server.counters["discover"] == 1 and server.counters["offer"] == 1
    assert sum(server.counters.values()) == 2


def test_request_selecting_gets_ack(server: DhcpServer) -> None:
    req = client_msg(D.DHCPREQUEST, opts=[(50, ip(GUEST)), (54, ip(GATEWAY))])
    msg, opts = parse_reply(server.handle(req))
    assert msg.yiaddr == ip_int(GUEST) and msg.ciaddr == 0
    assert msg.xid == XID and msg.chaddr == MAC
    assert opts == {D.DHCP_OPT_MSGTYPE: bytes((D.DHCPACK,))} | config_opts() | lease_opts()
    assert server.counters["request"] == 1 and server.counters["nak"] == 0


def test_request_init_reboot_gets_ack(server: DhcpServer) -> None:
    reply = server.handle(client_msg(D.DHCPREQUEST, opts=[(50, ip(GUEST))]))
    msg, opts = parse_reply(reply)
    assert opts[D.DHCP_OPT_MSGTYPE] == bytes((D.DHCPACK,))
    assert msg.yiaddr == ip_int(GUEST)


def test_renewing_with_ciaddr_gets_unicast_ack(server: DhcpServer) -> None:
    reply = server.handle(client_msg(D.DHCPREQUEST, ciaddr=str(GUEST)))
    msg, opts = parse_reply(reply)
    assert reply is not None and reply.broadcast is False
    assert opts[D.DHCP_OPT_MSGTYPE] == bytes((D.DHCPACK,))
    assert msg.ciaddr == ip_int(GUEST) and msg.yiaddr == ip_int(GUEST)
    assert opts[D.DHCP_OPT_LEASE_SEC] == struct.pack("!I", 3600)


@pytest.mark.parametrize(
    ("ciaddr", "opts"),
    [
        ("0.0.0.0", [(50, ip("10.0.2.16"))]),  # INIT-REBOOT with an old address
        ("0.0.0.0", [(50, ip("10.0.2.16")), (54, ip(GATEWAY))]),  # SELECTING, wrong address
        ("192.168.1.5", []),  # RENEWING an address from another network
        ("0.0.0.0", []),  # names no address at all
        (str(GUEST), [(50, ip("10.0.2.16"))]),  # contradicts itself
    ],
)
def test_request_for_another_address_gets_nak(
    server: DhcpServer, ciaddr: str, opts: list[tuple[int, bytes]]
) -> None:
    client_id = b"\x01" + MAC
    reply = server.handle(client_msg(D.DHCPREQUEST, ciaddr=ciaddr, opts=[*opts, (61, client_id)]))
    msg, got = parse_reply(reply)
    assert reply is not None and reply.broadcast is True  # RFC 2131 §4.1: NAK is broadcast
    assert msg.yiaddr == 0 and msg.ciaddr == 0 and msg.xid == XID and msg.chaddr == MAC
    assert got == {
        D.DHCP_OPT_MSGTYPE: bytes((D.DHCPNAK,)),
        D.DHCP_OPT_SERVER_ID: ip(GATEWAY),
        D.DHCP_OPT_CLIENT_ID: client_id,
    }
    assert server.counters["nak"] == 1 and server.counters["ack"] == 0


def test_request_naming_another_server_is_ignored(server: DhcpServer) -> None:
    req = client_msg(D.DHCPREQUEST, opts=[(50, ip(GUEST)), (54, ip("10.0.2.1"))])
    assert server.handle(req) is None
    assert server.counters["request"] == 1
    assert server.counters["ack"] == server.counters["nak"] == 0


@pytest.mark.parametrize(("kind", "counter"), [(D.DHCPRELEASE, "release"),
                                                (D.DHCPDECLINE, "decline")])
def test_release_and_decline_get_no_reply_and_are_counted(
    server: DhcpServer, kind: int, counter: str
) -> None:
    msg = client_msg(kind, ciaddr=str(GUEST), opts=[(54, ip(GATEWAY))])
    assert server.handle(msg) is None
    assert server.handle(msg) is None
    assert server.counters[counter] == 2
    assert server.counters["malformed"] == server.counters["ignored"] == 0


def test_inform_gets_ack_without_lease(server: DhcpServer) -> None:
    reply = server.handle(client_msg(D.DHCPINFORM, ciaddr="10.0.2.77"))
    msg, opts = parse_reply(reply)
    assert reply is not None and reply.broadcast is False  # unicast to ciaddr
    assert msg.yiaddr == 0 and msg.ciaddr == ip_int("10.0.2.77")
    assert opts == {D.DHCP_OPT_MSGTYPE: bytes((D.DHCPACK,))} | config_opts()
    assert server.counters["inform"] == 1 and server.counters["ack"] == 1


def test_inform_without_ciaddr_is_broadcast(server: DhcpServer) -> None:
    reply = server.handle(client_msg(D.DHCPINFORM))
    msg, _ = parse_reply(reply)
    assert reply is not None and reply.broadcast is True and msg.yiaddr == 0


@pytest.mark.parametrize("kind", [D.DHCPDISCOVER, D.DHCPREQUEST])
@pytest.mark.parametrize(("flags", "broadcast"), [(0x8000, True), (0x0000, False),
                                                   (0x7FFF, False), (0xFFFF, True)])
def test_broadcast_flag(server: DhcpServer, kind: int, flags: int, broadcast: bool) -> None:
    reply = server.handle(client_msg(kind, flags=flags, opts=[(50, ip(GUEST))]))
    msg, _ = parse_reply(reply)
    assert reply is not None and reply.broadcast is broadcast
    assert msg.flags == flags  # RFC 2131 table 3: copied from the client


def test_other_config_and_fields_copied() -> None:
    cfg = RelayConfig(
        guest_ipv4=IPv4Address("192.168.100.7"), prefix_len_v4=20,
        gateway_ipv4=IPv4Address("192.168.96.1"), dns_ipv4=IPv4Address("192.168.96.53"),
        mtu=1500, dhcp_lease_s=86401,
    ).validate()
    server = DhcpServer(cfg)
    client_id = b"\xff" + bytes(range(40))
    reply = server.handle(client_msg(D.DHCPDISCOVER, giaddr="172.16.0.1", opts=[(61, client_id)]))
    msg, opts = parse_reply(reply)
    assert msg.yiaddr == ip_int("192.168.100.7") and msg.giaddr == ip_int("172.16.0.1")
    assert opts == (
        {D.DHCP_OPT_MSGTYPE: bytes((D.DHCPOFFER,)), D.DHCP_OPT_CLIENT_ID: client_id}
        | config_opts("255.255.240.0", "192.168.111.255", "192.168.96.1", "192.168.96.53", 1500)
        | lease_opts(86401, 43200, 75600)
    )


def test_options_split_and_overloaded() -> None:
    server = DhcpServer(CFG)
    # RFC 3396: option 50 split into two instances is concatenated.
    req = client_msg(D.DHCPREQUEST, opts=[(50, ip(GUEST)[:2]), (50, ip(GUEST)[2:])])
    assert parse_reply(server.handle(req))[1][53] == bytes((D.DHCPACK,))
    # RFC 2132 §9.3: option 53 carried in the 'file' field.
    msg = bytearray(client_msg(D.DHCPDISCOVER))
    msg[240:] = bytes((52, 1, 1, 255))
    msg[108:111] = bytes((53, 1, D.DHCPDISCOVER))
    assert parse_reply(server.handle(bytes(msg)))[1][53] == bytes((D.DHCPOFFER,))
    assert server.counters["malformed"] == 0


def with_options(raw: bytes) -> bytes:
    return client_msg(D.DHCPDISCOVER)[:240] + raw


def overloaded_file(file_options: bytes) -> bytes:
    msg = bytearray(with_options(bytes((52, 1, 1, 255))))
    msg[108:108 + len(file_options)] = file_options
    return bytes(msg)


BAD_MESSAGES = {
    "empty": (b"", "malformed"),
    "no-cookie-room": (client_msg(D.DHCPDISCOVER)[:239], "malformed"),
    "option-past-end": (with_options(bytes((53, 1))), "malformed"),
    "length-byte-missing": (with_options(bytes((53,))), "malformed"),
    "type-zero-length": (with_options(bytes((53, 0, 255))), "malformed"),
    "type-two-bytes": (with_options(bytes((53, 2, 1, 1, 255))), "malformed"),
    "requested-ip-3-bytes": (with_options(bytes((53, 1, 3, 50, 3, 10, 0, 2, 255))), "malformed"),
    "server-id-5-bytes": (with_options(bytes((53, 1, 3, 54, 5, 10, 0, 2, 2, 0, 255))),
                          "malformed"),
    "overload-value-4": (with_options(bytes((53, 1, 1, 52, 1, 4, 255))), "malformed"),
    "overload-past-file": (overloaded_file(bytes(126) + bytes((53, 1))), "malformed"),
    "overload-empty": (with_options(bytes((52, 1, 3, 255))), "ignored"),  # sname/file all PAD
    "no-type": (with_options(bytes((255,))), "ignored"),
    "offer": (with_options(bytes((53, 1, D.DHCPOFFER, 255))), "ignored"),
    "ack": (with_options(bytes((53, 1, D.DHCPACK, 255))), "ignored"),
    "type-42": (with_options(bytes((53, 1, 42, 255))), "ignored"),
    "bootreply": (b"\x02" + client_msg(D.DHCPDISCOVER)[1:], "ignored"),
    "htype-6": (b"\x01\x06" + client_msg(D.DHCPDISCOVER)[2:], "ignored"),
    "hlen-16": (b"\x01\x01\x10" + client_msg(D.DHCPDISCOVER)[3:], "ignored"),
    "no-cookie": (client_msg(D.DHCPDISCOVER)[:236] + bytes(4) + bytes((53, 1, 1, 255)),
                  "ignored"),
}


@pytest.mark.parametrize(("payload", "counter"), BAD_MESSAGES.values(), ids=BAD_MESSAGES.keys())
def test_bad_messages_are_counted_and_dropped(payload: bytes, counter: str) -> None:
    server = DhcpServer(CFG)
    assert server.handle(payload) is None
    assert server.counters[counter] == 1
    assert sum(server.counters.values()) == 1


def test_memoryview_and_missing_end_accepted(server: DhcpServer) -> None:
    msg = with_options(bytes((53, 1, D.DHCPDISCOVER)))  # no END: tolerated
    reply = server.handle(memoryview(bytearray(msg)))
    assert parse_reply(reply)[0].yiaddr == ip_int(GUEST)
    released = memoryview(b"x")
    released.release()
    assert server.handle(released) is None
    assert server.counters["malformed"] == 1


# --- properties ---------------------------------------------------------------------------

VALID = [
    client_msg(D.DHCPDISCOVER),
    client_msg(D.DHCPREQUEST, flags=0x8000, opts=[(50, ip(GUEST)), (54, ip(GATEWAY))]),
    client_msg(D.DHCPREQUEST, ciaddr=str(GUEST), opts=[(61, b"\x01" + MAC)]),
    client_msg(D.DHCPREQUEST, opts=[(50, ip("10.0.2.3"))]),
    client_msg(D.DHCPINFORM, ciaddr="10.0.2.15"),
    client_msg(D.DHCPRELEASE, ciaddr="10.0.2.15"),
]


def check_any_reply(server: DhcpServer, reply: DhcpReply | None) -> None:
    assert server.counters["error"] == 0
    if reply is None:
        return
    msg, opts = parse_reply(reply)
    assert opts[D.DHCP_OPT_SERVER_ID] == ip(GATEWAY)
    if opts[D.DHCP_OPT_MSGTYPE] == bytes((D.DHCPNAK,)):
        assert reply.broadcast and msg.yiaddr == 0


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    msg = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "lie", "truncate", "append", "insert"]))
        if op == "truncate":
            del msg[draw(st.integers(0, len(msg))):]
        elif op == "append":
            msg += draw(st.binary(max_size=40))
        elif not msg:
            continue
        elif op == "flip":
            i = draw(st.integers(0, len(msg) - 1))
            msg[i] = draw(st.integers(0, 255))
        elif op == "lie":  # rewrite a byte in the options area: a length or a code
            if len(msg) > 241:
                msg[draw(st.integers(240, len(msg) - 1))] = draw(st.sampled_from(
                    [0, 1, 2, 3, 4, 5, 50, 52, 53, 54, 61, 200, 254, 255]))
        else:
            i = draw(st.integers(0, len(msg)))
            msg[i:i] = draw(st.binary(min_size=1, max_size=8))
    return bytes(msg)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    server = DhcpServer(CFG)
    check_any_reply(server, server.handle(data))
    check_any_reply(server, server.handle(with_options(data)))  # past the header checks


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_messages_never_raise(data: bytes) -> None:
    server = DhcpServer(CFG)
    check_any_reply(server, server.handle(data))
    assert sum(server.counters.values()) >= 1  # every message is accounted for


@settings(max_examples=300)
@given(
    xid=st.integers(0, 2**32 - 1),
    mac=st.binary(min_size=6, max_size=6),
    flags=st.integers(0, 0xFFFF),
    kind=st.sampled_from([D.DHCPDISCOVER, D.DHCPREQUEST]),
    renewing=st.booleans(),
)
def test_round_trip(xid: int, mac: bytes, flags: int, kind: int, renewing: bool) -> None:
    server = DhcpServer(CFG)
    if renewing:
        payload = client_msg(kind, xid=xid, chaddr=mac, flags=flags, ciaddr=str(GUEST))
    else:
        payload = client_msg(kind, xid=xid, chaddr=mac, flags=flags, opts=[(50, ip(GUEST))])
    reply = server.handle(payload)
    msg, opts = parse_reply(reply)
    assert reply is not None
    assert (msg.xid, msg.flags, msg.chaddr) == (xid, flags, mac)
    assert msg.yiaddr == ip_int(GUEST)
    # RFC 2131 table 3: ciaddr is 0 in an OFFER, the client's in an ACK.
    assert msg.ciaddr == (ip_int(GUEST) if renewing and kind == D.DHCPREQUEST else 0)
    expected = D.DHCPOFFER if kind == D.DHCPDISCOVER else D.DHCPACK
    assert opts[D.DHCP_OPT_MSGTYPE] == bytes((expected,))
    assert reply.broadcast is bool(flags & 0x8000)
    # The reply is a client-acceptable BOOTP message as a whole, not just its options.
    assert isinstance(dpkt.dhcp.DHCP(reply.payload), dpkt.Packet)
