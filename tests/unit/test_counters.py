"""`Relay.stats()`'s schema: every counter `relaynat.counters.COUNTERS` names, zeros
included, and the per-rule ones of `PATTERNS` once they count something
(tests/checks/test_counters.py keeps the names in step with the code and the docs)."""

from __future__ import annotations

import re

from relaynat.config import RelayConfig
from relaynat.counters import COUNTERS, PATTERNS, with_zeros
from relaynat.policy import Policy, Rule
from relaynat.relay import Relay
from relaynat.testing import RST, InMemoryGuest
from relaynat.testing import frames as f


def _pattern(name: str) -> re.Pattern[str]:
    """`policy_denied_rule{N}` as a regular expression of the names it stands for."""
    return re.compile("[0-9]+".join(map(re.escape, re.split(r"\{[^}]*\}", name))))


async def test_a_fresh_relay_reports_every_counter_at_zero() -> None:
    async with Relay(RelayConfig()) as relay:
        stats = relay.stats()
        assert stats["policy_denied"] == 0  # a KeyError once, before the first denial
        assert stats == {name: 0 for name in COUNTERS}
        stats["frames_in"] = 7  # the caller's copy
        assert relay.stats()["frames_in"] == 0


async def test_a_rule_that_denies_gets_its_counter_beside_the_documented_ones() -> None:
    policy = Policy([Rule("deny", "tcp", ("host",), ((22, 22),), comment="no ssh")])
    async with InMemoryGuest(policy=policy) as guest:
        await guest.send(f.tcp_segment(guest.addressing, False, 41000, 22, 1, 0, 0x02, 65535))
        await guest.expect(lambda r: r.tcp is not None and bool(r.tcp.flags & RST))
        stats = guest.stats()
    assert set(COUNTERS) <= set(stats)
    assert set(stats) - set(COUNTERS) == {"policy_denied_rule0"}
    assert any(_pattern(p).fullmatch("policy_denied_rule0") for p in PATTERNS)
    assert (stats["policy_denied"], stats["policy_denied_rule0"],
            stats["policy_denied_default"], stats["policy_allowed"]) == (1, 1, 0, 0)


def test_with_zeros_keeps_what_was_counted_and_adds_the_rest() -> None:
    out = with_zeros({"frames_in": 3, "policy_denied_rule2": 1})
    assert out["frames_in"] == 3 and out["policy_denied_rule2"] == 1
    assert set(out) == set(COUNTERS) | {"policy_denied_rule2"}
    assert sum(out.values()) == 4
