"""Sysctls the integration tests change, always inside the suite's private network
namespace (conftest.py) and always restored."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest

PING_RANGE = "/proc/sys/net/ipv4/ping_group_range"
#: Every group may open ping sockets (ICMP and ICMPv6; a new namespace allows nobody).
ALL_GROUPS = "0 2147483647"


@contextlib.contextmanager
def ping_group_range(value: str) -> Iterator[None]:
    """Set net.ipv4.ping_group_range (per network namespace) and restore it."""
    if os.environ.get("RELAYNAT_TEST_NETNS_DONE") != "1":
        pytest.skip("not in the suite's private network namespace; not touching sysctls")
    with open(PING_RANGE) as f:
        old = f.read().split()
    with open(PING_RANGE, "w") as f:
        f.write(value)
    try:
        yield
    finally:
        with open(PING_RANGE, "w") as f:
            f.write(" ".join(old))
