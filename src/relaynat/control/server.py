"""Runtime control of a running relay over a unix stream socket (`--control-socket`).

The protocol follows slirp4netns's `--api-socket`: newline-delimited JSON, one request
object per line, any number per connection, each answered by one line::

    {"execute": "add_hostfwd", "arguments": {"proto": "tcp", "host_addr": "127.0.0.1",
                                             "host_port": 0, "guest_port": 80}}
    {"return": {"id": 1, "proto": "tcp", "host_addr": "127.0.0.1", "host_port": 41234, ...}}

Commands: add_hostfwd, list_hostfwd, remove_hostfwd (`id`, or `proto`, `host_addr`,
`host_port`), stats, flows, names (the names the guest's DNS answers gave
addresses for, still valid for the policy's domain rules), get_policy, set_policy
(`policy`: a policy dict as `Policy.from_dict` takes, or null for none; or `sandbox`:
true; and `cut`: bool), export_flows, import_flows (`file`), release_exported
(`reset`: bool) and quit (control/flows_file.py); handover (`to`: the path where a new
relay process waits, moving/handover.py; the relay answers once the new one took over,
then exits).
A request that cannot be served gets `{"error": {"desc": "..."}}` saying why, and the
connection stays usable.

Passing a descriptor (export_flows, import_flows, handover): a confined relay can open
no path (docs/confinement.md), so `relaynat ctl`, which runs with the operator's
rights, opens the flows file or connects to the new relay's socket itself and passes
the descriptor; the relay then uses it and never the path (`file`/`to` only name it in
answers and logs). The exchange, one descriptor per request::

    -> {"execute": "export_flows", "arguments": {"file": PATH, "fd": true}}
    <- {"send_fd": true}
    -> one byte (any value) with the descriptor attached (SCM_RIGHTS), nothing else
    <- {"return": ...} or {"error": ...}

The relay stops reading the connection before it sends `send_fd` and takes the byte
with recvmsg(2) itself: the stream transport's own reads (uvloop's and asyncio's alike)
have no room for ancillary data, and the kernel would close a descriptor that came
with a byte they read. So the client must send the byte only after `send_fd`. A request
that fails its checks is answered with its error instead of `send_fd`, and nothing is
to be sent. The descriptor must be of the command's kind (a regular file opened for
writing, for reading, a connected unix seqpacket socket), else the error says so and
the connection serves on; a byte that comes without exactly one descriptor, or none
within `idle_timeout_s`, is answered with an error and the connection is closed (what
the client sends next cannot be told apart from the descriptor's byte). A path without
`fd` is opened or connected to by the relay itself, as before: what an unconfined
relay still takes from older clients.

Bounds, so that no client can hurt the relay: a line longer than `max_line` bytes gets
an error and the connection is closed; a client silent (or half-way through a line)
for `idle_timeout_s`, or not reading its answers for as long, is closed; at most
`max_clients` connections at once, a further one gets an error line and is closed.
Requests are handled between reads, synchronously but for handover and import_flows
(whose document is read in a worker thread, control/flows_file.py), and do no blocking I/O
on the loop but export_flows' write; every exception a request can raise ends as an
error answer, never out of the server.

Why a path socket and not an abstract one or TCP: the guest's traffic only ever reaches
host sockets the relay opens itself, and the relay never listens on an inet socket
for control, so the guest cannot connect here. An abstract unix socket would be
reachable by any process in the relay's network namespace (abstract names are scoped
per network namespace and carry no permissions); a path socket is governed by its file
mode, created 0600 before it can accept anything (stream.bind_unix_listener), so only
the relay's user (and root) may connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from ipaddress import ip_address
from typing import TYPE_CHECKING, Any, cast

from relaynat.config import ConfigError, unique_keys
from relaynat.control import flows_file
from relaynat.errors import Error
from relaynat.events import Event, event_dict
from relaynat.host.forward import ForwardError
from relaynat.policy import Policy
from relaynat.transports.stream import bind_unix_listener

if TYPE_CHECKING:
    from relaynat.relay import Relay

log = logging.getLogger("relaynat.control")

MAX_LINE = 64 << 10
IDLE_TIMEOUT_S = 10.0
#: Events a `watch` client may be behind by before they are dropped (the relay never
#: waits for it: `Relay.events`).
WATCH_QUEUE = 4096
MAX_CLIENTS = 16
#: Requests per connection before it is closed (a client simply reconnects); bounds
#: the serving loop.
MAX_REQUESTS = 1 << 20
#: Descriptors taken with the byte that should carry one: more than one is refused, and
#: any beyond this many are closed by the kernel (MSG_CTRUNC).
_MAX_PASSED = 4


class RequestError(Error, Exception):
    """A request that cannot be served; the message is the error's `desc`."""


#: Argument types per command: name -> (accepted types, required). bool is checked
#: apart from int (JSON true is not a port number).
_Spec = dict[str, tuple[tuple[type, ...], bool]]
_SPECS: dict[str, _Spec] = {
    "add_hostfwd": {"proto": ((str,), True), "host_addr": ((str, type(None)), False),
                    "host_port": ((int,), True), "guest_port": ((int,), True),
                    "interface": ((str, type(None)), False)},
    "list_hostfwd": {},
    "remove_hostfwd": {"id": ((int,), False), "proto": ((str,), False),
                       "host_addr": ((str, type(None)), False), "host_port": ((int,), False)},
    "stats": {},
    "flows": {},
    "names": {},
    "get_policy": {},
    "watch": {},
    "set_policy": {"policy": ((dict, type(None)), False), "sandbox": ((bool,), False),
                   "cut": ((bool,), False)},
    **flows_file.SPECS,
    "handover": {"to": ((str,), True), "fd": ((bool,), False)},
}
_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", dict: "an object",
               type(None): "null"}


def _check_arguments(command: str, args: object) -> dict[str, Any]:
    spec = _SPECS[command]
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise RequestError(f"{command}: \"arguments\" must be an object")
    extra = sorted(set(args) - set(spec))
    if extra:
        raise RequestError(f"{command}: unknown argument {extra[0]!r} (known: "
                           f"{', '.join(sorted(spec)) or 'none'})")
    for name, (types, required) in spec.items():
        if name not in args:
            if required:
                raise RequestError(f"{command}: missing argument {name!r}")
            continue
        value = args[name]
        wrong = isinstance(value, bool) and bool not in types
        if wrong or not isinstance(value, types):
            want = " or ".join(_TYPE_NAMES[t] for t in types)
            raise RequestError(f"{command}: argument {name!r} must be {want}, not "
                               f"{json.dumps(value)[:40]}")
    return args


def _address(value: str | None) -> str | None:
    """An address as the forwarder stores it (str of ip_address), so that "::0001" and
    "::1" name the same forward; anything else is left for ForwardError to explain."""
    if value is None:
        return None
    try:
        return str(ip_address(value))
    except ValueError:
        return value


class ControlServer:
    """The control socket of one relay. `ControlServer(path)` binds at once (so a bad
    path fails before anything starts; clients wait in the backlog), `start(relay)`
    serves, `close()` stops and removes the socket file. `sock`: serve this listening
    socket on `path` instead (taken over from another process, moving/handover.py).

    `on_handover(to, fd=...)`, when set, serves the handover command (`fd`: the
    connected socket a client passed, else None: connect to the path `to`);
    `handed_over` is set once its answer was sent, and `close(unlink=False)` then leaves
    the socket file to the relay that took over."""

    def __init__(self, path: str, *, idle_timeout_s: float = IDLE_TIMEOUT_S,
                 max_clients: int = MAX_CLIENTS, max_line: int = MAX_LINE,
                 sock: socket.socket | None = None, watch_queue: int = WATCH_QUEUE) -> None:
        self.path = path
        self.idle_timeout_s = idle_timeout_s
        #: Events a `watch` client may be behind by before they are dropped.
        self.watch_queue = watch_queue
        self.max_clients = max_clients
        self.max_line = max_line
        self._sock = sock or bind_unix_listener(path, backlog=max_clients)
        self.on_handover: Callable[..., Awaitable[object]] | None = None
        self.handed_over = asyncio.Event()
        self._handing_over: set[asyncio.Task[Any] | None] = set()
        self._importing = asyncio.Lock()
        self._relay: Relay | None = None
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self._handlers: dict[str, Callable[[Relay, dict[str, Any]], object]] = {
            "add_hostfwd": _add_hostfwd, "list_hostfwd": _list_hostfwd,
            "remove_hostfwd": _remove_hostfwd, "stats": _stats, "flows": _flows,
            "names": _names,
            "get_policy": _get_policy, "set_policy": _set_policy, "watch": _watch,
            **self._flow_handlers(),
            "handover": self._handover,
        }
        #: `quit` calls it (the serving loop's stop); None: this relay cannot quit so.
        self.on_quit: Callable[[], None] | None = None
        #: Called once, after the first `import_flows` that succeeds (`serve
        #: --incoming` attaches its guest then, so that no frame of an imported flow
        #: arrives before its flow exists and gets a RST).
        self.after_import: Callable[[], None] | None = None

    def _flow_handlers(self) -> dict[str, Callable[[Relay, dict[str, Any]], object]]:
        return {"export_flows": _export_flows, "import_flows": self._import_flows,
                "release_exported": _release_exported, "quit": self._quit}

    async def _import_flows(self, relay: Relay, args: dict[str, Any]) -> object:
        # One document at a time: each may take MAX_DOCUMENT bytes (times three) while
        # it is read and parsed, and `max_clients` of them at once would be a lot more.
        async with self._importing:
            try:
                answer = await flows_file.import_from(relay, args["file"], args.get("fd"))
            except flows_file.FlowFileError as exc:
                raise RequestError(f"import_flows: {exc}") from None
        attach, self.after_import = self.after_import, None
        if attach is not None:
            attach()
        return answer

    def _quit(self, relay: Relay, args: dict[str, Any]) -> object:
        if self.on_quit is None:
            raise RequestError("quit: this relay ends with its command, not on request")
        self.on_quit()
        return {"quitting": True}

    @property
    def sock(self) -> socket.socket:
        """The listening socket (for the relay that takes over)."""
        return self._sock

    async def _handover_answered(self, to: str, fd: int | None) -> object:
        assert self.on_handover is not None
        result = await self.on_handover(to, fd=fd)
        # This connection's task sets handed_over once the answer is out.
        self._handing_over.add(asyncio.current_task())
        return result

    def _handover(self, relay: Relay, args: dict[str, Any]) -> object:
        if self.on_handover is None:
            raise RequestError("handover: this relay cannot hand over (relaynat run or "
                               "serve with --socket, or a --fd stream socket, or a TAP)")
        return self._handover_answered(args["to"], args.get("fd"))

    async def start(self, relay: Relay) -> None:
        self._relay = relay
        # The reader's limit is the line bound: a longer line raises at once instead
        # of being buffered whole.
        self._server = await asyncio.start_unix_server(self._client, sock=self._sock,
                                                       limit=self.max_line)

    def stop_accepting(self) -> None:
        """Accept no new client, leaving those connected (a handover's answer is still
        to go out): the listening socket serves another relay from now on."""
        if self._server is not None:
            self._server.close()
            self._server = None
        self._sock.close()

    def close(self, unlink: bool = True) -> None:
        """Stop serving; `unlink`: remove the socket file (not after a handover: the
        new relay serves it)."""
        if self._server is not None:
            self._server.close()
        else:
            self._sock.close()
        for task in self._clients:
            task.cancel()
        if unlink:
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._clients) >= self.max_clients:
            with contextlib.suppress(Exception):
                writer.write(_error(f"too many control clients (at most {self.max_clients})"))
            writer.close()
            return
        self._clients.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.CancelledError, TimeoutError):
            pass
        except Exception:  # a server bug must not end the relay's loop: log, drop client
            log.exception("control client failed")
        finally:
            self._clients.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        timeout = self.idle_timeout_s
        for _ in range(MAX_REQUESTS):  # one request per round until the client goes
            try:
                line = await asyncio.wait_for(reader.readuntil(b"\n"), timeout)
            except asyncio.IncompleteReadError:
                return  # closed, perhaps mid-line: nothing to answer
            except asyncio.LimitOverrunError:
                writer.write(_error(f"request line longer than {self.max_line} bytes; "
                                    "closing"))
                await asyncio.wait_for(writer.drain(), timeout)
                return
            if not line.strip():
                continue
            passing = _Passing(writer, timeout)
            answer = await self.answer(line, passing.receive)
            if passing.closed:
                return
            writer.write(answer)
            await asyncio.wait_for(writer.drain(), timeout)
            if passing.broken:
                return  # the exchange of a descriptor went wrong: out of step
            if answer == _WATCHING:
                await self._watch(reader, writer)
                return
            if asyncio.current_task() in self._handing_over:
                self.handed_over.set()
                return

    async def _watch(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                     ) -> None:
        """`watch`: the relay's events from now on, one JSON line each (events.py's
        `event_dict`), until the client closes or the relay does. A client that does not
        read loses events (the stream's bound, counted as `events_dropped`) and is let go
        once a line waited `idle_timeout_s` to be taken."""
        if self._relay is None:
            return
        closed = asyncio.ensure_future(reader.read())  # the client closing ends it
        following: asyncio.Future[Event] | None = None
        try:
            async with self._relay.events(self.watch_queue) as stream:
                events = aiter(stream)
                while True:
                    following = asyncio.ensure_future(anext(events))
                    await asyncio.wait({following, closed},
                                       return_when=asyncio.FIRST_COMPLETED)
                    if not following.done():
                        return
                    try:
                        event = following.result()
                    except StopAsyncIteration:
                        return
                    writer.write(_line(event_dict(event)))
                    try:
                        await asyncio.wait_for(writer.drain(), self.idle_timeout_s)
                    except TimeoutError:
                        # Let go at once: a close would wait to flush the lines that
                        # this client does not read.
                        writer.transport.abort()
                        return
        finally:
            # Also when the server is closed under it: a wait left pending would end
            # with the stream and its StopAsyncIteration go unretrieved.
            closed.cancel()
            if following is not None:
                following.cancel()

    async def answer(self, line: bytes,
                     receive_fd: Callable[[str], Awaitable[int]] | None = None) -> bytes:
        """One request line -> one answer line, waiting for a command that takes time
        (handover); never raises. `receive_fd(command)`: takes the descriptor a request
        announces (`"fd": true`; the module docstring), None where none can come."""
        try:
            result = self._request(line, receive_fd)
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:
            return _failure(exc)
        return _line({"return": result})

    def _request(self, line: bytes,
                 receive_fd: Callable[[str], Awaitable[int]] | None = None) -> object:
        try:
            # UTF-8 only: json.loads on bytes would guess UTF-16/32 from the first bytes.
            request = json.loads(line.decode().rstrip("\r\n"), object_pairs_hook=unique_keys)
        except UnicodeDecodeError:
            raise RequestError("request is not UTF-8 text") from None
        except ValueError as exc:
            raise RequestError(f"request is not JSON: {exc}") from None
        except RecursionError:
            raise RequestError("request is not JSON: nested too deeply") from None
        if not isinstance(request, dict):
            raise RequestError("request must be a JSON object with \"execute\"")
        extra = sorted(set(request) - {"execute", "arguments"})
        if extra:
            raise RequestError(f"unknown request key {extra[0]!r} (known: execute, "
                               "arguments)")
        command = request.get("execute")
        if not isinstance(command, str):
            raise RequestError("request needs \"execute\": a command name")
        handler = self._handlers.get(command)
        if handler is None:
            raise RequestError(f"unknown command {command!r} (known: "
                               f"{', '.join(sorted(self._handlers))})")
        args = _check_arguments(command, request.get("arguments"))
        if self._relay is None:
            raise RequestError("the relay is not running")
        if args.pop("fd", False):
            if receive_fd is None:
                raise RequestError(f"{command}: no descriptor can be passed here")
            return _with_descriptor(command, handler, self._relay, args, receive_fd)
        return handler(self._relay, args)


async def _with_descriptor(command: str, handler: Callable[[Relay, dict[str, Any]], object],
                           relay: Relay, args: dict[str, Any],
                           receive_fd: Callable[[str], Awaitable[int]]) -> object:
    """`handler` with the descriptor the client passes as `args["fd"]`; the descriptor
    is the server's: closed once the command is done, whatever it did."""
    fd = await receive_fd(command)
    try:
        result = handler(relay, {**args, "fd": fd})
        if inspect.isawaitable(result):
            result = await result
        return result
    finally:
        os.close(fd)


class _DescriptorLost(RequestError):
    """The byte that should carry a descriptor did not (or nothing came): answered,
    and the connection is closed."""


class _Passing:
    """Taking one descriptor on a control connection (the module docstring): reading
    stops, `send_fd` goes out, the byte and its descriptor are taken with recvmsg on a
    duplicate of the connection's socket, and reading resumes. `broken`: the exchange
    failed and the connection is to be closed after the error answer; `closed`: the
    client went away instead."""

    def __init__(self, writer: asyncio.StreamWriter, timeout: float) -> None:
        self.writer = writer
        self.timeout = timeout
        self.broken = False
        self.closed = False

    async def receive(self, command: str) -> int:
        # uvloop's transports are not asyncio.ReadTransport subclasses, though they
        # have its methods: the stream writer's transport is typed WriteTransport.
        transport = cast("asyncio.ReadTransport", self.writer.transport)
        own = self.writer.get_extra_info("socket")
        if own is None:
            raise RequestError(f"{command}: no descriptor can be passed here")
        transport.pause_reading()
        try:
            self.writer.write(_line({"send_fd": True}))
            await asyncio.wait_for(self.writer.drain(), self.timeout)
            with socket.socket(fileno=os.dup(own.fileno())) as sock:
                try:
                    data, fds, flags = await asyncio.wait_for(_recv_fds(sock), self.timeout)
                except TimeoutError:
                    self.broken = True
                    raise _DescriptorLost(f"{command}: no descriptor came within "
                                          f"{self.timeout:g} s of send_fd") from None
        finally:
            if not transport.is_closing():
                transport.resume_reading()
        if not data:
            self.closed = True
            raise _DescriptorLost(f"{command}: the client closed before passing a descriptor")
        if len(fds) == 1 and not flags & socket.MSG_CTRUNC:
            return fds[0]
        for fd in fds:
            os.close(fd)
        self.broken = True
        raise _DescriptorLost(f"{command}: one descriptor must come with the byte after "
                              f"send_fd, {len(fds) or 'none'} came"
                              f"{' (and more were cut)' if flags & socket.MSG_CTRUNC else ''}"
                              "; closing")


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():  # a reader may fire again before the wait returns
        future.set_result(None)


async def _recv_fds(sock: socket.socket) -> tuple[bytes, list[int], int]:
    """One byte and the descriptors with it, from `sock` (non-blocking), waiting on the
    loop for it to be readable. MSG_CMSG_CLOEXEC: nothing this process starts inherits
    a passed descriptor."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            data, fds, flags, _ = socket.recv_fds(
                sock, 1, _MAX_PASSED, socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
            return data, fds, flags
        except (BlockingIOError, InterruptedError):
            pass
        readable: asyncio.Future[None] = loop.create_future()
        loop.add_reader(sock.fileno(), _settle, readable)
        try:
            await readable
        finally:
            loop.remove_reader(sock.fileno())


def _watch(relay: Relay, args: dict[str, Any]) -> object:
    # The answer; the stream of events follows it (ControlServer._watch).
    return {"watching": True}


def _line(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


_WATCHING = _line({"return": {"watching": True}})


def _error(desc: str) -> bytes:
    return _line({"error": {"desc": desc}})


def _failure(exc: Exception) -> bytes:
    """The answer to a request that raised: its reason, or an internal error."""
    if isinstance(exc, RequestError | ForwardError | ConfigError):
        return _error(str(exc))
    log.error("control request failed", exc_info=exc)
    return _error(f"internal error: {type(exc).__name__}: {exc}")


# -- the commands ---------------------------------------------------------------------------

def _add_hostfwd(relay: Relay, args: dict[str, Any]) -> object:
    forward = relay.add_forward(args["proto"], _address(args.get("host_addr")),
                                args["host_port"], args["guest_port"], args.get("interface"))
    return forward.describe()


def _list_hostfwd(relay: Relay, args: dict[str, Any]) -> object:
    return {"entries": relay.forwards()}


def _remove_hostfwd(relay: Relay, args: dict[str, Any]) -> object:
    if "id" in args:
        if set(args) != {"id"}:
            raise RequestError("remove_hostfwd: give either \"id\" or proto/host_addr/"
                               "host_port, not both")
        return relay.remove_forward(forward_id=args["id"]).describe()
    if "proto" not in args or "host_port" not in args:
        raise RequestError("remove_hostfwd: give \"id\", or \"proto\" and \"host_port\" "
                           "(and \"host_addr\" unless the forward is on all addresses)")
    return relay.remove_forward(args["proto"], _address(args.get("host_addr")),
                                args["host_port"]).describe()


def _stats(relay: Relay, args: dict[str, Any]) -> object:
    return relay.stats()


def _flows(relay: Relay, args: dict[str, Any]) -> object:
    return {"flows": [flow.to_dict() for flow in relay.flows()]}


def _names(relay: Relay, args: dict[str, Any]) -> object:
    return {"names": relay.learned_names()}


def _get_policy(relay: Relay, args: dict[str, Any]) -> object:
    policy = relay.policy
    return {"policy": policy.to_dict() if policy is not None else None}


def _set_policy(relay: Relay, args: dict[str, Any]) -> object:
    if "policy" in args and args.get("sandbox"):
        raise RequestError("set_policy: give \"policy\" or \"sandbox\", not both")
    if args.get("sandbox"):
        policy: Policy | None = Policy.sandbox(relay.config)
    elif "policy" in args:
        data = args["policy"]
        try:
            policy = None if data is None else Policy.from_dict(data, relay.config)
        except (TypeError, AttributeError, KeyError) as exc:
            raise RequestError(f"set_policy: bad policy: {exc}") from None
    else:
        raise RequestError("set_policy: give \"policy\" (an object, or null for none) or "
                           "\"sandbox\": true")
    cut = relay.set_policy(policy, cut=args.get("cut", False))
    return {"policy": policy.to_dict() if policy is not None else None, "cut": cut}


def _export_flows(relay: Relay, args: dict[str, Any]) -> object:
    try:
        return flows_file.export_to(relay, args["file"], args.get("fd"))
    except flows_file.FlowFileError as exc:
        raise RequestError(f"export_flows: {exc}") from None


def _release_exported(relay: Relay, args: dict[str, Any]) -> object:
    reset = args.get("reset", False)
    return {"released": relay.release_exported(reset), "reset": reset}
