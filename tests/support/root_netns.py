"""Watch the network namespace the suite started in, so a test that changes it fails.

The suite moves itself into a private namespace (tests/conftest.py), but a relay told to
join "a namespace" by PID or path can still land in the machine's own one: a TAP device
and a default route left there once cut the machine off its network. `RootNetnsWatch`
keeps a sleeper process in the original namespace and reads that namespace's links and
routes through the sleeper's /proc/PID/net files (plain reads, no namespace switch), so
the conftest can compare them after every integration test and name the test that
changed them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

# /proc/net/route columns kept: Iface, Destination, Gateway, Flags, Metric, Mask (RefCnt
# and Use change with traffic). /proc/net/ipv6_route: destination and prefix length,
# source and its length, next hop, metric, flags, device (refcnt and use dropped).
_ROUTE_COLUMNS = (0, 1, 2, 3, 6, 7)
_ROUTE6_COLUMNS = (0, 1, 2, 3, 4, 5, 8, 9)
# Routes learned from router advertisements come and go with their lifetimes
# (RTF_EXPIRES, include/uapi/linux/ipv6_route.h): the machine's doing, not a test's.
_RTF_EXPIRES = 0x00400000


class RootNetnsWatch:
    """A sleeper in the watched namespace and a snapshot of its links and routes."""

    def __init__(self, pid: int, sleeper: subprocess.Popen[bytes] | None = None) -> None:
        self.pid = pid
        self._sleeper = sleeper
        self.baseline = self.snapshot()

    @classmethod
    def start(cls) -> RootNetnsWatch:
        """Watch the namespace this process is in now (call before leaving it)."""
        sleeper = subprocess.Popen(["sleep", "infinity"], stdin=subprocess.DEVNULL)
        return cls(sleeper.pid, sleeper)

    def snapshot(self) -> frozenset[str]:
        net = Path(f"/proc/{self.pid}/net")
        links = [f"link {line.split(':', 1)[0].strip()}"
                 for line in (net / "dev").read_text().splitlines()[2:]]
        routes = [" ".join(line.split()[i] for i in _ROUTE_COLUMNS)
                  for line in (net / "route").read_text().splitlines()[1:]]
        routes6 = [" ".join(fields[i] for i in _ROUTE6_COLUMNS)
                   for fields in map(str.split, (net / "ipv6_route").read_text().splitlines())
                   if not int(fields[8], 16) & _RTF_EXPIRES]
        return frozenset(links + [f"route {r}" for r in routes]
                         + [f"route6 {r}" for r in routes6])

    def changes(self) -> list[str]:
        """What differs from the baseline: "+ ..." added, "- ..." gone."""
        now = self.snapshot()
        return ([f"+ {item}" for item in sorted(now - self.baseline)]
                + [f"- {item}" for item in sorted(self.baseline - now)])

    def accept(self) -> None:
        """Take the namespace as it is now as the new baseline."""
        self.baseline = self.snapshot()

    def stop(self) -> None:
        """End the sleeper this watch started (a watch of another's process leaves it)."""
        if self._sleeper is not None:
            self._sleeper.kill()
            self._sleeper.wait()
