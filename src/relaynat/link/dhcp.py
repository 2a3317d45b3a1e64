"""DHCPv4 server for the one guest behind the relay: message parsing and replies.

This module owns the DHCP protocol logic only. It is pure: no sockets, no clock, no
lease table. The caller hands it the UDP payload of every guest datagram sent to port
67 and sends any `DhcpReply` back from port 67 to port 68; Ethernet, IP and UDP framing
are the caller's.

There is exactly one address to hand out, `RelayConfig.guest_ipv4`, so there is no
allocation state: every DISCOVER gets the same OFFER, every REQUEST for that address
gets an ACK, as in slirp and passt. It follows RFC 2131 §3.1 (allocation exchange),
§3.2 (INIT-REBOOT), §3.4 (INFORM), §4.1 (message format, reply destination), §4.3
(server behaviour, table 3 for the fields of each reply), RFC 2132 for the options,
RFC 3396 for options split into several instances, RFC 6842 for echoing option 61.

Input is untrusted (the guest may be hostile): every field access is bounds-checked,
option lengths are validated against the buffer before use, and work is linear in the
message size.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from relaynat.config import ConfigError, RelayConfig

# RFC 2131 §2: op codes; RFC 1700 ARP hardware type 1 = Ethernet, with 6-byte addresses.
BOOTREQUEST = 1
BOOTREPLY = 2
HTYPE_ETHER = 1
HLEN_ETHER = 6
#: RFC 2131 §3: options start with the magic cookie 99.130.83.99.
MAGIC_COOKIE = bytes((99, 130, 83, 99))
#: Fixed BOOTP header (RFC 2131 §2, figure 1) up to and excluding the options field.
FIXED_LEN = 236
OPTIONS_OFFSET = FIXED_LEN + len(MAGIC_COOKIE)
#: RFC 1542 §2.1: a BOOTP message is at least 300 bytes; some relays and clients
#: (old BOOTP stacks, some firmware) drop anything shorter.
MIN_MESSAGE_LEN = 300
#: RFC 2131 §2: the leftmost bit of 'flags' asks for broadcast replies.
FLAG_BROADCAST = 0x8000

# RFC 2132 §9.6: DHCP message types.
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)

# RFC 2132 option codes we read or write.
OPT_PAD, OPT_END = 0, 255
OPT_SUBNET_MASK, OPT_ROUTER, OPT_DNS, OPT_MTU, OPT_BROADCAST = 1, 3, 6, 26, 28
OPT_REQUESTED_IP, OPT_LEASE_TIME, OPT_OVERLOAD, OPT_MSG_TYPE = 50, 51, 52, 53
OPT_SERVER_ID, OPT_T1, OPT_T2, OPT_CLIENT_ID = 54, 58, 59, 61

# Byte ranges of the fixed header fields we look at (RFC 2131 §2, figure 1).
_XID = slice(4, 8)
_FLAGS = slice(10, 12)
_CIADDR = slice(12, 16)
_GIADDR = slice(24, 28)
_CHADDR = slice(28, 44)
_SNAME = (44, 108)
_FILE = (108, 236)

_ZERO_IP = bytes(4)
_HEADER = struct.Struct("!BBBB4sHH4s4s4s4s16s")
_REPLY_NAMES = {OFFER: "offer", ACK: "ack", NAK: "nak"}
_COUNTERS = ("discover", "request", "decline", "release", "inform", "offer", "ack", "nak",
             "malformed", "ignored", "error")


@dataclass(slots=True, frozen=True)
class DhcpReply:
    #: The complete BOOTP/DHCP message (UDP payload), server port 67 -> client port 68.
    payload: bytes
    #: True: send to 255.255.255.255 at ff:ff:ff:ff:ff:ff. False: unicast to the
    #: reply's ciaddr if set, else its yiaddr, at its chaddr (RFC 2131 §4.1).
    broadcast: bool
    #: The address an ACK leases (yiaddr); None for an OFFER, a NAK, and the ACK to an
    #: INFORM, which leases nothing (RFC 2131 §4.3.5).
    lease: bytes | None = None


def _option(code: int, value: bytes) -> bytes:
    return bytes((code, len(value))) + value


def _parse_options(buf: bytes, start: int, end: int, out: dict[int, list[bytes]]) -> bool:
    """Append the options in buf[start:end] to `out`; False if one runs past `end`.

    Repeated codes are collected in order so the caller can concatenate them (RFC 3396
    §7); a list rather than bytes concatenation keeps a flood of tiny repeats linear.
    A missing END option is tolerated (RFC 2131 §4.1 asks servers to be liberal).
    """
    i = start
    while i < end:
        code = buf[i]
        if code == OPT_END:
            return True
        if code == OPT_PAD:  # RFC 2132 §3.1: single byte, no length
            i += 1
            continue
        if i + 1 >= end:
            return False
        value_end = i + 2 + buf[i + 1]
        if value_end > end:
            return False
        out.setdefault(code, []).append(buf[i + 2:value_end])
        i = value_end
    return True


class DhcpServer:
    """Answers one guest's DHCP messages with the one address in the config."""

    def __init__(self, config: RelayConfig) -> None:
        # RFC 2132 §5.1: the interface MTU option is 16 bits, at least 68.
        if not 68 <= config.mtu <= 0xFFFF:
            raise ConfigError(f"MTU {config.mtu} does not fit the DHCP MTU option (68..65535)")
        if not 1 <= config.dhcp_lease_s <= 0xFFFFFFFF:
            raise ConfigError(f"dhcp_lease_s {config.dhcp_lease_s} must be 1..2**32-1")
        self._guest = config.guest_ipv4.packed
        self._server_id = config.gateway_ipv4.packed
        net = config.network_v4
        lease = config.dhcp_lease_s
        # Configuration options sent in every OFFER and ACK (RFC 2131 §4.3.1, table 3);
        # like slirp and passt we send them whether or not option 55 lists them.
        self._config_opts = b"".join((
            _option(OPT_SUBNET_MASK, net.netmask.packed),
            _option(OPT_BROADCAST, net.broadcast_address.packed),
            _option(OPT_ROUTER, self._server_id),
            _option(OPT_DNS, config.dns_ipv4.packed),
            _option(OPT_MTU, struct.pack("!H", config.mtu)),
        ))
        # RFC 2131 §4.4.5: T1 defaults to 0.5 and T2 to 0.875 times the lease duration.
        self._lease_opts = b"".join((
            _option(OPT_LEASE_TIME, struct.pack("!I", lease)),
            _option(OPT_T1, struct.pack("!I", lease // 2)),
            _option(OPT_T2, struct.pack("!I", lease * 7 // 8)),
        ))
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)

    def handle(self, payload: bytes | memoryview) -> DhcpReply | None:
        """One client message (UDP payload sent to port 67) -> reply or None. Never raises."""
        try:
            return self._handle(payload)
        except Exception:
            # Defence in depth only: _handle checks every bound itself, and the tests
            # assert this counter stays 0. A bug here must not take the relay down.
            self.counters["error"] += 1
            return None

    def _drop(self, why: str) -> DhcpReply | None:
        """Count `why`; no reply (typed as _handle's result, which it is returned as)."""
        self.counters[why] += 1
        return None

    def _handle(self, payload: bytes | memoryview) -> DhcpReply | None:
        try:
            msg = bytes(payload)
        except (TypeError, ValueError, BufferError):  # e.g. a released memoryview
            return self._drop("malformed")
        if len(msg) < OPTIONS_OFFSET:
            return self._drop("malformed")
        # Servers take BOOTREQUESTs only (RFC 2131 §2); a chaddr that is not a 6-byte
        # Ethernet address could not be the destination of the frames we build.
        if msg[0] != BOOTREQUEST or msg[1] != HTYPE_ETHER or msg[2] != HLEN_ETHER:
            return self._drop("ignored")
        if msg[FIXED_LEN:OPTIONS_OFFSET] != MAGIC_COOKIE:
            return self._drop("ignored")  # plain BOOTP (RFC 951): not served
        opts = self._options(msg)
        if opts is None:
            return self._drop("malformed")
        msg_type = opts.get(OPT_MSG_TYPE)
        if msg_type is None:
            return self._drop("ignored")  # BOOTP with the cookie but no DHCP type
        # RFC 2132 §9.6: option 53 has length 1; options 50 and 54 carry one address.
        if len(msg_type) != 1 or any(
            code in opts and len(opts[code]) != 4 for code in (OPT_REQUESTED_IP, OPT_SERVER_ID)
        ):
            return self._drop("malformed")
        kind = msg_type[0]
        server_id = opts.get(OPT_SERVER_ID)
        if kind == DISCOVER:
            self.counters["discover"] += 1
            return self._reply(msg, opts, OFFER, self._guest)
        if kind == REQUEST:
            self.counters["request"] += 1
            return self._request(msg, opts, server_id)
        if kind == INFORM:
            # RFC 2131 §4.3.5: ACK with configuration but no lease time and yiaddr 0.
            self.counters["inform"] += 1
            return self._reply(msg, opts, ACK, _ZERO_IP)
        if kind in (DECLINE, RELEASE):
            # RFC 2131 §4.3.3, §4.3.4: no reply. With one fixed address there is nothing
            # to mark unusable or free; the counter lets an operator see a DECLINE storm.
            self.counters["decline" if kind == DECLINE else "release"] += 1
            return None
        return self._drop("ignored")  # server-to-client types, or unknown (RFC 2131 §4.3)

    def _options(self, msg: bytes) -> dict[int, bytes] | None:
        """All options, RFC 3396-concatenated, including overloaded sname/file fields."""
        parts: dict[int, list[bytes]] = {}
        if not _parse_options(msg, OPTIONS_OFFSET, len(msg), parts):
            return None
        # RFC 2132 §9.3: option 52 says 'file' (1), 'sname' (2) or both (3) hold more
        # options; RFC 2131 §4.1 fixes the order: options, then file, then sname.
        overload = b"".join(parts.get(OPT_OVERLOAD, []))
        if overload:
            if len(overload) != 1 or overload[0] not in (1, 2, 3):
                return None
            for bit, (start, end) in ((1, _FILE), (2, _SNAME)):
                if overload[0] & bit and not _parse_options(msg, start, end, parts):
                    return None
        return {code: b"".join(values) for code, values in parts.items()}

    def _request(
        self, msg: bytes, opts: dict[int, bytes], server_id: bytes | None
    ) -> DhcpReply | None:
        # RFC 2131 §4.3.2: with a server identifier the client is SELECTING; if it names
        # another server it declined our offer and we stay silent.
        if server_id is not None and server_id != self._server_id:
            return None
        # SELECTING and INIT-REBOOT name the address in option 50, RENEWING and
        # REBINDING in ciaddr. Every address named must be ours; naming none at all
        # is a broken client, and a NAK sends it back to DISCOVER (§3.1 step 4).
        named = [opts[OPT_REQUESTED_IP]] if OPT_REQUESTED_IP in opts else []
        if msg[_CIADDR] != _ZERO_IP:
            named.append(msg[_CIADDR])
        if named and all(addr == self._guest for addr in named):
            return self._reply(msg, opts, ACK, self._guest)
        return self._reply(msg, opts, NAK, _ZERO_IP)

    def _reply(self, msg: bytes, opts: dict[int, bytes], kind: int, yiaddr: bytes) -> DhcpReply:
        """Build an OFFER, ACK or NAK to `msg` with the fields of RFC 2131 table 3."""
        self.counters[_REPLY_NAMES[kind]] += 1
        flags = int.from_bytes(msg[_FLAGS], "big")
        # Table 3: ciaddr is 0 in OFFER and NAK, copied from the client in ACK.
        ciaddr = msg[_CIADDR] if kind == ACK else _ZERO_IP
        header = _HEADER.pack(
            BOOTREPLY, HTYPE_ETHER, HLEN_ETHER, 0, msg[_XID], 0, flags,
            ciaddr, yiaddr, _ZERO_IP, msg[_GIADDR], msg[_CHADDR],
        )
        options = [_option(OPT_MSG_TYPE, bytes((kind,))), _option(OPT_SERVER_ID, self._server_id)]
        if kind != NAK:  # Table 3: a NAK carries only the type, server id, client id.
            if yiaddr != _ZERO_IP:  # Table 3: no lease time in the ACK to an INFORM.
                options.append(self._lease_opts)
            options.append(self._config_opts)
        client_id = opts.get(OPT_CLIENT_ID)
        if client_id is not None and 0 < len(client_id) <= 255:
            options.append(_option(OPT_CLIENT_ID, client_id))  # RFC 6842 §3: MUST echo
        options.append(bytes((OPT_END,)))
        body = header + bytes(192) + MAGIC_COOKIE + b"".join(options)  # 192 = sname + file
        body += bytes(max(0, MIN_MESSAGE_LEN - len(body)))  # pad options with OPT_PAD
        # RFC 2131 §4.1: broadcast a NAK, or when the client asks to via the flag;
        # unicast to ciaddr if set, else to yiaddr at chaddr. A reply with neither
        # address (INFORM without ciaddr) can only go out as a broadcast.
        no_address = ciaddr == _ZERO_IP and yiaddr == _ZERO_IP
        broadcast = kind == NAK or bool(flags & FLAG_BROADCAST) or no_address
        lease = yiaddr if kind == ACK and yiaddr != _ZERO_IP else None
        return DhcpReply(body, broadcast, lease)
