"""flow_state: the relaynat-flows document round-trips, and a corrupt, incomplete or
foreign one is refused with FlowStateError naming what is wrong, before any import."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relaynat.flow_state import (
    FORMAT,
    VERSION,
    FlowStateError,
    TcpFlowState,
    make_document,
    parse_document,
)
from relaynat.host.tcp_repair import RepairState

U32 = st.integers(0, 2**32 - 1)
PORT = st.integers(1, 65535)
MAC = st.binary(min_size=6, max_size=6)


@st.composite
def flow_states(draw: st.DrawFn) -> TcpFlowState:
    v6 = draw(st.booleans())
    addr = st.ip_addresses(v=6 if v6 else 4).map(str)
    snd_una = draw(U32)
    snd_nxt_off = draw(st.integers(0, 64))
    snd_max_off = snd_nxt_off + draw(st.integers(0, 64))
    rcv_nxt = draw(U32)
    repair = RepairState(
        family=socket.AF_INET6 if v6 else socket.AF_INET,
        local=(draw(addr), draw(PORT)), peer=(draw(addr), draw(PORT)),
        send_seq=draw(U32), recv_seq=draw(U32), send_queue=b"queued", unsent=draw(
            st.integers(0, 6)), recv_queue=draw(st.binary(min_size=snd_max_off)),
        mss=draw(st.integers(1, 65535)), snd_wscale=draw(st.none() | st.integers(0, 14)),
        rcv_wscale=draw(st.none() | st.integers(0, 14)), sack=draw(st.booleans()),
        timestamp=draw(st.none() | U32), window=draw(st.tuples(*[U32] * 5)),
        sndbuf=draw(st.integers(0, 2**31)), rcvbuf=draw(st.integers(0, 2**31)))
    return TcpFlowState(
        guest=(draw(addr), draw(PORT)), far=(draw(addr), draw(PORT)), inbound=draw(
            st.booleans()), guest_mac=draw(MAC), gateway_mac=draw(MAC), iss=draw(U32),
        snd_una=snd_una, snd_nxt=(snd_una + snd_nxt_off) % 2**32,
        snd_max=(snd_una + snd_max_off) % 2**32, guest_isn=draw(U32), rcv_nxt=rcv_nxt,
        last_ack_sent=(rcv_nxt - draw(st.integers(0, 1000))) % 2**32,
        guest_wnd_edge=draw(U32), guest_wscale=draw(st.integers(0, 14)),
        our_wscale=draw(st.integers(0, 14)), adv_edge=draw(U32),
        adv_field=draw(st.integers(0, 65535)), mss=draw(st.integers(1, 65535)),
        our_mss=draw(st.integers(1, 65535)), timestamps=draw(st.booleans()), tsval=draw(U32),
        ts_recent=draw(U32), retries=draw(st.integers(0, 255)),
        syn_retransmitted=draw(st.booleans()), rtt_exp=draw(st.integers(0, 15)),
        sack_ok=draw(st.booleans()), guest_srtt_us=draw(st.none() | st.integers(0, 10**7)),
        guest_rttvar_us=draw(st.integers(0, 10**7)), write_blocked=draw(st.booleans()),
        ack_pending=draw(st.booleans()),
        bytes_from_guest=draw(st.integers(0, 2**64 - 1)), bytes_to_guest=draw(
            st.integers(0, 2**64 - 1)), socket=repair)


def _wire(doc: dict[str, Any]) -> Any:
    return json.loads(json.dumps(doc))


@given(st.lists(flow_states(), max_size=3, unique_by=lambda s: s.key))
def test_document_round_trips_through_json(states: list[TcpFlowState]) -> None:
    not_moved = [{"protocol": "udp", "guest": ["10.0.2.15", 5353], "far": ["10.0.2.3", 53],
                  "reason": "udp flows do not move"}]
    doc = _wire(make_document(states, not_moved))
    assert doc["format"] == FORMAT and doc["version"] == VERSION
    assert doc["not_moved"] == not_moved
    assert parse_document(doc) == states


@given(flow_states(), st.data())
def test_a_missing_field_is_named(state: TcpFlowState, data: st.DataObject) -> None:
    flow = state.to_dict()
    name = data.draw(st.sampled_from(sorted(flow)))
    del flow[name]
    with pytest.raises(FlowStateError, match=rf"flows\[0\]: missing field\(s\) {name}$"):
        parse_document(_wire(make_document([], [])) | {"flows": [flow]})


@given(flow_states(), st.data())
def test_a_corrupt_field_is_refused_naming_it(state: TcpFlowState,
                                              data: st.DataObject) -> None:
    flow = state.to_dict()
    name = data.draw(st.sampled_from(sorted(flow)))
    corrupt = [-1, "x", [], {"bogus": 1}, 2**64]
    if name != "guest_srtt_us":  # null there: no round trip measured yet
        corrupt.append(None)
    flow[name] = data.draw(st.sampled_from(corrupt))
    with pytest.raises(FlowStateError, match=rf"flows\[0\]: field {name}: "):
        parse_document({"format": FORMAT, "version": VERSION, "flows": [flow],
                        "not_moved": []})


@given(flow_states())
def test_peeked_bytes_must_travel_in_the_receive_queue(state: TcpFlowState) -> None:
    flow = state.to_dict()
    flow["snd_max"] = (state.snd_una + len(state.socket.recv_queue) + 1) % 2**32
    flow["snd_nxt"] = flow["snd_max"]
    with pytest.raises(FlowStateError, match="receive queue holds only"):
        TcpFlowState.from_dict(flow)


@pytest.mark.parametrize(("doc", "message"), [
    ({"format": "other", "version": 1, "flows": [], "not_moved": []}, "not a relaynat-flows"),
    ({"format": FORMAT, "version": 3, "flows": [], "not_moved": []}, "version 3 is not"),
    ({"format": FORMAT, "version": 0, "flows": [], "not_moved": []}, "version 0 is not"),
    ({"format": FORMAT, "version": "2", "flows": [], "not_moved": []}, "version '2' is not"),
    ({"format": FORMAT, "version": 1, "flows": {}, "not_moved": []}, "needs lists"),
    ({"format": FORMAT, "version": 1, "flows": [], "not_moved": [], "x": 1}, "unknown: x"),
    ({"format": FORMAT, "version": 1, "flows": [7], "not_moved": []}, "not an object"),
    ("[]", "not a relaynat-flows"),
])
def test_a_foreign_document_is_refused(doc: Any, message: str) -> None:
    with pytest.raises(FlowStateError, match=message):
        parse_document(doc)


@given(flow_states())
def test_two_flows_with_one_key_are_refused(state: TcpFlowState) -> None:
    with pytest.raises(FlowStateError, match=r"flows\[1\]: a second flow"):
        parse_document(_wire(make_document([state, state], [])))


@given(flow_states())
def test_a_version_1_flow_goes_on_without_sack_and_round_trip(state: TcpFlowState) -> None:
    """A document of an older relaynat (before SACK and the round trip were carried) is
    still read; with the new fields it is refused, as any field its version lacks."""
    flow = state.to_dict()
    for name in ("sack_ok", "guest_srtt_us", "guest_rttvar_us"):
        del flow[name]
    doc = {"format": FORMAT, "version": 1, "flows": [flow], "not_moved": []}
    [parsed] = parse_document(_wire(doc))
    assert (parsed.sack_ok, parsed.guest_srtt_us, parsed.guest_rttvar_us) == (False, None, 0)
    assert parsed.to_dict() | {"sack_ok": state.sack_ok, "guest_srtt_us": state.guest_srtt_us,
                               "guest_rttvar_us": state.guest_rttvar_us} == state.to_dict()
    with pytest.raises(FlowStateError, match=r"flows\[0\]: unknown field\(s\) sack_ok$"):
        parse_document(_wire(doc | {"flows": [flow | {"sack_ok": True}]}))


@given(flow_states(), st.booleans())
def test_a_moved_flow_keeps_sack_and_the_guests_round_trip(state: TcpFlowState,
                                                          budget: bool) -> None:
    """entry_from continues SACK (when the importer holds out-of-order data at all, as
    for a new flow) and the RTO from the guest's measured round trip, not the initial
    1 s; state_of writes back what it read."""
    from collections import Counter

    from relaynat.flow_state import entry_from, state_of
    from relaynat.ooo_queue import OooBudget
    from relaynat.window import rto_s

    entry = entry_from(state, mtu=65520, vnet_hdr_len=0, offload=False, now=1.0,
                       idle_timeout_s=60.0,
                       ooo_budget=OooBudget(1 << 20, Counter()) if budget else None)
    assert entry.sack_ok == (state.sack_ok and budget)
    if state.guest_srtt_us is None:
        assert entry.guest_srtt is None
    else:
        assert entry.guest_srtt == pytest.approx(state.guest_srtt_us / 1e6)
        assert entry.guest_rttvar == pytest.approx(state.guest_rttvar_us / 1e6)
    rto = rto_s(state.retries, state.syn_retransmitted, entry.guest_srtt, entry.guest_rttvar)
    if state.snd_nxt != state.snd_una:  # data in flight: the RTO is armed at once
        assert entry.rto_at == pytest.approx(1.0 + rto)
    again = state_of(entry, state.key, state.inbound, 1.0, state.socket)
    assert again.guest_srtt_us == state.guest_srtt_us
    if state.guest_srtt_us is not None:
        assert again.guest_rttvar_us == state.guest_rttvar_us
    assert again.sack_ok == entry.sack_ok


def test_flow_state_error_is_a_value_error() -> None:
    assert issubclass(FlowStateError, ValueError)


@given(flow_states())
def test_a_moved_flow_holds_out_of_order_data_in_the_importers_budget(
        state: TcpFlowState) -> None:
    """entry_from gives the continued flow the importing relay's out-of-order budget
    (without it a moved flow went back to go-back-N); out-of-order data beyond its
    rcv_nxt is then held, charged to that budget."""
    from collections import Counter

    from relaynat.flow_state import entry_from
    from relaynat.ooo_queue import OooBudget
    from relaynat.wire import ACK, TcpSegment, seq_diff

    budget = OooBudget(1 << 20, Counter())
    entry = entry_from(state, mtu=65520, vnet_hdr_len=0, offload=False, now=1.0,
                       idle_timeout_s=60.0, ooo_budget=budget)
    assert entry.ooo_budget is budget
    guest, far = entry.template.params["dst"], entry.template.params["src"]
    ahead = TcpSegment(guest, far, state.guest[1], state.far[1],
                       (state.rcv_nxt + 100) % 2**32, state.snd_una, ACK, 0xFFFF,
                       memoryview(b"x" * 10))
    assert entry.on_guest_segment(ahead, 1.1) is None  # beyond a hole: held, not written
    held = entry.ooo is not None and entry.ooo.nbytes > 0
    # Held as far as it reaches into the window the relay advertised (adv_edge, from the
    # document), its edge taken as a signed distance from rcv_nxt (seq_diff), as the
    # queue takes it: the segment covers rcv_nxt + 100 .. rcv_nxt + 110.
    assert held == (seq_diff(state.adv_edge, state.rcv_nxt) > 100)
