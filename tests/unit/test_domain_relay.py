"""Domain rules in a real `Relay`, driven frame by frame (relaynat.testing.InMemoryGuest):
queries refused at the DNS address without an upstream, an answer (a static record here)
learned for its name, and a flow to its address judged by it. The same end to end with
dnsmasq and real clients: tests/integration/test_domain_policy.py."""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Address

import dpkt

from relaynat import RelayConfig
from relaynat.events import DnsQuery, Event, FlowOpened
from relaynat.policy import Policy, Rule
from relaynat.testing import InMemoryGuest
from relaynat.testing import frames as f
from relaynat.testing.guest import Reply

#: A static record for the gateway, which the relay maps to the host's loopback (where
#: the kit's sink listens): the name's address is reachable without leaving the host.
CONFIG = RelayConfig(dns_upstream=IPv4Address("127.0.0.1"),
                     dns_records=(("sink.allowed.test", "10.0.2.2"),))
POLICY = Policy([Rule("allow", "udp", (), (), "", ("*.allowed.test",))], "deny", CONFIG)


def _dns_reply(sport: int) -> Callable[[Reply], bool]:
    def match(reply: Reply) -> bool:
        return reply.udp is not None and reply.udp.sport == 53 and reply.udp.dport == sport
    return match


def _icmp_prohibited(reply: Reply) -> bool:
    # ICMP destination unreachable (3), administratively prohibited (13).
    ip = reply.ip
    return ip is not None and ip.proto == 1 and bytes(ip.payload[:2]) == b"\x03\x0d"


async def test_refused_learned_and_judged() -> None:
    events: list[Event] = []
    async with InMemoryGuest(CONFIG, policy=POLICY) as guest:
        guest.relay.subscribe(events.append)
        a = guest.addressing
        # Before any answer: the gateway's address matches no domain rule.
        await guest.send(f.udp_datagram(a, False, 41000, guest.sink_port, b"x"))
        await guest.expect(_icmp_prohibited)
        # A name no rule covers: REFUSED by the relay (nothing listens upstream).
        await guest.send(f.dns_query(a, False, 42000, 0x4242, "exfil.denied.test"))
        reply = await guest.expect(_dns_reply(42000))
        assert reply.udp is not None
        answer = dpkt.dns.DNS(bytes(reply.udp.payload))
        assert (answer.id, answer.rcode, answer.an) == (0x4242, 5, [])
        # The static name: answered, and learned for its name.
        await guest.send(f.dns_query(a, False, 42001, 7, "sink.allowed.test"))
        await guest.expect(_dns_reply(42001))
        assert [(n["name"], n["addr"]) for n in guest.relay.learned_names()] == [
            ("sink.allowed.test", "10.0.2.2")]
        # Now the flow is allowed (and reaches the sink: no error comes back).
        await guest.send(f.udp_datagram(a, False, 41001, guest.sink_port, b"x"))
        await guest.delivered()
        stats = guest.stats()
    assert stats["dns_refused"] == 1 and stats["dns_static_answers"] == 1
    assert stats["policy_denied_default"] == 1 and stats["policy_allowed"] == 1
    assert stats["udp_flows_opened"] == 1
    queries = [(e.name, e.qtype, e.answers, e.action) for e in events
               if isinstance(e, DnsQuery)]
    assert queries == [("exfil.denied.test", "A", (), "refused"),
                       ("sink.allowed.test", "A", ("10.0.2.2",), "static")]
    # The audit trail's decision record: the opened UDP flow names the rule and the names
    # its destination was learned for.
    opened = [(e.protocol, e.names, e.rule) for e in events if isinstance(e, FlowOpened)]
    assert opened == [("udp", ("sink.allowed.test",), 0)]
