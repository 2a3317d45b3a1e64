"""The control socket's commands that move flows to a relay on another host
(control.py's protocol; flow_move.py does the moving).

- ``export_flows`` ``{"file": PATH}``: every ESTABLISHED TCP flow leaves the relay
  (`Relay.export_flows`), the guest's transport is let go (the guest is moving: a frame
  it still sent here for a moved flow would find no flow and be answered with a RST,
  and its link must be free for the target relay), and the document is written to
  PATH (mode 0600). The answer lists what moved and what did not, with reasons; flows
  that could not move end with the transport, as when a guest goes away. The moved
  flows' host sockets stay open in repair mode until ``release_exported`` or the relay
  exits (`ctl quit`, SIGTERM); they still retransmit on their timers (flow_move.py),
  so the source should have lost its route to the peers before the export.
- ``import_flows`` ``{"file": PATH}``: the document at PATH, checked whole first; a
  fault anywhere is refused naming the flow and the field, and nothing is imported.
  A relay started with ``serve --incoming`` attaches its guest after the first import
  that succeeds (`ControlServer.after_import`).
- ``release_exported`` ``{"reset": bool}``: close the held sockets; silently, or with
  ``reset`` a RST to each peer (the behaviour before repair-mode holding: for flows
  that did not live on elsewhere).
- ``quit``: the relay exits as on SIGTERM (`ControlServer.on_quit`), releasing the held
  sockets silently.

Why a file and not the document in the request or the answer: a document carries the
host sockets' queues (megabytes), request lines are bounded (control.MAX_LINE), and a
document the relay has written before it answers survives a client that dies
half-way: flows held in repair mode are never left without their state. PATH must be
absolute (`relaynat ctl` resolves it), as the relay's working directory is its own.
Reading and writing one local file is the only blocking I/O a control request does;
the flows concerned are out of the loop meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import TYPE_CHECKING, Any

from relaynat.flow_state import FlowStateError
from relaynat.tcp_repair import RepairError

if TYPE_CHECKING:
    from relaynat.relay import Relay

#: Largest document read: every flow's queues are its socket buffers at most (a few
#: MiB each, base64), so this bounds the relay's memory, not any real migration.
MAX_DOCUMENT = 1 << 30

#: Argument specs in control.py's form: name -> (accepted types, required).
SPECS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "export_flows": {"file": ((str,), True)},
    "import_flows": {"file": ((str,), True)},
    "release_exported": {"reset": ((bool,), False)},
    "quit": {},
}


class FlowFileError(ValueError):
    """A flows command cannot be served; the message says why (and what happened)."""


def _absolute(path: str) -> str:
    if not os.path.isabs(path):
        raise FlowFileError(f"{path!r} is not an absolute path")
    return path


def _ends(flow: dict[str, Any]) -> dict[str, Any]:
    return {"protocol": "tcp", "guest": flow["guest"], "far": flow["far"]}


def export_to(relay: Relay, path: str) -> dict[str, Any]:
    """Export every movable flow to the file `path`, let the guest go; the answer."""
    path = _absolute(path)
    # Created before anything moves, so a path that cannot be written is refused
    # while the flows still run here; renamed over `path` only once complete.
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise FlowFileError(f"cannot create {tmp}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as out:
        try:
            doc: dict[str, Any] = relay.export_flows()
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
            raise FlowFileError(
                f"{len(doc['flows'])} flows were exported and are held in repair mode, but "
                f"{path} could not be written ({exc.strerror}): their state is lost; "
                "`release_exported` with reset ends them at their peers") from None
    return {"file": path, "moved": [_ends(f) for f in doc["flows"]],
            "not_moved": doc["not_moved"]}


def import_from(relay: Relay, path: str) -> dict[str, Any]:
    """Import the flows of the document in the file `path`, all or none; the answer."""
    path = _absolute(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_DOCUMENT:
                raise FlowFileError(f"{path} is {size} bytes, more than a flows document "
                                    f"may be ({MAX_DOCUMENT}); nothing imported")
            raw = f.read(MAX_DOCUMENT + 1)
    except OSError as exc:
        raise FlowFileError(f"cannot read {path}: {exc.strerror}") from None
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise FlowFileError(f"{path} is not JSON ({exc}); nothing imported") from None
    try:
        imported = relay.import_flows(doc)
    except (FlowStateError, RepairError) as exc:
        raise FlowFileError(f"{path}: {exc}; nothing imported") from None
    return {"file": path, "imported": imported}
