"""The TCP_REPAIR record (repair_state.py): a corrupt state is refused naming the field,
and any state round-trips through JSON. Moving a real connection:
tests/integration/test_tcp_repair.py.
"""

from __future__ import annotations

import json
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relaynat.repair_state import FORMAT_VERSION, RepairError, RepairState

_STATE = {"version": FORMAT_VERSION, "family": "ipv4", "local": ["10.0.0.1", 1000],
          "peer": ["10.0.0.2", 80], "send_seq": 1, "recv_seq": 2, "send_queue": "YWJj",
          "unsent": 1, "recv_queue": "", "mss": 1460, "snd_wscale": 7, "rcv_wscale": 7,
          "sack": True, "timestamp": 12345, "window": [1, 2, 3, 4, 5],
          "sndbuf": 87040, "rcvbuf": 131072}


@pytest.mark.parametrize(("change", "message"), [
    ({"version": 99}, "version 99"),
    ({"send_seq": -1}, "malformed"),
    ({"send_queue": "***"}, "malformed"),
    ({"unsent": 4}, "unsent"),
    ({"snd_wscale": 15}, "malformed"),
    ({"mss": 0}, "MSS"),
    ({"family": "ipx"}, "malformed"),
    ({"local": ["10.0.0.1", 0]}, "malformed"),
])
def test_a_corrupt_state_is_refused_naming_the_field(change: dict[str, object],
                                                     message: str) -> None:
    with pytest.raises(RepairError, match=message):
        RepairState.from_dict({**_STATE, **change})


@given(st.builds(
    RepairState, family=st.sampled_from([socket.AF_INET, socket.AF_INET6]),
    local=st.tuples(st.ip_addresses().map(str), st.integers(1, 65535)),
    peer=st.tuples(st.ip_addresses().map(str), st.integers(1, 65535)),
    send_seq=st.integers(0, 2**32 - 1), recv_seq=st.integers(0, 2**32 - 1),
    send_queue=st.just(b"0123456789"), unsent=st.integers(0, 10), recv_queue=st.binary(),
    mss=st.integers(1, 65535), snd_wscale=st.none() | st.integers(0, 14),
    rcv_wscale=st.none() | st.integers(0, 14), sack=st.booleans(),
    timestamp=st.none() | st.integers(0, 2**32 - 1),
    window=st.tuples(*[st.integers(0, 2**32 - 1)] * 5),
    sndbuf=st.integers(0, 2**31), rcvbuf=st.integers(0, 2**31)))
def test_state_round_trips_through_json(state: RepairState) -> None:
    assert RepairState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
