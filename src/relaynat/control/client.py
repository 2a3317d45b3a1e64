"""`relaynat ctl --socket PATH COMMAND`: a client of a running relay's control socket.

Each command sends one request (control/server.py describes the protocol) and prints the
answer readably, or as the raw JSON line with `--json`. Exit status: 0 on success,
1 when the relay answers with an error (its `desc` is printed) or cannot be reached,
2 on bad usage.

`export`, `import` and `handover` open their path here, with the rights of whoever runs
`relaynat ctl`, and pass the descriptor with the request (`call`'s `fd`): the flows
file, or a socket connected to the new relay's --receive-handover socket. A confined
relay opens no path itself.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tomllib
from collections.abc import Callable
from ipaddress import ip_address
from typing import Any

from relaynat.config import ConfigError
from relaynat.errors import Error
from relaynat.policy import loads_json
from relaynat.portspec import parse_portspec

#: Largest answer read (a flow listing of a full table is a few MiB).
_MAX_ANSWER = 64 << 20


def add_parser(sub: Any) -> None:
    """The `ctl` subcommand on the `relaynat` parser's subparsers."""
    ctl = sub.add_parser("ctl", help="control a running relay through its --control-socket",
                         description="Send one request to a relay started with "
                                     "--control-socket PATH and print the answer.")
    ctl.add_argument("--socket", "-s", "--control-socket", required=True, metavar="PATH",
                     help="the relay's control socket")
    ctl.add_argument("--json", action="store_true", help="print the raw JSON answer")
    ctl.add_argument("--timeout", type=float, default=10.0, metavar="S",
                     help="seconds to wait for the answer (default %(default)s)")
    ctl.set_defaults(ctl_parser=ctl)  # usage errors name `relaynat ctl`
    cmds = ctl.add_subparsers(dest="ctl_cmd", required=True, metavar="COMMAND")
    add = cmds.add_parser("add", help="add a forward: tcp|udp [ADDR[%%IF]/]HOSTPORT:GUESTPORT")
    add.add_argument("proto", choices=["tcp", "udp"])
    add.add_argument("spec", help="one port pair in passt's syntax; host port 0 picks one")
    cmds.add_parser("list", help="list the forwards")
    rm = cmds.add_parser("remove", help="remove a forward: ID, or tcp|udp [ADDR/]PORT")
    rm.add_argument("what", nargs="+", metavar="ID | PROTO [ADDR/]PORT")
    cmds.add_parser("stats", help="print the relay's counters")
    cmds.add_parser("flows", help="list the open flows, one per line")
    cmds.add_parser("names", help="list the names the guest resolved through the relay "
                                  "and the addresses still valid for them")
    watch = cmds.add_parser("watch", help="print the relay's events as they happen, one "
                                          "JSON line each (flow decisions, flow ends, DNS "
                                          "queries), until interrupted")
    watch.add_argument("--count", type=int, metavar="N",
                       help="stop after N events")
    pol = cmds.add_parser("policy", help="show or set the egress policy")
    pol.add_argument("action", choices=["show", "set"])
    pol.add_argument("source", nargs="?", metavar="FILE|sandbox|none",
                     help="set: a policy file (TOML, or JSON if it ends in .json), the "
                          "sandbox profile, or none (allow all)")
    pol.add_argument("--cut", action="store_true",
                     help="set: also end the open flows the new policy denies")
    hand = cmds.add_parser("handover", help="hand the relay over to a new relaynat process "
                                            "waiting with serve --receive-handover PATH")
    hand.add_argument("--to", required=True, metavar="PATH",
                      help="the new relay's --receive-handover socket")
    _add_flow_commands(cmds)


def _add_flow_commands(cmds: Any) -> None:
    """Moving the guest's flows to a relay on another host (control/flows_file.py)."""
    exp = cmds.add_parser("export", help="move the established TCP flows out to FILE; the "
                                         "relay lets the guest go and holds the flows' host "
                                         "sockets in repair mode until release or quit")
    exp.add_argument("file", metavar="FILE")
    imp = cmds.add_parser("import", help="serve the flows of an export FILE (all or none)")
    imp.add_argument("file", metavar="FILE")
    rel = cmds.add_parser("release", help="close the host sockets held since export")
    rel.add_argument("--reset", action="store_true",
                     help="reset their peers (for flows that did not move elsewhere)")
    cmds.add_parser("quit", help="make the relay exit (held sockets are released silently)")


def _port(text: str, parser: argparse.ArgumentParser) -> int:
    if not text.isdigit() or int(text) > 0xFFFF:
        parser.error(f"{text!r} is not a port number (0-65535)")
    return int(text)


def build_request(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The request the command line asks for; bad usage exits 2 through `parser`."""
    cmd = args.ctl_cmd
    flow_request = _flow_request(args)
    if flow_request is not None:
        return flow_request
    if cmd == "add":
        try:
            specs = parse_portspec(args.spec, args.proto)
        except ConfigError as exc:
            parser.error(str(exc))
        pairs = [(spec, pair) for spec in specs for pair in spec.pairs()]
        if len(pairs) != 1:
            parser.error(f"ctl add: {args.spec!r} names {len(pairs)} port pairs; give one")
        spec, (host_port, guest_port) = pairs[0]
        return {"execute": "add_hostfwd", "arguments": {
            "proto": args.proto, "host_port": host_port, "guest_port": guest_port,
            "host_addr": str(spec.address) if spec.address is not None else None,
            "interface": spec.interface}}
    if cmd == "remove":
        what = args.what
        if len(what) == 1:
            if not what[0].isdigit():
                parser.error(f"ctl remove: {what[0]!r} is not a forward id (or give "
                             "PROTO [ADDR/]PORT)")
            return {"execute": "remove_hostfwd", "arguments": {"id": int(what[0])}}
        if len(what) != 2 or what[0] not in ("tcp", "udp"):
            parser.error("ctl remove: give ID, or tcp|udp [ADDR/]PORT")
        addr, _, port = what[1].rpartition("/")
        if addr:
            try:
                addr = str(ip_address(addr))
            except ValueError:
                parser.error(f"ctl remove: {addr!r} is not an IP address")
        return {"execute": "remove_hostfwd", "arguments": {
            "proto": what[0], "host_addr": addr or None, "host_port": _port(port, parser)}}
    if cmd == "policy":
        if args.action == "show":
            if args.source is not None or args.cut:
                parser.error("ctl policy show takes no further arguments")
            return {"execute": "get_policy"}
        if args.source is None:
            parser.error("ctl policy set: give FILE, sandbox or none")
        arguments: dict[str, Any] = {"cut": args.cut}
        if args.source == "sandbox":
            arguments["sandbox"] = True
        elif args.source == "none":
            arguments["policy"] = None
        else:
            arguments["policy"] = _read_policy(args.source, parser)
        return {"execute": "set_policy", "arguments": arguments}
    if cmd == "handover":
        return {"execute": "handover", "arguments": {"to": args.to, "fd": True}}
    return {"execute": {"list": "list_hostfwd", "stats": "stats", "flows": "flows",
                        "names": "names"}[cmd]}


def _flow_request(args: argparse.Namespace) -> dict[str, Any] | None:
    """The request of a flow-moving command; None for the others. The file's path is
    made absolute here (it names the file in answers; the file itself is passed)."""
    cmd = args.ctl_cmd
    if cmd in ("export", "import"):
        return {"execute": f"{cmd}_flows", "arguments": {"file": os.path.abspath(args.file),
                                                          "fd": True}}
    if cmd == "release":
        return {"execute": "release_exported", "arguments": {"reset": args.reset}}
    if cmd == "quit":
        return {"execute": "quit"}
    return None


def _read_policy(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The file's policy as a dict; the relay validates it (with its own addresses)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        # As `--policy FILE.json` reads it: a duplicate key is refused, not the last kept.
        data = loads_json(raw) if path.endswith(".json") else tomllib.loads(raw.decode())
    except OSError as exc:
        parser.error(f"cannot read {path}: {exc.strerror}")
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        parser.error(f"{path}: {exc}")
    if not isinstance(data, dict):
        parser.error(f"{path}: a policy is a table/object")
    return data


def call(path: str, request: dict[str, Any], timeout: float = 10.0,
         fd: Callable[[], int] | None = None) -> dict[str, Any]:
    """Send one request, return the decoded answer ({"return": ...} or {"error": ...}).
    Raises OSError when the socket cannot be reached or answers nothing usable.

    `fd`: opens the descriptor a request whose arguments say `"fd": true` passes;
    called once the relay asks for it (`send_fd`, control/server.py), so that nothing
    is created or connected to for a request the relay refuses; the descriptor is
    closed once passed. A relay from before descriptors were passed refuses the
    argument: the request is then sent again without it (the relay opens the path).
    An error `fd` raises (Refused) closes the connection, which the relay takes as the
    request withdrawn."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(json.dumps(request).encode() + b"\n")
        decoded = _answer(sock, path)
        if fd is None:
            return decoded
        if decoded == {"send_fd": True}:
            passed = fd()
            try:
                socket.send_fds(sock, [b"\0"], [passed])
            finally:
                os.close(passed)
            return _answer(sock, path)
        if _refuses_fd(request, decoded):
            arguments = {k: v for k, v in request["arguments"].items() if k != "fd"}
            sock.sendall(json.dumps(request | {"arguments": arguments}).encode() + b"\n")
            return _answer(sock, path)
        return decoded


def _refuses_fd(request: dict[str, Any], answer: dict[str, Any]) -> bool:
    """The answer of a relay that takes no descriptor (control/server.py's argument
    check, before descriptors were passed)."""
    error = answer.get("error")
    desc = error.get("desc") if isinstance(error, dict) else None
    return isinstance(desc, str) and desc.startswith(
        f"{request['execute']}: unknown argument 'fd'")


def _answer(sock: socket.socket, path: str) -> dict[str, Any]:
    """One answer line. The relay sends nothing unasked, so the bytes read end with
    the line."""
    answer = bytearray()
    while not answer.endswith(b"\n") and len(answer) < _MAX_ANSWER:
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        answer += chunk
    try:
        decoded = json.loads(answer)
    except ValueError:
        raise OSError(f"no usable answer from {path}") from None
    if not isinstance(decoded, dict):
        raise OSError(f"no usable answer from {path}")
    return decoded


class Refused(Error, Exception):
    """The path of a command cannot be opened here; the message says which and why."""


class _Opener:
    """Opens, with our rights (module docstring), the descriptor a command passes:
    export's temporary file (`tmp`, renamed over the file once the relay answered: the
    file never holds half a document), import's file, or a socket connected to the new
    relay of a handover. `opened`: whether it was asked for (not by a relay that
    opens the path itself)."""

    def __init__(self, args: argparse.Namespace, request: dict[str, Any]) -> None:
        self.cmd = args.ctl_cmd
        self.timeout = args.timeout
        arguments = request["arguments"]
        self.path = arguments["to"] if self.cmd == "handover" else arguments["file"]
        self.tmp = f"{self.path}.{os.getpid()}.tmp"
        self.opened = False

    def __call__(self) -> int:
        self.opened = True
        if self.cmd == "export":
            try:
                return os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                               0o600)
            except OSError as exc:
                self.opened = False
                raise Refused(f"cannot create {self.tmp}: {exc.strerror}") from None
        try:
            if self.cmd == "import":
                # O_NONBLOCK: opening a FIFO nobody writes would block until someone
                # does (the relay refuses what is not a regular file).
                return os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                sock.settimeout(self.timeout)
                sock.connect(self.path)
            except OSError:
                sock.close()
                raise
            return sock.detach()
        except OSError as exc:
            verb = "read" if self.cmd == "import" else "connect to"
            raise Refused(f"cannot {verb} {self.path}: {exc.strerror or exc}") from None

    def finish(self, answer: dict[str, Any] | None) -> str | None:
        """After an export's answer (None: none came): the document renamed into place,
        or the temporary file removed; an error to print, or None."""
        if self.cmd != "export" or not self.opened:
            return None
        if answer is None:
            return f"no answer: the document, if the relay wrote it, is in {self.tmp}"
        try:
            if "error" in answer:
                os.unlink(self.tmp)
            else:
                os.replace(self.tmp, self.path)
        except OSError as exc:
            return (f"the document is in {self.tmp}: it could not be moved to {self.path}: "
                    f"{exc.strerror}")
        return None


def _peer(end: list[Any] | None) -> str:
    if not end:
        return "-"
    addr, port = end
    addr = f"[{addr}]" if ":" in addr else addr
    return addr if port is None else f"{addr}:{port}"


def _print_forward(fwd: dict[str, Any], verb: str = "") -> None:
    where = fwd["host_addr"] or "*"
    if fwd.get("interface"):
        where += f"%{fwd['interface']}"
    print(f"{verb}{fwd['id']:>4}  {fwd['proto']}  {where} port {fwd['host_port']} -> "
          f"guest port {fwd['guest_port']}")


def _ends(flow: dict[str, Any]) -> str:
    return f"{flow['protocol']} {_peer(flow['guest'])} -> {_peer(flow['far'])}"


def _print_flow_answer(cmd: str, result: Any) -> None:
    if cmd == "export":
        print(f"exported {len(result['moved'])} flows to {result['file']}; their host "
              "sockets are held until `relaynat ctl release` or `quit`")
        for flow in result["moved"]:
            print(f"  moved      {_ends(flow)}")
        for flow in result["not_moved"]:
            print(f"  not moved  {_ends(flow)}: {flow['reason']}")
    elif cmd == "import":
        print(f"imported {len(result['imported'])} flows from {result['file']}")
        for flow in result["imported"]:
            print(f"  {_ends(flow)}  host peer {_peer(flow['host_peer'])}")
    elif cmd == "release":
        how = "with a reset to each peer" if result["reset"] else "silently"
        print(f"released {result['released']} held sockets {how}")
    elif cmd == "quit":
        print("the relay is exiting")


def print_answer(cmd: str, result: Any) -> None:
    if cmd in ("export", "import", "release", "quit"):
        _print_flow_answer(cmd, result)
    elif cmd in ("add", "remove"):
        _print_forward(result, "added " if cmd == "add" else "removed ")
    elif cmd == "list":
        for fwd in result["entries"]:
            _print_forward(fwd)
    elif cmd == "stats":
        for name in sorted(result):
            print(f"{name} {result[name]}")
    elif cmd == "flows":
        print(f"{'PROTO':5} {'DIR':8} {'GUEST':26} {'FAR':26} {'HOST PEER':26} "
              f"{'STATE':11} {'FROM GUEST':>12} {'TO GUEST':>12} {'WINDOW':>10} {'RTT us':>8}")
        for f in result["flows"]:
            window = "-" if f["guest_window"] is None else f["guest_window"]
            rtt = "-" if f["rtt_us"] is None else f["rtt_us"]
            print(f"{f['protocol']:5} {f['direction']:8} {_peer(f['guest']):26} "
                  f"{_peer(f['far']):26} {_peer(f['host_peer']):26} {f['state']:11} "
                  f"{f['bytes_from_guest']:>12} {f['bytes_to_guest']:>12} {window:>10} "
                  f"{rtt:>8}")
    elif cmd == "names":
        print(f"{'NAME':40} {'ADDRESS':39} {'TTL LEFT s':>10} {'FLOWS':>5}")
        for n in result["names"]:
            print(f"{n['name']:40} {n['addr']:39} {n['expires_in']:>10} {n['flows']:>5}")
    elif cmd == "handover":
        # .get: an older relay's answer has no UDP or ping counts (they did not move).
        print(f"handed over to {result['to']}: {result['moved_tcp']} TCP flows, "
              f"{result.get('moved_udp', 0)} UDP flows, {result.get('moved_icmp', 0)} ping "
              f"sessions, {result['forwards']} forwards")
        for left in result["not_moved"]:
            print(f"not moved: {left['protocol']} {_peer(left['guest'])} -> "
                  f"{_peer(left['far'])}: {left['reason']}")
    elif cmd == "policy":
        policy = result["policy"]
        print("none (allow all)" if policy is None else json.dumps(policy, indent=2))
        if "cut" in result:
            print(f"flows cut: {result['cut']}")


def watch(path: str, count: int | None = None, timeout: float = 10.0) -> int:
    """`ctl watch`: send `watch`, then copy each event line the relay sends to stdout
    (flushed at once) until it closes, `count` lines came, or ^C."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(b'{"execute":"watch"}\n')
        sock.settimeout(None)  # events come when they happen
        lines = sock.makefile("rb")
        first = json.loads(lines.readline() or b"null")
        if not isinstance(first, dict) or "return" not in first:
            desc = first.get("error", {}).get("desc") if isinstance(first, dict) else first
            print(f"relaynat ctl: {desc}", file=sys.stderr)
            return 1
        seen = 0
        try:
            while count is None or seen < count:
                line = lines.readline()
                if not line:
                    break
                sys.stdout.write(line.decode())
                sys.stdout.flush()
                seen += 1
        except KeyboardInterrupt:
            pass
    return 0


def main(args: argparse.Namespace) -> int:
    if args.ctl_cmd == "watch":
        try:
            return watch(args.socket, args.count, args.timeout)
        except OSError as exc:
            print(f"relaynat ctl: {args.socket}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    request = build_request(args, args.ctl_parser)
    opener = _Opener(args, request) if request.get("arguments", {}).get("fd") else None
    try:
        answer = call(args.socket, request, args.timeout, opener)
    except Refused as exc:
        print(f"relaynat ctl: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"relaynat ctl: {args.socket}: {exc.strerror or exc}", file=sys.stderr)
        failed = opener.finish(None) if opener is not None else None
        if failed is not None:
            print(f"relaynat ctl: {failed}", file=sys.stderr)
        return 1
    failed = opener.finish(answer) if opener is not None else None
    if failed is not None:
        print(f"relaynat ctl: {failed}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(answer))
    if "error" in answer:
        error = answer["error"]
        desc = error.get("desc") if isinstance(error, dict) else error
        print(f"relaynat ctl: {desc}", file=sys.stderr)
        return 1
    if not args.json:
        print_answer(args.ctl_cmd, answer.get("return"))
    return 0
