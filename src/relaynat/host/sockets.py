"""Host-socket housekeeping shared by the relays: buffer sizes, and counting the host
sockets a guest's new flow could not get.

socket() fails with EMFILE when the relay reaches its RLIMIT_NOFILE (`ulimit -n`) and
ENFILE at the system-wide limit. The guest decides how often that happens (one SYN
or datagram each), so each failure is counted, under its own name for descriptor
exhaustion, and the log says so at most once a minute per kind instead of once per
flow: a flood must not become a log flood.
"""

from __future__ import annotations

import errno
import socket
import time
from collections import Counter

from relaynat.guest_log import guest_logger

log = guest_logger("relaynat.sockets")

#: socket(2): the process's descriptor limit, or the system's.
FD_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE})
_WARN_EVERY_S = 60.0
_last_warned: dict[str, float] = {}

#: The receive buffer of every host UDP socket (flows and UDP forwards): room for the
#: datagrams that arrive while the loop serves others. The default (rmem_default, 208
#: KiB) lost 0.5-1 % of a 1 Gbit/s host->guest stream, 1 MiB 0.1-0.2 % (benches/run.py
#: --workloads udp). A limit, not an allocation; the kernel's udp_mem bounds all of them
#: together.
UDP_RCVBUF = 1 << 20
#: socket(7): as SO_SNDBUF and SO_RCVBUF, but past net.core.wmem_max and rmem_max (208 KiB
#: on a stock Debian 12), with CAP_NET_ADMIN. Python's socket module does not name them.
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33


def size_udp_rcvbuf(sock: socket.socket) -> None:
    """Give `sock` UDP_RCVBUF of receive buffer (the kernel doubles the figure for its
    bookkeeping, socket(7)); without CAP_NET_ADMIN, as much as rmem_max allows."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, UDP_RCVBUF)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)


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
