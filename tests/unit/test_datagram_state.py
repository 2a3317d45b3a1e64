"""The records a handover carries UDP flows and ping sessions in (udp_flow.UdpFlowState,
icmp_echo.EchoSessionState): a flow goes on from its record as it was, every record
survives JSON, and each field is checked with the field named."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relaynat.flow_state import FlowStateError
from relaynat.icmp_echo import EchoSessionState, parse_sessions
from relaynat.udp_flow import UdpFlow, UdpFlowState, flow_from, parse_flows, state_of

GUEST, FAR = bytes([10, 0, 2, 15]), bytes([10, 0, 2, 2])


def _flow(**fields: Any) -> UdpFlow:
    flow = UdpFlow((41000, FAR, 5000, GUEST), 100.0, replied=True, quote=b"\x45" + bytes(27),
                   fixed_timeout=10.0)
    flow.bytes_from_guest, flow.bytes_to_guest = 123, 4567
    for name, value in fields.items():
        setattr(flow, name, value)
    return flow


def test_a_flow_goes_on_from_its_record_where_it_was() -> None:
    state = replace(state_of(_flow(), 103.5, 90.0, ("127.0.0.1", 5000), None), fd=7)
    assert (state.idle_s, state.age_s, state.fd, state.forward) == (3.5, 13.5, 7, None)
    again = UdpFlowState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert again == state
    flow = flow_from(again, 1000.0)  # another loop, another clock
    assert flow.key == (41000, FAR, 5000, GUEST)
    assert flow.last_activity == 996.5  # idle 3.5 s already
    assert (flow.replied, flow.quote, flow.fixed_timeout, flow.peer) == (
        True, b"\x45" + bytes(27), 10.0, None)
    assert (flow.bytes_from_guest, flow.bytes_to_guest) == (123, 4567)


def test_an_inbound_flow_keeps_its_client_as_recvfrom_gave_it() -> None:
    client = ("::ffff:127.0.0.1", 40123, 0, 0)
    state = state_of(_flow(peer=client), 100.0, 100.0, client, 2)
    again = UdpFlowState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert flow_from(again, 5.0).peer == client  # the key of the forward's client table


@pytest.mark.parametrize(("field", "value", "error"), [
    ("idle_s", -1, "field idle_s: -1 is not a number of seconds"),
    ("age_s", float("inf"), "field age_s: inf is not a number of seconds"),
    ("guest", ["10.0.2.15", 0], "field guest: ['10.0.2.15', 0] is not [address, port]"),
    ("far", ["fd00::2", 53], "fields guest and far: not the same address family"),
    ("quote", "zz", "field quote: non-hexadecimal"),
    ("fixed_timeout_s", 0, "field fixed_timeout_s: 0 is not a timeout"),
    ("replied", 1, "field replied: 1 is not true or false"),
    ("bytes_to_guest", -3, "field bytes_to_guest: -3 is not a 64-bit unsigned count"),
    ("forward", 0, "fields fd, forward: exactly one is set"),
    ("peer", ["127.0.0.1", 5000, 0, 0], "field peer: an outbound flow's peer is"),
    ("fd", "3", "field fd: '3' is not an index"),
])
def test_a_bad_udp_field_is_named(field: str, value: object, error: str) -> None:
    record = replace(state_of(_flow(), 101.0, 100.0, ("127.0.0.1", 5000), None),
                     fd=0).to_dict() | {field: value}
    with pytest.raises(FlowStateError) as caught:
        parse_flows([record])
    assert str(caught.value).startswith(f"flows[0]: {error}"), caught.value


def test_udp_records_missing_extra_or_twice_are_refused() -> None:
    record = replace(state_of(_flow(), 101.0, 100.0, ("127.0.0.1", 5000), None),
                     fd=0).to_dict()
    with pytest.raises(FlowStateError, match=re.escape("flows[0]: missing field(s) quote")):
        parse_flows([{k: v for k, v in record.items() if k != "quote"}])
    with pytest.raises(FlowStateError, match=re.escape("flows[0]: unknown field(s) later")):
        parse_flows([record | {"later": 1}])
    with pytest.raises(FlowStateError, match=re.escape("flows[1]: a second flow")):
        parse_flows([record, record | {"fd": 1}])
    with pytest.raises(FlowStateError, match="not a list"):
        parse_flows({"flows": []})


SESSION = EchoSessionState(guest=("10.0.2.15", 0x4242), far="10.0.2.2", host="127.0.0.1",
                           guest_mac=bytes.fromhex("525400123456"), fd=4, idle_s=2.5,
                           age_s=30.0, bytes_from_guest=64, bytes_to_guest=64)


def test_a_ping_session_survives_json() -> None:
    again = parse_sessions(json.loads(json.dumps([SESSION.to_dict()])))
    assert again == [SESSION]
    assert SESSION.key == (0x4242, FAR, GUEST)


@pytest.mark.parametrize(("field", "value", "error"), [
    ("host", "::1", "fields guest, far, host: not one address family"),
    ("guest", ["10.0.2.15", 70000], "field guest: ['10.0.2.15', 70000] is not [address, "
                                    "identifier]"),
    ("guest_mac", "52:54", "field guest_mac: '52:54' is not a MAC address"),
    ("idle_s", "1", "field idle_s: '1' is not a number of seconds"),
])
def test_a_bad_session_field_is_named(field: str, value: object, error: str) -> None:
    with pytest.raises(FlowStateError) as caught:
        parse_sessions([SESSION.to_dict() | {field: value}])
    assert str(caught.value).startswith(f"sessions[0]: {error}"), caught.value


@given(idle=st.floats(0, 1e6), age=st.floats(0, 1e6), replied=st.booleans(),
       counts=st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
       quote=st.binary(max_size=256), timeout=st.none() | st.floats(0.001, 1e6))
def test_every_udp_record_survives_json(idle: float, age: float, replied: bool,
                                        counts: tuple[int, int], quote: bytes,
                                        timeout: float | None) -> None:
    state = UdpFlowState(guest=("fd00::15", 1), far=("fd00::2", 65535), fd=3, forward=None,
                         peer=("::1", 53), idle_s=idle, age_s=age, replied=replied,
                         fixed_timeout_s=timeout, quote=quote, bytes_from_guest=counts[0],
                         bytes_to_guest=counts[1])
    assert parse_flows(json.loads(json.dumps([state.to_dict()]))) == [state]
