"""relaynat's testing kit: hypothesis strategies of guest frames and an in-memory guest.

Install with the ``testing`` extra (``pip install 'relaynat[testing]'``): the kit needs
hypothesis, which the relay itself does not.

* `relaynat.testing.strategies`: `valid_frames`, `broken_frames`, `tcp_conversations`,
  `frame_sequences` (hypothesis strategies, addressed to `RelayConfig`'s defaults).
* `relaynat.testing.frames`: the plain builders behind them, `LabeledFrame`, and the TCP
  flags (`SYN`, `ACK`, ...).
* `InMemoryGuest`: a real `Relay` on a socketpair (qemu stream framing); a test sends
  frames and reads the relay's replies, each a `Reply` parsed into the types below
  (`EthernetFrame`, `ArpPacket`, `Ipv4Packet` or `Ipv6Packet`, `TcpSegment`,
  `UdpDatagram`), while the relay's host side uses real loopback sockets.
* `relaynat.testing.sink`: where the strategies' TCP and UDP to the host go unless told
  otherwise: a loopback port the kit owns (`InMemoryGuest.sink_port`), never a port of
  the machine's own services.

Everything a test needs is importable from here (`from relaynat.testing import
InMemoryGuest, LabeledFrame, SYN, broken_frames`).
"""

from __future__ import annotations

try:
    import hypothesis  # noqa: F401 - imported for the check only
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "relaynat.testing needs hypothesis, an optional dependency: install it with "
        "pip install 'relaynat[testing]' (or pip install hypothesis)") from exc

from relaynat.testing.frames import (
    ACK,
    CWR,
    DEFAULT_ADDRESSING,
    ECE,
    FIN,
    GUEST_MAC,
    PSH,
    RST,
    SYN,
    URG,
    Addressing,
    LabeledFrame,
)
from relaynat.testing.guest import GuestTcp, InMemoryGuest, Reply
from relaynat.testing.strategies import (
    Port,
    TcpConversation,
    broken_frames,
    frame_sequences,
    tcp_conversations,
    valid_frames,
)
from relaynat.wire import (
    ArpPacket,
    EthernetFrame,
    IpPacket,
    Ipv4Packet,
    Ipv6Packet,
    MalformedFrame,
    TcpSegment,
    UdpDatagram,
)

# Grouped by use, not sorted: pdoc lists the names in this order.
__all__ = [  # noqa: RUF022
    # The guest and its replies.
    "InMemoryGuest",
    "GuestTcp",
    "Reply",
    "EthernetFrame",
    "ArpPacket",
    "IpPacket",
    "Ipv4Packet",
    "Ipv6Packet",
    "TcpSegment",
    "UdpDatagram",
    "MalformedFrame",
    # Frames and the strategies that draw them.
    "LabeledFrame",
    "Addressing",
    "DEFAULT_ADDRESSING",
    "GUEST_MAC",
    "valid_frames",
    "broken_frames",
    "tcp_conversations",
    "frame_sequences",
    "TcpConversation",
    "Port",
    # TCP flags.
    "FIN",
    "SYN",
    "RST",
    "PSH",
    "ACK",
    "URG",
    "ECE",
    "CWR",
]
