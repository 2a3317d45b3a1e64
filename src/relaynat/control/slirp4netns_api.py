"""slirp4netns' own API dialect on a unix socket: `relaynat-slirp4netns --api-socket`,
which rootlesskit's and podman's slirp4netns port drivers speak (one request per
connection, slirp4netns 1.2's answers; see `Slirp4netnsApi`). The control socket of
`relaynat run`/`serve` is control/server.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from ipaddress import ip_address
from typing import TYPE_CHECKING, Any

from relaynat.control.server import IDLE_TIMEOUT_S, MAX_CLIENTS
from relaynat.host.forward import ForwardError
from relaynat.transports.stream import bind_unix_listener

if TYPE_CHECKING:
    from relaynat.relay import Relay

log = logging.getLogger("relaynat.control")

#: slirp4netns reads one request of at most this many bytes per connection (api.c).
SLIRP_MAX_REQUEST = 4096


class Slirp4netnsApi:
    """The `--api-socket` of `relaynat-slirp4netns`: slirp4netns 1.2's API, byte for
    byte in shape, which rootlesskit's and podman's slirp4netns port drivers speak.

    Unlike the control socket (control/server.py), slirp4netns serves one request per
    connection: the client writes a JSON object (no newline needed) and shuts down its
    writing side; the answer is one JSON object, without a newline, and the connection is closed.
    Answers: add_hostfwd `{"return":{"id":N}}`; list_hostfwd `{"entries":[{"id","proto",
    "host_addr","host_port","guest_addr","guest_port"}]}` (bare, without the "return"
    the other answers have: so slirp4netns 1.2 answers it); remove_hostfwd
    (`id`) `{"return":{}}`; errors `{"error":{"desc":"bad request: ..."}}` with
    slirp4netns' descriptions where it has one. Forwards go to `guest_addr`, the guest's
    address (slirp4netns' default); another guest address is refused, relaynat serving
    one guest per link. A `host_port` or `guest_port` of 0 is refused, as slirp4netns
    refuses it. IPv4 host addresses only, as slirp4netns."""

    def __init__(self, path: str, guest_addr: str, *,
                 idle_timeout_s: float = IDLE_TIMEOUT_S, max_clients: int = MAX_CLIENTS) -> None:
        self.path = path
        self.guest_addr = guest_addr
        self.idle_timeout_s = idle_timeout_s
        self.max_clients = max_clients
        self._sock = bind_unix_listener(path, backlog=max_clients)
        self._relay: Relay | None = None
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self, relay: Relay) -> None:
        self._relay = relay
        self._server = await asyncio.start_unix_server(self._client, sock=self._sock,
                                                       limit=SLIRP_MAX_REQUEST)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        else:
            self._sock.close()
        for task in self._clients:
            task.cancel()
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._clients) >= self.max_clients:
            writer.close()
            return
        self._clients.add(task)
        try:
            data = await self._read_request(reader)
            if data:
                writer.write(json.dumps(self.answer(data), separators=(",", ":")).encode())
                await asyncio.wait_for(writer.drain(), self.idle_timeout_s)
        except (ConnectionError, asyncio.CancelledError, TimeoutError):
            pass
        except Exception:  # a bug here must not end the relay's loop
            log.exception("slirp4netns API client failed")
        finally:
            self._clients.discard(task)
            writer.close()

    async def _read_request(self, reader: asyncio.StreamReader) -> bytes:
        """The request, at most SLIRP_MAX_REQUEST bytes (a longer one is answered "too
        large message", as slirp4netns answers it): complete once it parses as JSON
        (slirp4netns answers after one read, so a client need not shut down its writing
        side), at a newline, at EOF, or when the client stays silent `idle_timeout_s`
        (then answered for what came, perhaps "cannot parse JSON")."""
        data = b""
        while len(data) < SLIRP_MAX_REQUEST and b"\n" not in data:
            try:
                chunk = await asyncio.wait_for(reader.read(SLIRP_MAX_REQUEST - len(data)),
                                               self.idle_timeout_s)
            except TimeoutError:
                break
            if not chunk:
                break
            data += chunk
            if _parses(data):
                break
        return data

    def answer(self, data: bytes) -> dict[str, Any]:
        """The answer object to one request's bytes; never raises."""
        if len(data) >= SLIRP_MAX_REQUEST:
            return _slirp_error("too large message")
        try:
            request = json.loads(data.decode())
        except (UnicodeDecodeError, ValueError, RecursionError):
            return _slirp_error("cannot parse JSON")
        if not isinstance(request, dict):
            return _slirp_error("json_object() failed")
        execute = request.get("execute")
        if not isinstance(execute, str):
            return _slirp_error("no execute found")
        args = request.get("arguments")
        args = args if isinstance(args, dict) else {}
        if self._relay is None:
            return _slirp_error(f"{execute}: the relay is not running")
        if execute == "add_hostfwd":
            return self._add(self._relay, args)
        if execute == "list_hostfwd":
            # No "return" around it: slirp4netns 1.2 answers list_hostfwd so (api.c).
            return {"entries": [self._entry(f) for f in self._relay.forwards()]}
        if execute == "remove_hostfwd":
            number = _slirp_number(args.get("id"))
            try:
                self._relay.remove_forward(forward_id=number)
            except ForwardError:
                return _slirp_error("remove_hostfwd: bad arguments.id")
            return {"return": {}}
        return _slirp_error("unknown execute")

    def _add(self, relay: Relay, args: dict[str, Any]) -> dict[str, Any]:
        proto = args.get("proto")
        if proto not in ("tcp", "udp"):
            return _slirp_error("add_hostfwd: bad arguments.proto")
        host_addr = args.get("host_addr") or "0.0.0.0"
        if not _is_ipv4(host_addr):
            return _slirp_error("add_hostfwd: bad arguments.host_addr")
        host_port = _slirp_number(args.get("host_port"))
        if not 0 < host_port < 65536:
            return _slirp_error("add_hostfwd: bad arguments.host_port")
        guest_addr = args.get("guest_addr") or self.guest_addr
        if not _is_ipv4(guest_addr):
            return _slirp_error("add_hostfwd: bad arguments.guest_addr")
        if str(ip_address(guest_addr)) != self.guest_addr:
            return _slirp_error(f"add_hostfwd: bad arguments.guest_addr (relaynat forwards "
                                f"to the guest's address {self.guest_addr} only)")
        guest_port = _slirp_number(args.get("guest_port"))
        if not 0 < guest_port < 65536:
            return _slirp_error("add_hostfwd: bad arguments.guest_port")
        try:
            forward = relay.add_forward(proto, str(ip_address(host_addr)), host_port,
                                        guest_port)
        except (ForwardError, OSError) as exc:
            return _slirp_error(f"add_hostfwd: {exc}")
        return {"return": {"id": forward.id}}

    def _entry(self, forward: dict[str, object]) -> dict[str, object]:
        return {"id": forward["id"], "proto": forward["proto"],
                "host_addr": forward["host_addr"] or "0.0.0.0",
                "host_port": forward["host_port"], "guest_addr": self.guest_addr,
                "guest_port": forward["guest_port"]}


def _parses(data: bytes) -> bool:
    try:
        json.loads(data)
    except (ValueError, RecursionError):
        return False
    return True


def _slirp_error(desc: str) -> dict[str, Any]:
    return {"error": {"desc": f"bad request: {desc}"}}


def _slirp_number(value: object) -> int:
    """A JSON number as slirp4netns reads it (parson's dotget_number cast to int): 0
    when absent or not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    try:
        return int(value)
    except (OverflowError, ValueError):
        return 0


def _is_ipv4(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        return ip_address(value).version == 4
    except ValueError:
        return False
