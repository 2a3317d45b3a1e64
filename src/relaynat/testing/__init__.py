"""relaynat's testing kit: hypothesis strategies of guest frames and an in-memory guest.

Install with the ``testing`` extra (``pip install 'relaynat[testing]'``): the kit needs
hypothesis, which the relay itself does not.

* `relaynat.testing.strategies`: `valid_frames`, `broken_frames`, `tcp_conversations`,
  `frame_sequences` (hypothesis strategies, addressed to `RelayConfig`'s defaults).
* `relaynat.testing.frames`: the plain builders behind them and `LabeledFrame`.
* `InMemoryGuest`: a real `Relay` on a socketpair (qemu stream framing); a test sends
  frames and reads the relay's parsed replies, while the relay's host side uses real
  loopback sockets.
"""

from __future__ import annotations

try:
    import hypothesis  # noqa: F401 - imported for the check only
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "relaynat.testing needs hypothesis, an optional dependency: install it with "
        "pip install 'relaynat[testing]' (or pip install hypothesis)") from exc

from relaynat.testing.frames import DEFAULT_ADDRESSING, GUEST_MAC, Addressing, LabeledFrame
from relaynat.testing.guest import GuestTcp, InMemoryGuest, Reply
from relaynat.testing.strategies import (
    TcpConversation,
    broken_frames,
    frame_sequences,
    tcp_conversations,
    valid_frames,
)

__all__ = [
    "DEFAULT_ADDRESSING",
    "GUEST_MAC",
    "Addressing",
    "GuestTcp",
    "InMemoryGuest",
    "LabeledFrame",
    "Reply",
    "TcpConversation",
    "broken_frames",
    "frame_sequences",
    "tcp_conversations",
    "valid_frames",
]
