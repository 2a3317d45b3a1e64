"""Test-session setup: everything runs inside a private network namespace.

When the suite runs as root, the pytest process unshares its network namespace at
import time, before any thread exists, and brings up `lo`. Every relay, server, guest
namespace and benchmark a test starts is then a descendant of that namespace, so even
a buggy relay that connects somewhere unexpected reaches nothing outside this machine.
Integration tests need root; without it they are skipped with that reason, visibly.
"""

from __future__ import annotations

import os

import pytest

from relaynat.netns_util import isolate_network

IS_ROOT = os.geteuid() == 0
if IS_ROOT and os.environ.get("RELAYNAT_TEST_NETNS_DONE") != "1":
    isolate_network()
    # Children (pytest-xdist workers, re-invocations) inherit this namespace already.
    os.environ["RELAYNAT_TEST_NETNS_DONE"] = "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IS_ROOT:
        return
    skip = pytest.mark.skip(reason="needs root for network namespaces and TAP devices")
    for item in items:
        if "integration" in item.keywords or "vm" in item.keywords:
            item.add_marker(skip)
