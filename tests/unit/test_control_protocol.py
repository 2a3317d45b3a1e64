"""The control socket (control/server.py) and `relaynat ctl` (control/client.py) without
root: a Relay and a ControlServer run in the test's own event loop and the protocol is
spoken over the real unix socket, as a hostile or clumsy client would; `relaynat ctl`'s
usage errors need no relay at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relaynat.config import RelayConfig
from relaynat.control.server import ControlServer
from relaynat.relay import Relay


@contextlib.asynccontextmanager
async def _served(path: str, **kwargs: float) -> AsyncIterator[Relay]:
    async with Relay(RelayConfig()) as relay:
        control = ControlServer(path, **kwargs)  # type: ignore[arg-type]
        await control.start(relay)
        try:
            yield relay
        finally:
            control.close()


class _Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, path: str) -> _Client:
        return cls(*await asyncio.open_unix_connection(path))

    async def send_line(self, line: bytes) -> dict:  # type: ignore[type-arg]
        self.writer.write(line + b"\n")
        await self.writer.drain()
        return json.loads(await asyncio.wait_for(self.reader.readline(), 5))

    async def call(self, command: str, arguments: object = None) -> dict:  # type: ignore[type-arg]
        request: dict[str, object] = {"execute": command}
        if arguments is not None:
            request["arguments"] = arguments
        return await self.send_line(json.dumps(request).encode())

    def close(self) -> None:
        self.writer.close()


async def test_socket_is_0600_and_forwards_come_and_go_by_id(tmp_path: Path) -> None:
    path = str(tmp_path / "ctl.sock")
    async with _served(path):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        c = await _Client.connect(path)
        assert await c.call("list_hostfwd") == {"return": {"entries": []}}
        added = (await c.call("add_hostfwd", {"proto": "tcp", "host_addr": "127.0.0.1",
                                              "host_port": 0, "guest_port": 80}))["return"]
        assert added["id"] == 1 and added["host_port"] > 0
        # A real listener: the kernel accepts on it (no guest: the relay then resets).
        with socket.create_connection(("127.0.0.1", added["host_port"]), timeout=2):
            pass
        second = (await c.call("add_hostfwd", {"proto": "udp", "host_addr": "::0001",
                                               "host_port": 0, "guest_port": 53}))["return"]
        assert second["id"] == 2 and second["host_addr"] == "::1"
        listed = (await c.call("list_hostfwd"))["return"]["entries"]
        assert [f["id"] for f in listed] == [1, 2]
        assert (await c.call("remove_hostfwd", {"id": 1}))["return"]["id"] == 1
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", added["host_port"]), timeout=2)
        # By address and port, spelled differently from how it was added.
        removed = await c.call("remove_hostfwd", {"proto": "udp", "host_addr": "0::1",
                                                  "host_port": second["host_port"]})
        assert removed["return"]["id"] == 2
        assert await c.call("remove_hostfwd", {"id": 2}) == {
            "error": {"desc": "no forward with id 2"}}
        # Ids are never reused.
        again = await c.call("add_hostfwd", {"proto": "tcp", "host_port": 0, "guest_port": 1})
        assert again["return"]["id"] == 3
        assert (await c.call("stats"))["return"]["tcp_flows"] == 0
        assert await c.call("flows") == {"return": {"flows": []}}
        c.close()


BAD_REQUESTS: list[tuple[bytes, str]] = [
    (b"\xff\xfe garbage \x00\x01", "request is not UTF-8 text"),
    (b"hello relay", "request is not JSON: Expecting value: line 1 column 1 (char 0)"),
    (b'{"execute": "stats"',
     "request is not JSON: Expecting ',' delimiter: line 1 column 20 (char 19)"),
    (b"[" * 60000, "request is not JSON: nested too deeply"),
    (b"[1, 2]", 'request must be a JSON object with "execute"'),
    (b'"stats"', 'request must be a JSON object with "execute"'),
    (b'{"arguments": {}}', 'request needs "execute": a command name'),
    (b'{"execute": 7}', 'request needs "execute": a command name'),
    (b'{"execute": "stats", "id": 1}', "unknown request key 'id' (known: execute, arguments)"),
    (b'{"execute": "reboot"}', "unknown command 'reboot' (known: add_hostfwd, export_flows, "
                               "flows, get_policy, handover, import_flows, list_hostfwd, names, "
                               "quit, release_exported, remove_hostfwd, set_policy, stats, watch)"),
    (b'{"execute": "stats", "arguments": [1]}', 'stats: "arguments" must be an object'),
    (b'{"execute": "stats", "arguments": {"x": 1}}',
     "stats: unknown argument 'x' (known: none)"),
    (b'{"execute": "add_hostfwd", "arguments": {"proto": "tcp", "host_port": 0}}',
     "add_hostfwd: missing argument 'guest_port'"),
    (b'{"execute": "add_hostfwd", "arguments": {"proto": "tcp", "host_port": "80", '
     b'"guest_port": 80}}', "add_hostfwd: argument 'host_port' must be an integer, not \"80\""),
    (b'{"execute": "add_hostfwd", "arguments": {"proto": "tcp", "host_port": 0, '
     b'"guest_port": true}}', "add_hostfwd: argument 'guest_port' must be an integer, not true"),
    (b'{"execute": "add_hostfwd", "arguments": {"proto": "sctp", "host_port": 0, '
     b'"guest_port": 1}}', "protocol 'sctp' cannot be forwarded (tcp or udp)"),
    (b'{"execute": "add_hostfwd", "arguments": {"proto": "tcp", "host_port": 0, '
     b'"guest_port": 70000}}', "ports out of range: host 0, guest 70000"),
    (b'{"execute": "add_hostfwd", "arguments": {"proto": "tcp", "host_addr": "nowhere", '
     b'"host_port": 0, "guest_port": 1}}', "'nowhere' is not an IP address"),
    (b'{"execute": "remove_hostfwd", "arguments": {"id": 1, "proto": "tcp"}}',
     'remove_hostfwd: give either "id" or proto/host_addr/host_port, not both'),
    (b'{"execute": "remove_hostfwd", "arguments": {"proto": "tcp", "host_port": 9}}',
     "no tcp forward on * port 9"),
    (b'{"execute": "set_policy", "arguments": {"cut": true}}',
     'set_policy: give "policy" (an object, or null for none) or "sandbox": true'),
    (b'{"execute": "set_policy", "arguments": {"policy": {"default": "maybe"}}}',
     "policy: default must be 'allow' or 'deny', not 'maybe'"),  # ConfigError's text
    (b'{"execute": "set_policy", "arguments": {"policy": {"rule": "x"}}}',
     "policy: 'rule' must be a list of rules ([[rule]] in TOML)"),
    (b'{"execute": "set_policy", "arguments": {"policy": {"default": "deny", '
     b'"default": "allow"}}}', "request is not JSON: duplicate key 'default' in a JSON object"),
    (b'{"execute": "stats", "execute": "quit"}',
     "request is not JSON: duplicate key 'execute' in a JSON object"),
]


async def test_bad_requests_get_exact_errors_and_the_connection_stays(tmp_path: Path) -> None:
    path = str(tmp_path / "ctl.sock")
    async with _served(path) as relay:
        c = await _Client.connect(path)
        for line, desc in BAD_REQUESTS:
            answer = await c.send_line(line)
            assert set(answer) == {"error"}, (line[:60], answer)
            assert answer["error"]["desc"] == desc, line[:60]
        # A forward on a port already taken: the ForwardError's text, verbatim.
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            answer = await c.call("add_hostfwd", {"proto": "tcp", "host_addr": "127.0.0.1",
                                                  "host_port": port, "guest_port": 1})
        assert answer == {"error": {"desc": f"cannot bind tcp 127.0.0.1:{port}: "
                                            "Address already in use"}}
        # Nothing above changed the relay, and the same connection still works.
        assert relay.policy is None and relay.forwards() == []
        assert "return" in await c.call("get_policy")
        c.close()


async def test_a_long_line_is_refused_and_closed(tmp_path: Path) -> None:
    path = str(tmp_path / "ctl.sock")
    async with _served(path):
        c = await _Client.connect(path)

        async def flood() -> None:
            with contextlib.suppress(ConnectionError):
                c.writer.write(b"x" * (1 << 20) + b"\n")
                await c.writer.drain()

        sender = asyncio.ensure_future(flood())
        answer = json.loads(await asyncio.wait_for(c.reader.readline(), 5))
        assert answer == {"error": {"desc": "request line longer than 65536 bytes; closing"}}
        # Closed: a unix socket closed with our unread bytes in it reports ECONNRESET.
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(c.reader.read(), 5) == b""
        await asyncio.wait_for(sender, 5)
        c.close()
        fresh = await _Client.connect(path)
        assert "return" in await fresh.call("stats")
        fresh.close()


async def test_a_half_written_request_is_closed_after_the_idle_timeout(tmp_path: Path) -> None:
    path = str(tmp_path / "ctl.sock")
    async with _served(path, idle_timeout_s=0.5):
        c = await _Client.connect(path)
        assert "return" in await c.call("stats")  # busy clients are not timed out
        c.writer.write(b'{"execute": "sta')
        await c.writer.drain()
        start = time.monotonic()
        assert await asyncio.wait_for(c.reader.read(), 5) == b""
        waited = time.monotonic() - start
        assert 0.4 < waited < 2.0, waited
        c.close()


async def test_at_most_16_clients_and_a_fresh_one_works_afterwards(tmp_path: Path) -> None:
    path = str(tmp_path / "ctl.sock")
    async with _served(path):
        clients = [await _Client.connect(path) for _ in range(17)]
        answers = []
        for c in clients:
            try:
                answers.append(await c.call("stats"))
            except (ConnectionError, json.JSONDecodeError):
                answers.append({"closed": True})
        ok = [a for a in answers if "return" in a]
        refused = [a for a in answers if "return" not in a]
        assert len(ok) == 16
        assert refused in ([{"error": {"desc": "too many control clients (at most 16)"}}],
                           [{"closed": True}])
        for c in clients:
            c.close()
        # The server notices the closes on its next reads; then there is room again.
        for _ in range(50):
            fresh = await _Client.connect(path)
            answer = await fresh.call("stats")
            fresh.close()
            if "return" in answer:
                break
            await asyncio.sleep(0.05)
        assert "return" in answer


async def test_a_stale_socket_is_replaced_and_a_regular_file_refused(tmp_path: Path) -> None:
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # bound, never listening: what a killed relay leaves
    async with _served(str(stale)):
        c = await _Client.connect(str(stale))
        assert "return" in await c.call("stats")
        c.close()
    plain = tmp_path / "notes.txt"
    plain.write_text("keep me")
    with pytest.raises(OSError, match="exists and is not a socket; refusing to replace it"):
        ControlServer(str(plain))
    assert plain.read_text() == "keep me"


def _ctl(sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relaynat", "ctl", "--socket", str(sock),
                           *args], capture_output=True, text=True, timeout=30)


def test_ctl_usage_errors_exit_2_and_unreachable_socket_exits_1(tmp_path: Path) -> None:
    missing = _ctl(tmp_path / "none.sock", "list")
    assert missing.returncode == 1
    assert missing.stderr == f"relaynat ctl: {tmp_path / 'none.sock'}: No such file or directory\n"
    for args in (("add", "tcp", "1-3:4"), ("remove", "x"), ("remove", "tcp", "a/1"),
                 ("policy", "set"), ("frobnicate",)):
        result = _ctl(tmp_path / "none.sock", *args)
        assert result.returncode == 2, (args, result)
        assert "usage: relaynat ctl" in result.stderr
    # A policy file is read as `--policy` reads it: a repeated key is refused, not the
    # last one kept (here it would turn a deny-all into allow-all).
    twice = tmp_path / "twice.json"
    twice.write_text('{"default": "deny", "rule": [], "default": "allow"}')
    result = _ctl(tmp_path / "none.sock", "policy", "set", str(twice))
    assert result.returncode == 2, result
    assert "duplicate key 'default'" in result.stderr, result.stderr


def test_an_echo_session_is_described_like_the_other_flows() -> None:
    from ipaddress import ip_address as ip

    from relaynat.events import Endpoint
    from relaynat.host.flowinfo import describe_echo
    from relaynat.host.icmp_relay import EchoSession

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        session = EchoSession((7, ip("10.0.2.2").packed, ip("10.0.2.15").packed), sock,
                              "127.0.0.1", ip("10.0.2.15").packed, b"\x02" * 6)
        session.bytes_from_guest, session.bytes_to_guest = 64, 64
        info = describe_echo(session)
        assert (info.guest_end, info.far, info.host_peer) == (
            Endpoint("10.0.2.15", 7), Endpoint("10.0.2.2", None), Endpoint("127.0.0.1", None))
        assert str(info.far) == "10.0.2.2" and str(info.guest_end) == "10.0.2.15:7"
        assert info.to_dict() == {
            "protocol": "icmp", "direction": "outbound", "guest": ["10.0.2.15", 7],
            "far": ["10.0.2.2", None], "host_peer": ["127.0.0.1", None], "state": "open",
            "bytes_from_guest": 64, "bytes_to_guest": 64, "guest_window": None,
            "rtt_us": None}
