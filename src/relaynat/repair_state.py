"""The record of one established TCP connection's kernel state, as TCP_REPAIR reads it.

`RepairState` is what host/tcp_repair.py dumps from a socket and restores into a new one,
and what a flows document (flow_state.py) carries for each flow: both sequence numbers,
both queues' bytes, the negotiated options, the window state and the timestamp clock.
This module only builds, serialises and checks the record; the socket work is
host/tcp_repair.py's.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from relaynat.errors import Error

#: The address families a state names: Linux's AF_INET and AF_INET6 (socket.h), the
#: values socket.socket() takes; spelled here so the record needs no socket module.
AF_INET = 2
AF_INET6 = 10

#: Serialized format version: bump on any change of the fields' meaning.
FORMAT_VERSION = 1


class RepairError(Error, OSError):
    """A socket cannot be dumped or restored; the message says why."""


@dataclass(frozen=True, slots=True)
class RepairState:
    """Everything a new socket needs to continue one established connection."""

    family: int
    local: tuple[str, int]
    peer: tuple[str, int]
    #: Sequence number of the first byte of `send_queue` (the first unacknowledged
    #: byte), and of the first byte of `recv_queue` (the first unread byte).
    send_seq: int
    recv_seq: int
    send_queue: bytes
    #: How many bytes at the end of `send_queue` were never transmitted.
    unsent: int
    recv_queue: bytes
    mss: int
    #: Window scale shifts (RFC 7323 §2.2), or None when the option was not agreed.
    snd_wscale: int | None
    rcv_wscale: int | None
    sack: bool
    #: The socket's timestamp clock (TCP_TIMESTAMP), or None without RFC 7323 timestamps.
    timestamp: int | None
    #: snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup (struct tcp_repair_window).
    window: tuple[int, int, int, int, int]
    #: SO_SNDBUF and SO_RCVBUF as the kernel reports them (autotuning may have grown
    #: them far past a new socket's default; the queues must fit).
    sndbuf: int = 0
    rcvbuf: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"version": FORMAT_VERSION,
                "family": "ipv6" if self.family == AF_INET6 else "ipv4",
                "local": list(self.local), "peer": list(self.peer),
                "send_seq": self.send_seq, "recv_seq": self.recv_seq,
                "send_queue": base64.b64encode(self.send_queue).decode(),
                "unsent": self.unsent,
                "recv_queue": base64.b64encode(self.recv_queue).decode(),
                "mss": self.mss, "snd_wscale": self.snd_wscale, "rcv_wscale": self.rcv_wscale,
                "sack": self.sack, "timestamp": self.timestamp, "window": list(self.window),
                "sndbuf": self.sndbuf, "rcvbuf": self.rcvbuf}

    @classmethod
    def from_dict(cls, data: Any) -> RepairState:
        """Parse `to_dict`'s output; a wrong version or a malformed field raises
        RepairError naming it."""
        if not isinstance(data, dict):
            raise RepairError("TCP repair state is not an object")
        if data.get("version") != FORMAT_VERSION:
            raise RepairError(f"TCP repair state version {data.get('version')!r} is not "
                              f"{FORMAT_VERSION}")
        try:
            family = {"ipv4": AF_INET, "ipv6": AF_INET6}[data["family"]]
            state = cls(
                family=family, local=_endpoint(data["local"]), peer=_endpoint(data["peer"]),
                send_seq=_u32(data["send_seq"]), recv_seq=_u32(data["recv_seq"]),
                send_queue=base64.b64decode(data["send_queue"], validate=True),
                unsent=int(data["unsent"]),
                recv_queue=base64.b64decode(data["recv_queue"], validate=True),
                mss=int(data["mss"]), snd_wscale=_opt_shift(data["snd_wscale"]),
                rcv_wscale=_opt_shift(data["rcv_wscale"]), sack=bool(data["sack"]),
                timestamp=None if data["timestamp"] is None else _u32(data["timestamp"]),
                window=tuple(_u32(v) for v in data["window"]),  # type: ignore[arg-type]  # 5: checked below
                sndbuf=_u32(data["sndbuf"]), rcvbuf=_u32(data["rcvbuf"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise RepairError(f"TCP repair state field is malformed: {exc!r}") from None
        if len(state.window) != 5 or not 0 <= state.unsent <= len(state.send_queue):
            raise RepairError("TCP repair state window or unsent length is malformed")
        if not 0 < state.mss <= 0xFFFF:
            raise RepairError(f"TCP repair state MSS {state.mss} is out of range")
        return state


def _u32(value: Any) -> int:
    if not isinstance(value, int) or not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{value!r} is not a 32-bit unsigned number")
    return value


def _opt_shift(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or not 0 <= value <= 14:  # RFC 7323 §2.3: at most 14
        raise ValueError(f"window scale {value!r} is not 0..14")
    return value


def _endpoint(value: Any) -> tuple[str, int]:
    addr, port = value
    if not isinstance(addr, str) or not isinstance(port, int) or not 0 < port <= 0xFFFF:
        raise ValueError(f"{value!r} is not [address, port]")
    return addr, port
