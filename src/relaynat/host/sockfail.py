"""Counting the host sockets a guest's new flow could not get.

socket() fails with EMFILE when the relay reaches its RLIMIT_NOFILE (`ulimit -n`) and
ENFILE at the system-wide limit. The guest decides how often that happens (one SYN
or datagram each), so each failure is counted, under its own name for descriptor
exhaustion, and the log says so at most once a minute per kind instead of once per
flow: a flood must not become a log flood.
"""

from __future__ import annotations

import errno
import time
from collections import Counter

from relaynat.guest_log import guest_logger

log = guest_logger("relaynat.sockets")

#: socket(2): the process's descriptor limit, or the system's.
FD_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE})
_WARN_EVERY_S = 60.0
_last_warned: dict[str, float] = {}


def count_socket_failure(stats: Counter[str], exc: OSError, fd_counter: str,
                         other_counter: str, what: str) -> None:
    """`exc` from socket() for a new flow (`what`, e.g. "TCP"): counted as
    `fd_counter` if descriptors ran out, else as `other_counter`; logged, rate-limited."""
    counter = fd_counter if exc.errno in FD_EXHAUSTED else other_counter
    stats[counter] += 1
    now = time.monotonic()
    if now - _last_warned.get(counter, -_WARN_EVERY_S) >= _WARN_EVERY_S:
        _last_warned[counter] = now
        hint = (" (raise `ulimit -n`, or lower the flow maxima)" if counter == fd_counter
                else "")
        log.warning("cannot open a host %s socket: %s; refusing such flows, counted "
                    "as %s%s", what, exc, counter, hint)
