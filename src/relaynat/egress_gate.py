"""The egress policy applied to one relay's new guest flows: `EgressGate`.

`Policy` (policy.py) decides; the gate is what the relays ask on each new flow. It
exempts the relay's own DNS service, looks up the names the relay's DNS answers held a
destination for (domains.py `NameTable`, for the policy's domain rules), counts each
verdict by rule into the relay's stats and tells a listener of each refusal. Pure: the
relays pass `now`.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple, Protocol

from relaynat.addressing import DNS_PORT
from relaynat.domains import NameTable
from relaynat.domains import wire_name as wire_name_form
from relaynat.policy import Policy


class Verdict(NamedTuple):
    """`EgressGate.judge`'s answer on a new flow: the decision, the deciding rule (-1:
    the default) and its comment, the names valid answers held the destination for
    (() when the policy has no domain rules: not looked up), and whether the flow's
    first flight must name one of them (`Decision.inspect`)."""

    allow: bool
    rule: int
    comment: str
    names: tuple[str, ...]
    inspect: bool


#: The verdict on the relay's own DNS service (never asked of the policy).
_EXEMPT = Verdict(True, -1, "", (), False)


class DenyListener(Protocol):
    """Hears of a new flow the policy refused: protocol, destination, port, the deciding
    rule's index (-1: the default) and comment, and the names the destination's valid
    DNS answers were for (() when not looked up)."""

    def __call__(self, proto: int, dst: bytes, dport: int, rule: int, comment: str, *,
                 names: tuple[str, ...] = ()) -> None: ...


class EgressGate:
    """`policy` applied to one relay's new guest flows: what `TcpRelay`, `UdpRelay` and
    `IcmpEchoRelay` ask (`judge`, counted into `stats`; `admit` is its bare verdict)
    and what `set_policy(cut=True)` asks of open flows (`denies`, not counted: the cut
    is). The DNS addresses' port 53 is the relay's own service and never asked about
    (see the module docstring).

    `names` is the relay's table of DNS answers (domains.py), which outlives any one
    gate: a destination's names are looked up there for the policy's domain rules, and
    the relays report each flow's opening and end (`flow_opened`, `flow_closed`) so
    that the addresses of open flows stay valid.

    `on_deny(proto, dst, dport, rule, comment, names=...)` hears of each new flow
    refused: the index of the deciding rule (-1: the default), that rule's comment (""
    for none) and the destination's names, for the relay's events and its log."""

    def __init__(self, policy: Policy, dns_addresses: tuple[bytes, ...],
                 stats: Counter[str],
                 on_deny: DenyListener | None = None,
                 names: NameTable | None = None) -> None:
        self.policy = policy
        self.names = names if names is not None else NameTable()
        self._dns_addresses = dns_addresses
        self._stats = stats
        self._on_deny = on_deny

    def _exempt(self, dst: bytes, dport: int) -> bool:
        return dport == DNS_PORT and dst in self._dns_addresses

    def _names(self, dst: bytes, now: float) -> tuple[str, ...]:
        return self.names.names_for(dst, now) if self.policy.has_domains else ()

    def denies(self, proto: int, dst: bytes, dport: int, now: float) -> bool:
        """The policy's word on an open flow (its destination's names as of `now`;
        an open flow holds its address, so they are the names it opened with unless
        the table lost them)."""
        if self._exempt(dst, dport):
            return False
        return not self.policy.decide(proto, dst, dport, self._names(dst, now)).allow

    def judge(self, proto: int, dst: bytes, dport: int, now: float) -> Verdict:
        """The policy's word on a new guest flow, counted per rule; a refusal is
        reported to `on_deny`."""
        if self._exempt(dst, dport):
            return _EXEMPT
        names = self._names(dst, now)
        decision = self.policy.decide(proto, dst, dport, names)
        index = decision.rule
        comment = "" if index < 0 else self.policy.rules[index].comment
        if decision.allow:
            self._stats["policy_allowed"] += 1
        else:
            rule = "default" if index < 0 else f"rule{index}"
            self._stats["policy_denied"] += 1
            self._stats[f"policy_denied_{rule}"] += 1
            if self._on_deny is not None:
                self._on_deny(proto, dst, dport, index, comment, names=names)
        return Verdict(decision.allow, index, comment, names, decision.inspect)

    def admit(self, proto: int, dst: bytes, dport: int, now: float) -> bool:
        """`judge(...).allow`, for callers that need nothing more."""
        return self.judge(proto, dst, dport, now).allow

    def name_ok(self, verdict: Verdict, dst: bytes, wire_name: str | None,
                now: float) -> bool:
        """Whether `wire_name`, the name a flow's first flight carries (TLS SNI, HTTP
        Host; None: none), is covered by the rule that allowed the flow and `dst` was
        answered for that very name and is still valid."""
        if wire_name is None or verdict.rule < 0:
            return False
        name = wire_name_form(wire_name)
        return (name is not None and self.policy.covers(verdict.rule, name)
                and self.names.learned(dst, name, now))

    def flow_opened(self, dst: bytes, now: float) -> None:
        """A flow to `dst` entered a relay's table: its answers valid now stay valid
        while it is open."""
        self.names.hold(dst, now)

    def flow_closed(self, dst: bytes, now: float) -> None:
        """A flow to `dst` left its table (the grace period starts once none is left)."""
        self.names.release(dst, now)
