"""The child side of namespace mode: set up the guest namespace, hand over the TAP,
exec the command. Run as `python -m relaynat.namespace_child SPEC FD -- CMD...` by
`namespace.run_command`; kept apart from the relay so it starts without importing it.
"""

from __future__ import annotations

import array
import ctypes
import ctypes.util
import json
import os
import socket
import subprocess
import sys
import tempfile

from relaynat.netns_util import CLONE_NEWNET, CLONE_NEWNS, CLONE_NEWUSER, unshare
from relaynat.tap import open_tap


class NamespaceSetupError(RuntimeError):
    """A setup step failed; the message says which and why."""


def _write_id_maps() -> None:
    """Map our uid/gid to root inside a fresh user namespace (user_namespaces(7):
    an unprivileged process may map exactly its own ids once setgroups is denied)."""
    uid, gid = os.getuid(), os.getgid()
    unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWNS)
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"0 {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"0 {gid} 1")


# mount(2) flags (include/uapi/linux/mount.h).
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18


def _mount(source: str | None, target: str, flags: int) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.mount(source.encode() if source else None, target.encode(), None,
                  ctypes.c_ulong(flags), None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source or ''} on {target}: {os.strerror(err)}")


def _point_resolv_conf_at(servers: list[str]) -> None:
    """In our own mount namespace (already unshared), bind-mount a file naming the
    relay's DNS address over /etc/resolv.conf. Mounts are made private first (as
    `mount --make-rprivate /`), so nothing propagates back to the host's namespace."""
    _mount(None, "/", _MS_REC | _MS_PRIVATE)
    fd, path = tempfile.mkstemp(prefix="relaynat-resolv-")
    try:
        lines = "".join(f"nameserver {server}\n" for server in servers)
        os.write(fd, f"# written by relaynat run\n{lines}".encode())
        os.fchmod(fd, 0o644)
        os.close(fd)
        _mount(path, "/etc/resolv.conf", _MS_BIND)
    finally:
        os.unlink(path)  # the bind mount keeps the inode alive


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode:
        raise NamespaceSetupError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _hide(paths: list[str]) -> None:
    """Bind-mount /dev/null over each of `paths` in our own mount namespace: the
    relay's control socket stays out of the guest's reach even though the guest shares
    the host's filesystem (connect(2) on a character device fails with ECONNREFUSED).
    Mounts are private first, so nothing propagates back."""
    _mount(None, "/", _MS_REC | _MS_PRIVATE)
    for path in paths:
        _mount("/dev/null", path, _MS_BIND)


def _warn(text: str) -> None:
    print(f"relaynat run: warning: {text}", file=sys.stderr)


def _child_main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    sock = socket.socket(fileno=int(argv[1]))
    command = argv[3:]
    try:
        if os.geteuid() == 0:
            unshare(CLONE_NEWNET)
            try:
                unshare(CLONE_NEWNS)
            except OSError as exc:
                if spec.get("hide"):  # never run the guest with the control socket in reach
                    raise OSError(exc.errno, "no private mount namespace to hide the "
                                  f"control socket in: {exc}") from None
                _warn(f"no private mount namespace ({exc}); /etc/resolv.conf left as is")
                spec["dns"] = None
        else:
            _write_id_maps()
        if spec.get("hide"):
            _hide(spec["hide"])
        if spec.get("dns"):
            try:
                _point_resolv_conf_at(spec["dns"])
            except OSError as exc:
                _warn(f"cannot point /etc/resolv.conf at {', '.join(spec['dns'])}: {exc}")
        fd, vnet_hdr_len, offload = open_tap(spec["tap"], spec["vnet"])
        tap = spec["tap"]
        if not spec["address6"]:
            # -4: keep the kernel from autoconfiguring and soliciting on the link.
            with open(f"/proc/sys/net/ipv6/conf/{tap}/disable_ipv6", "w") as f:
                f.write("1")
        _ip("link", "set", "lo", "up")
        _ip("link", "set", "dev", tap, "mtu", str(spec["mtu"]), "up")
        if spec["address"]:
            _ip("addr", "add", spec["address"], "dev", tap)
            _ip("route", "add", "default", "via", spec["gateway"], "dev", tap)
        if spec["address6"]:
            # Configured statically so the command's first packet has an address (as
            # pasta does); the kernel still autoconfigures its own SLAAC address from
            # the relay's router advertisement. No DAD: the relay owns the link.
            _ip("-6", "addr", "add", spec["address6"], "dev", tap, "nodad")
            _ip("-6", "route", "add", "default", "via", spec["gateway6"], "dev", tap)
    except (OSError, NamespaceSetupError) as exc:
        sock.send(f"cannot set up the guest namespace: {exc}".encode())
        return 1
    info = json.dumps({"vnet_hdr_len": vnet_hdr_len, "offload": offload}).encode()
    sock.sendmsg([info], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
    os.close(fd)
    if sock.recv(16) != b"go":
        return 1
    sock.close()
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"relaynat run: cannot execute {command[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
