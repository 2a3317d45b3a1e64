"""The control socket's commands that move flows to a relay on another host
(control/server.py's protocol; host/flow_move.py does the moving).

- ``export_flows`` ``{"file": PATH, "fd": true}``: every ESTABLISHED TCP flow leaves
  the relay (`Relay.export_flows`), the guest's transport is let go (the guest is
  moving: a frame it still sent here for a moved flow would find no flow and be
  answered with a RST, and its link must be free for the target relay), and the
  document is written to the file passed (`relaynat ctl export` creates it, mode 0600,
  and names it PATH once the relay answered), or without ``fd`` to PATH itself. The
  answer lists what moved and what did not, with reasons; flows that could not move
  end with the transport, as when a guest goes away. The moved flows' host sockets
  stay open in repair mode until ``release_exported`` or the relay exits (`ctl quit`,
  SIGTERM); they still retransmit on their timers (host/flow_move.py), so the source
  should have lost its route to the peers before the export.
- ``import_flows`` ``{"file": PATH, "fd": true}``: the document in the file passed (or
  without ``fd`` at PATH), checked whole first; a fault anywhere is refused naming the
  flow and the field, and nothing is imported. A relay started with ``serve
  --incoming`` attaches its guest after the first import that succeeds
  (`ControlServer.after_import`).
- ``release_exported`` ``{"reset": bool}``: close the held sockets; silently, or with
  ``reset`` a RST to each peer (the behaviour before repair-mode holding: for flows
  that did not live on elsewhere).
- ``quit``: the relay exits as on SIGTERM (`ControlServer.on_quit`), releasing the held
  sockets silently.

Why a file and not the document in the request or the answer: a document carries the
host sockets' queues (megabytes), request lines are bounded (control.MAX_LINE), and a
document the relay has written (and fsync'd) before it answers survives a client that
dies half-way: flows held in repair mode are never left without their state.

Why a descriptor (``"fd": true``: the client passes the open file over the control
connection, control/server.py) and not a path: a confined relay can open no path at
all (docs/confinement.md), and the operator's rights, not the relay's, then decide
where a document may be written or read. `relaynat ctl export` creates `PATH.PID.tmp`
itself (O_EXCL, 0600) before asking, so a path that cannot be written is refused while
the flows still run, and renames it over PATH once the relay answered: PATH never
holds half a document (after a client that died, the document is in the .tmp file).
The relay checks the descriptor first: a regular file, open for writing (export) or
reading (import); anything else is refused before a flow moves or a byte is read. The
path form (no ``fd``: the relay opens PATH itself, a temporary file renamed over it
likewise) is what an unconfined relay still serves to older clients. PATH, a label
only with ``fd``, must be absolute either way (`relaynat ctl` resolves it), as the
relay's working directory is its own.
Writing the exported document is the only blocking I/O a control request does on the
loop (the flows concerned are out of it meanwhile). An imported document is read and
parsed in a worker thread, one at a time (`ControlServer`), so that a large one, or a
path that is not a document at all, does not hold every guest's loop: a PATH that is
not a regular file (`/dev/zero`, a FIFO, a directory) is refused unread, and so is a
file larger than MAX_DOCUMENT (the error says which and why; nothing is imported).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import stat
from typing import TYPE_CHECKING, Any

from relaynat.errors import Error
from relaynat.flow_state import FlowStateError
from relaynat.repair_state import RepairError

if TYPE_CHECKING:
    from relaynat.relay import Relay

#: Largest document read. A document carries each flow's two socket queues in base64
#: (4/3 of their bytes), so 256 MiB is 192 MiB of queued data: 19 flows whose buffers
#: are both full at the kernel's default maxima (tcp_rmem 6 MiB, tcp_wmem 4 MiB), or
#: thousands of ordinary ones. While a document is parsed the relay holds about three
#: times its size (the bytes, their text, the objects), so the bound is also the
#: relay's memory; the handover document has the same one (moving/handover.py).
MAX_DOCUMENT = 256 << 20
#: A flows document is a JSON object: anything else is refused before json reads it
#: (a file of zeros would otherwise be decoded as UTF-32 whole first).
_OBJECT_START = re.compile(rb"[ \t\r\n]*\{")

#: Argument specs in control/server.py's form: name -> (accepted types, required).
SPECS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "export_flows": {"file": ((str,), True), "fd": ((bool,), False)},
    "import_flows": {"file": ((str,), True), "fd": ((bool,), False)},
    "release_exported": {"reset": ((bool,), False)},
    "quit": {},
}


class FlowFileError(Error, ValueError):
    """A flows command cannot be served; the message says why (and what happened)."""


def _absolute(path: str) -> str:
    if not os.path.isabs(path):
        raise FlowFileError(f"{path!r} is not an absolute path")
    return path


def _ends(flow: dict[str, Any]) -> dict[str, Any]:
    return {"protocol": "tcp", "guest": flow["guest"], "far": flow["far"]}


def _check_descriptor(fd: int, path: str, writing: bool) -> None:
    """FlowFileError unless `fd` is a regular file open for writing (or reading)."""
    try:
        mode = os.fstat(fd).st_mode
        access = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError as exc:
        raise FlowFileError(f"the descriptor passed for {path}: {exc.strerror}") from None
    want = (os.O_WRONLY, os.O_RDWR) if writing else (os.O_RDONLY, os.O_RDWR)
    if not stat.S_ISREG(mode) or access not in want:
        what = "writing" if writing else "reading"
        raise FlowFileError(f"the descriptor passed for {path} is not a regular file open "
                            f"for {what} (a flows document is a file); nothing "
                            f"{'exported' if writing else 'imported'}")


def export_to(relay: Relay, path: str, fd: int | None = None) -> dict[str, Any]:
    """Export every movable flow to the file `path`, let the guest go; the answer.
    `fd`: the file, opened by the client (the relay opens no path then)."""
    path = _absolute(path)
    if fd is not None:
        _check_descriptor(fd, path, writing=True)
        doc: dict[str, Any] = relay.export_flows()
        relay.detach()
        try:
            _write_whole(fd, json.dumps(doc, separators=(",", ":")).encode())
        except OSError as exc:
            raise _unwritten(doc, path, exc) from None
        return _exported(path, doc)
    # Created before anything moves, so a path that cannot be written is refused
    # while the flows still run here; renamed over `path` only once complete.
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise FlowFileError(f"cannot create {tmp}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as out:
        try:
            doc = relay.export_flows()
            relay.detach()
        except BaseException:
            os.unlink(tmp)
            raise
        try:
            json.dump(doc, out, separators=(",", ":"))
            out.flush()
            os.fsync(out.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise _unwritten(doc, path, exc) from None
    return _exported(path, doc)


def _write_whole(fd: int, data: bytes) -> None:
    """`data` as the whole content of the file `fd`, on disk before this returns."""
    os.ftruncate(fd, 0)
    view, offset = memoryview(data), 0
    while offset < len(data):
        offset += os.pwrite(fd, view[offset:], offset)
    os.fsync(fd)


def _unwritten(doc: dict[str, Any], path: str, exc: OSError) -> FlowFileError:
    return FlowFileError(
        f"{len(doc['flows'])} flows were exported and are held in repair mode, but "
        f"{path} could not be written ({exc.strerror}): their state is lost; "
        "`release_exported` with reset ends them at their peers")


def _exported(path: str, doc: dict[str, Any]) -> dict[str, Any]:
    return {"file": path, "moved": [_ends(f) for f in doc["flows"]],
            "not_moved": doc["not_moved"]}


async def import_from(relay: Relay, path: str, fd: int | None = None) -> dict[str, Any]:
    """Import the flows of the document in the file `path` (`fd`: the file, opened by
    the client), all or none; the answer. The file is read and parsed in a worker
    thread; the flows are imported on the loop."""
    path = _absolute(path)
    loop = asyncio.get_running_loop()
    if fd is None:
        doc = await loop.run_in_executor(None, read_document, path)
    else:
        _check_descriptor(fd, path, writing=False)
        doc = await loop.run_in_executor(None, read_descriptor, fd, path)
    try:
        imported = relay.import_flows(doc)
    except (FlowStateError, RepairError) as exc:
        raise FlowFileError(f"{path}: {exc}; nothing imported") from None
    return {"file": path, "imported": [flow.to_dict() for flow in imported]}


def read_document(path: str) -> object:
    """The JSON document in the regular file `path`, at most MAX_DOCUMENT bytes (blocking:
    a worker thread's work); FlowFileError saying why not."""
    try:
        # O_NONBLOCK: opening a FIFO nobody writes would block until someone does.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise FlowFileError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return read_descriptor(fd, path)
    finally:
        os.close(fd)


def read_descriptor(fd: int, path: str) -> object:
    """The JSON document in the file `fd` (named `path` in errors), from its start, as
    `read_document` (blocking); `fd` stays open."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise FlowFileError(f"{path} is not a regular file (a flows document is the file "
                            "`export_flows` wrote); nothing imported")
    if st.st_size > MAX_DOCUMENT:
        raise FlowFileError(f"{path} is {st.st_size} bytes, more than a flows document "
                            f"may be ({MAX_DOCUMENT}); nothing imported")
    chunks, size = [], 0
    try:
        while size <= MAX_DOCUMENT:  # the file may have grown since fstat
            # Its size (and a byte, to see it grew) at first: a read allocates what it
            # asks for, and MAX_DOCUMENT at once would be that much for any file.
            want = max(st.st_size + 1 - size, 1 << 16)
            chunk = os.pread(fd, min(want, MAX_DOCUMENT + 1 - size), size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise FlowFileError(f"cannot read {path}: {exc.strerror}") from None
    raw = b"".join(chunks)
    if len(raw) > MAX_DOCUMENT:
        raise FlowFileError(f"{path} grew past {MAX_DOCUMENT} bytes while it was read; "
                            "nothing imported")
    if _OBJECT_START.match(raw) is None:
        raise FlowFileError(f"{path} is not JSON (a flows document is an object, opening "
                            "with '{'); nothing imported")
    try:
        return json.loads(raw, object_pairs_hook=_json_object)
    except (ValueError, RecursionError) as exc:
        raise FlowFileError(f"{path} is not JSON ({exc}); nothing imported") from None


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Each JSON object, built in Python: json's C parser otherwise never runs Python
    code, so it would hold the interpreter lock for the whole document, and the loop
    thread waits for it; between objects (one flow's fields) the loop gets its turn."""
    return dict(pairs)
