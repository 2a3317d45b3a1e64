"""DHCPv6 server for the one guest behind the relay (RFC 8415), stateful and stateless.

This module owns the DHCPv6 protocol logic only. It is pure: no sockets, no clock, no
binding table. The relay hands `Dhcpv6Server.handle` the UDP payload of every guest
datagram sent to port 547 (normally to ff02::1:2, All_DHCP_Relay_Agents_and_Servers,
from the client's link-local address and port 546) and sends any returned payload
back from the gateway's link-local address (`config.gateway_link_local`), port 547, to
the datagram's source address and port 546 at the frame's Ethernet source (RFC 8415
§18.3.10: replies go to the client's source address; §7.2: server port 547).

As link/dhcp.py, there is exactly one address to hand out, `RelayConfig.guest_ipv6`, so
every client gets the same binding and the server keeps no state: SOLICIT -> ADVERTISE
(or REPLY with Rapid Commit, §18.3.1), REQUEST/RENEW/REBIND -> REPLY with the binding,
CONFIRM -> REPLY Success or NotOnLink (§18.3.3), INFORMATION-REQUEST -> REPLY with DNS
only (§18.3.6, stateless), RELEASE/DECLINE -> REPLY Success (§18.3.7/§18.3.8: nothing to
free or to mark unusable). Lifetimes: the address's preferred and valid lifetimes are
the RA prefix's (config.prefix_*_lifetime_s, so an address never outlives its prefix),
T1 = 0.5 and T2 = 0.8 of the preferred lifetime (§21.4 recommendations).

Choices where RFC 8415 leaves room:
- The DNS_SERVERS option (RFC 3646) is sent in every reply carrying configuration,
  whether or not the ORO asks for it, as link/dhcp.py does for DHCPv4 and passt does;
  clients ignore options they did not request.
- ADVERTISE carries Preference 255 (§21.8, §18.2.1): the client need not wait out
  the first Solicit retransmission for other servers; there are none on this link.
- Only the first IA_NA gets the address (one address cannot be in two IAs); later
  IA_NAs get NoAddrsAvail (SOLICIT/REQUEST) or NoBinding (RENEW/REBIND) inside the IA.
  IA_TA and IA_PD are not served (NoAddrsAvail / NoPrefixAvail inside the IA). At most
  `MAX_IAS` IAs are answered, so a reply stays small whatever the request holds.
- RENEW/REBIND return addresses the client named that are not ours with lifetimes 0
  (§18.3.4, §18.3.5), so a client moved from another network drops them.

Validation (§16): a message missing the Client Identifier where required, with a
foreign Server Identifier, or with one where none belongs, is ignored; malformed
messages (option running past the end or past its container, bad fixed lengths) are
dropped. Every drop returns None and bumps a counter; `handle` never raises.
"""

from __future__ import annotations

import struct
from collections import Counter
from ipaddress import IPv6Address

from relaynat.config import ConfigError, RelayConfig
from relaynat.wire import MalformedFrame

CLIENT_PORT, SERVER_PORT = 546, 547
#: RFC 8415 §7.1: All_DHCP_Relay_Agents_and_Servers, where clients send.
ALL_DHCP_SERVERS = IPv6Address("ff02::1:2").packed

# RFC 8415 §7.3 message types.
SOLICIT, ADVERTISE, REQUEST, CONFIRM, RENEW, REBIND, REPLY = 1, 2, 3, 4, 5, 6, 7
RELEASE, DECLINE, RECONFIGURE, INFORMATION_REQUEST = 8, 9, 10, 11
RELAY_FORW, RELAY_REPL = 12, 13
# RFC 8415 §21 option codes; RFC 3646 §3 DNS servers.
OPT_CLIENTID, OPT_SERVERID, OPT_IA_NA, OPT_IA_TA, OPT_IAADDR, OPT_ORO = 1, 2, 3, 4, 5, 6
OPT_PREFERENCE, OPT_STATUS_CODE, OPT_RAPID_COMMIT, OPT_DNS_SERVERS, OPT_IA_PD = 7, 13, 14, 23, 25
# RFC 8415 §21.13 status codes.
SUCCESS, UNSPEC_FAIL, NO_ADDRS_AVAIL, NO_BINDING, NOT_ON_LINK = 0, 1, 2, 3, 4
NO_PREFIX_AVAIL = 6
#: RFC 8415 §11.2: DUID-LL, hardware type 1 (Ethernet, RFC 826).
DUID_LL, HWTYPE_ETHERNET = 3, 1
#: RFC 8415 §11.1: a DUID is at most 128 octets plus its 2-octet type.
MAX_DUID_LEN = 130
#: Upper bound of IA options answered in one reply (each kind counted together).
MAX_IAS = 8
#: RFC 8415 §21.8: the highest preference, "use this server now".
PREFERENCE_MAX = 255

_OPTION = struct.Struct("!HH")
_IA_NA = struct.Struct("!III")  # IAID, T1, T2 (§21.4); IA_PD has the same layout (§21.21)
_IAADDR = struct.Struct("!16sII")  # address, preferred, valid lifetime (§21.6)
_IA_FIXED = {OPT_IA_NA: 12, OPT_IA_TA: 4, OPT_IA_PD: 12}  # §21.4, §21.5, §21.21

_NAMES = {SOLICIT: "solicit", REQUEST: "request", CONFIRM: "confirm", RENEW: "renew",
          REBIND: "rebind", RELEASE: "release", DECLINE: "decline",
          INFORMATION_REQUEST: "information_request"}
_SERVER_TYPES = (ADVERTISE, REPLY, RECONFIGURE, RELAY_FORW, RELAY_REPL)
# §16: who must carry a Server Identifier (and ours), and who must not carry one.
_NEED_SERVER_ID = (REQUEST, RENEW, DECLINE, RELEASE)
_NO_SERVER_ID = (SOLICIT, CONFIRM, REBIND)
_NEED_CLIENT_ID = (SOLICIT, REQUEST, CONFIRM, RENEW, REBIND, DECLINE, RELEASE)


def option(code: int, value: bytes) -> bytes:
    return _OPTION.pack(code, len(value)) + value


def status(code: int, message: str = "") -> bytes:
    """RFC 8415 §21.13: status code and a UTF-8 message for humans."""
    return option(OPT_STATUS_CODE, struct.pack("!H", code) + message.encode())


def parse_options(buf: bytes, start: int, end: int) -> list[tuple[int, bytes]]:
    """The (code, value) options in buf[start:end], in order (RFC 8415 §21.1).

    Raises MalformedFrame if an option header or value runs past `end`, which is the end
    of the message or of the option that encapsulates these (§21.1: encapsulated options
    lie within their container's length).
    """
    options = []
    i = start
    while i < end:
        if i + 4 > end:
            raise MalformedFrame("option_truncated")
        code, length = _OPTION.unpack_from(buf, i)
        if i + 4 + length > end:
            raise MalformedFrame("option_past_end")
        options.append((code, buf[i + 4:i + 4 + length]))
        i += 4 + length
    return options


class Dhcpv6Server:
    """Answers one guest's DHCPv6 messages with the one address in the config."""

    def __init__(self, config: RelayConfig) -> None:
        if len(config.gateway_mac) != 6:
            raise ConfigError("gateway MAC must be 6 bytes")
        preferred, valid = config.prefix_preferred_lifetime_s, config.prefix_valid_lifetime_s
        if not 0 < preferred <= valid <= 0xFFFFFFFF:
            raise ConfigError("prefix lifetimes must satisfy 0 < preferred <= valid < 2**32")
        self._prefix_bytes = config.prefix_v6.network_address.packed[:8]
        self._address = config.guest_ipv6.packed
        self._preferred, self._valid = preferred, valid
        # §21.4: T1 <= T2 <= preferred; 0.5 and 0.8 are the recommended fractions.
        self._t1, self._t2 = preferred // 2, preferred * 4 // 5
        #: Our DUID-LL (§11.4): stable as long as the gateway MAC is.
        self.duid = struct.pack("!HH", DUID_LL, HWTYPE_ETHERNET) + config.gateway_mac
        self._server_id = option(OPT_SERVERID, self.duid)
        self._dns = option(OPT_DNS_SERVERS, config.dns_ipv6.packed)
        self.counters: Counter[str] = Counter()
        #: Whether the last reply configures the guest: a Reply to a Request, Renew,
        #: Rebind, rapid-commit Solicit (§18.3.1) or Information-request (stateless).
        self.last_configures = False
        #: The address the last reply binds (None: none, or stateless).
        self.last_bound: bytes | None = None

    def handle(self, message: bytes | memoryview) -> bytes | None:
        """One client message (UDP payload to port 547) -> reply payload, or None.

        Never raises; every message bumps at least one counter.
        """
        self.last_configures, self.last_bound = False, None
        try:
            return self._handle(bytes(message))
        except MalformedFrame as exc:
            self.counters["malformed"] += 1
            self.counters[exc.reason] += 1
        except (TypeError, ValueError, BufferError):  # e.g. a released memoryview
            self.counters["malformed"] += 1
        except Exception:
            # Defence in depth, as link/dhcp.py: the tests assert this counter stays 0.
            self.counters["error"] += 1
        return None

    def _ignore(self, why: str) -> bytes | None:
        """Count `why`; no reply (typed as _handle's result, which it is returned as)."""
        self.counters[why] += 1
        return None

    def _handle(self, msg: bytes) -> bytes | None:
        if len(msg) < 4:  # §8: msg-type and a 3-octet transaction-id
            raise MalformedFrame("too_short")
        kind, xid = msg[0], msg[1:4]
        if kind in _SERVER_TYPES:
            return self._ignore("not_from_client")  # no relays on this link (§16)
        name = _NAMES.get(kind)
        if name is None:
            return self._ignore("unknown_type")
        options = parse_options(msg, 4, len(msg))
        first: dict[int, bytes] = {}
        for code, value in options:
            first.setdefault(code, value)  # §21: singletons; a repeat is not read
        self.counters[name] += 1
        client_id, server_id = first.get(OPT_CLIENTID), first.get(OPT_SERVERID)
        if client_id is not None and not 2 <= len(client_id) <= MAX_DUID_LEN:
            raise MalformedFrame("bad_client_id")
        if client_id is None and kind in _NEED_CLIENT_ID:
            return self._ignore("no_client_id")
        if kind in _NEED_SERVER_ID and server_id is None:
            return self._ignore("no_server_id")
        if kind in _NO_SERVER_ID and server_id is not None:
            return self._ignore("unexpected_server_id")
        # §16.12: an Information-request may name a server; then it must be us.
        if server_id is not None and server_id != self.duid:
            return self._ignore("foreign_server_id")
        ias = [(code, value) for code, value in options if code in _IA_FIXED]
        for code, value in ias:
            if len(value) < _IA_FIXED[code]:
                raise MalformedFrame("ia_short")
            if code != OPT_IA_PD:
                self._addresses(code, value)  # validates what the IA encapsulates
        head = [option(OPT_CLIENTID, client_id)] if client_id is not None else []
        head.append(self._server_id)

        if kind == INFORMATION_REQUEST:
            if ias:  # §16.12: stateless clients must not send IAs
                return self._ignore("information_request_with_ia")
            self.last_configures = True
            return self._reply(REPLY, xid, head, [self._dns])
        if kind == CONFIRM:
            return self._confirm(xid, head, ias)
        if kind in (RELEASE, DECLINE):
            # §18.3.7/§18.3.8: with one fixed address there is nothing to free or mark
            # unusable; the counters let an operator see a DECLINE (DAD failure) storm.
            return self._reply(REPLY, xid, head, [status(SUCCESS, "ok")])
        rapid = kind == SOLICIT and OPT_RAPID_COMMIT in first
        body = [*self._bindings(kind, ias), self._dns]
        if kind == SOLICIT and not rapid:
            body.append(option(OPT_PREFERENCE, bytes((PREFERENCE_MAX,))))
            self.last_bound = None  # offered, not bound
            return self._reply(ADVERTISE, xid, head, body)
        self.last_configures = True
        if rapid:  # §18.3.1: commit at once, and say so with the option in the Reply
            body.append(option(OPT_RAPID_COMMIT, b""))
        return self._reply(REPLY, xid, head, body)

    def _reply(self, kind: int, xid: bytes, head: list[bytes], body: list[bytes]) -> bytes:
        self.counters["advertise" if kind == ADVERTISE else "reply"] += 1
        return bytes((kind,)) + xid + b"".join(head) + b"".join(body)

    def _addresses(self, ia_code: int, value: bytes) -> list[bytes]:
        """The IAADDR addresses inside one IA_NA/IA_TA option value (§21.6)."""
        addresses = []
        for code, sub in parse_options(value, _IA_FIXED[ia_code], len(value)):
            if code == OPT_IAADDR:
                if len(sub) < _IAADDR.size:
                    raise MalformedFrame("iaaddr_short")
                addresses.append(sub[:16])
        return addresses

    def _confirm(self, xid: bytes, head: list[bytes], ias: list[tuple[int, bytes]]) -> bytes | None:
        addresses = [a for code, value in ias if code != OPT_IA_PD
                     for a in self._addresses(code, value)]
        if not addresses:
            return self._ignore("confirm_without_addresses")  # §18.3.3: MUST NOT reply
        # §18.3.3: on-link means inside the prefix we advertise; we do not check that
        # the address is the one DHCPv6 gave (SLAAC addresses are as valid here).
        if all(a[:8] == self._prefix_bytes for a in addresses):
            return self._reply(REPLY, xid, head, [status(SUCCESS, "on link")])
        return self._reply(REPLY, xid, head, [status(NOT_ON_LINK, "not on this link")])

    def _bindings(self, kind: int, ias: list[tuple[int, bytes]]) -> list[bytes]:
        """The IA options of an ADVERTISE or REPLY to SOLICIT/REQUEST/RENEW/REBIND."""
        out: list[bytes] = []
        given = False
        renewing = kind in (RENEW, REBIND)
        for code, value in ias[:MAX_IAS]:
            iaid = value[:4]
            if code == OPT_IA_TA:
                out.append(option(OPT_IA_TA, iaid + status(NO_ADDRS_AVAIL, "no temporary")))
            elif code == OPT_IA_PD:
                out.append(option(OPT_IA_PD, iaid + bytes(8)
                                  + status(NO_PREFIX_AVAIL, "no prefixes")))
            elif given:
                why = status(NO_BINDING, "one address only") if renewing else status(
                    NO_ADDRS_AVAIL, "one address only")
                out.append(option(OPT_IA_NA, iaid + bytes(8) + why))
            else:
                given = True
                self.last_bound = self._address
                addrs = [option(OPT_IAADDR, _IAADDR.pack(self._address, self._preferred,
                                                         self._valid))]
                if renewing:  # §18.3.4/§18.3.5: others the client holds, lifetimes 0
                    foreign = dict.fromkeys(a for a in self._addresses(code, value)
                                            if a != self._address)
                    addrs += [option(OPT_IAADDR, _IAADDR.pack(a, 0, 0))
                              for a in list(foreign)[:MAX_IAS]]
                out.append(option(OPT_IA_NA, iaid + struct.pack("!II", self._t1, self._t2)
                                  + b"".join(addrs)))
        if not given and kind == SOLICIT:
            # §18.3.9: no address for any IA_NA of this client: say so at top level.
            out.append(status(NO_ADDRS_AVAIL, "no IA_NA requested"))
        return out
