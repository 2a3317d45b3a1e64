"""Helpers shared by the test lanes and the benchmarks.

Library modules are imported as `support.NAME` (pytest puts tests/ on sys.path, since
tests/ itself is not a package). Several are also programs, run as files in their own
process or inside a guest namespace (host_peers, dns_peer, control_probe, paced_peer,
netshim, guest_tools, guest_flood, vmguest): their command lines use `SUPPORT / "NAME.py"`.
"""

from __future__ import annotations

from pathlib import Path

#: This directory: where the helper programs live.
SUPPORT = Path(__file__).resolve().parent
#: tests/guests/: the programs tests run inside a guest namespace or as host peers.
GUESTS = SUPPORT.parent / "guests"
