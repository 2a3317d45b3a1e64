"""Boot a tiny Linux guest under qemu (TCG) whose only NIC is a `-netdev stream` socket
(or, with netdev="dgram", a `-netdev dgram` unix datagram socket).

Used by integration tests of the relay's qemu-stream and unixgram transports:

    from support.vmguest import boot_vm, vm_unavailable_reason

    result = boot_vm("/tmp/x/q.sock", "wget -O /tmp/f http://10.0.2.2:8000/f && sha256sum /tmp/f")
    assert result.exit_status == 0, result.console
    result = boot_vm("/tmp/x/relay.dgram", "...", netdev="dgram")

The guest is a Debian cloud kernel plus a busybox initramfs whose /init (tests/vm/init.sh)
loads virtio-net, configures eth0 by DHCP, runs the command, prints its output between
`RN-BEGIN` and `RN-EXIT <status>` on the serial console and powers off.

Images are cached outside the repository, in $RELAYNAT_VM_CACHE or /var/cache/relaynat-vm:

    kernel/<version>/vmlinuz, kernel/<version>/modules/...   (from `apt-get download`)
    kernel/current                                           (text: the version in use)
    initrd-<hash>.img      (key: init.sh, busybox, kernel version, module list, this builder)

Fetching the kernel needs apt's network, which the test session's private network
namespace does not have: build once beforehand with `python3 tests/support/vmguest.py build`
(install.sh does; tests fail with that hint if they are missing). The initramfs is built
locally and needs no network, so edits to init.sh rebuild it on the next boot.

The peer on the socket must already be listening: qemu 7.2 connects once at startup
(`server=off`, no reconnect option before qemu 8.0). If nobody is listening qemu does not
fail; the guest boots with a dead link and reports RN-DHCP-FAIL. boot_vm therefore
refuses a path that is not a socket yet. With `-netdev dgram` qemu binds its own
`local.path` (in boot_vm's temporary directory) and sends every frame as one datagram
to `remote.path`, the relay's socket; there is no connection, and the relay answers
whichever address the frames come from.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import io
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
INIT_SCRIPT = HERE.parent / "vm" / "init.sh"
CACHE_DIR = Path(os.environ.get("RELAYNAT_VM_CACHE", "/var/cache/relaynat-vm"))
QEMU = os.environ.get("RELAYNAT_QEMU", "qemu-system-x86_64")
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
# Modules the guest loads, in this order, after dependency expansion (the Debian cloud
# kernel builds virtio, virtio_pci and virtio_net as modules).
GUEST_MODULES = ("virtio_pci", "virtio_net")
# Bump to force an initramfs rebuild when the builder's output format changes.
BUILDER_VERSION = "1"
# x86 COMMAND_LINE_SIZE is 2048; longer commands travel in an initrd overlay instead.
MAX_CMDLINE_COMMAND = 1500
DEFAULT_APPEND = ("console=ttyS0", "quiet", "panic=-1")


class VmImageError(RuntimeError):
    """The kernel or initramfs could not be found or built."""


@dataclasses.dataclass(frozen=True)
class VmImages:
    kernel: Path
    initrd: Path
    kernel_version: str


@dataclasses.dataclass
class VmResult:
    """What a guest run produced.

    exit_status: the command's exit status, or None if `RN-EXIT` never appeared
        (timeout, crash, qemu failing to start).
    output: the command's stdout+stderr (console lines between RN-BEGIN and RN-EXIT).
    console: the whole serial console plus qemu's stderr, for assertion messages.
    lease: fields of the last `RN-LEASE` line (ip, mask, router, mtu, dns), {} if none.
    dhcp_ok: True/False from RN-DHCP-OK/FAIL, None if neither was printed.
    times: guest uptime (s) at `RN-TIME` points: init (userspace start), eth0, dhcp
        (DHCP done, command starting), exit (command finished).
    duration: wall-clock seconds from starting qemu to its exit.
    """

    exit_status: int | None
    output: str
    console: str
    lease: dict[str, str]
    dhcp_ok: bool | None
    times: dict[str, float]
    timed_out: bool
    returncode: int | None
    duration: float
    command_line: list[str]

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    @classmethod
    def from_console(cls, out: bytes, *, timed_out: bool, returncode: int | None,
                     duration: float, command_line: list[str]) -> VmResult:
        """What the guest reported on its serial console (qemu's stdout, `out`)."""
        console = out.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "")
        exit_status, output, lease, dhcp_ok = _parse(console)
        return cls(
            exit_status=exit_status,
            output=output,
            console=console,
            lease=lease,
            dhcp_ok=dhcp_ok,
            times={m.group(1): float(m.group(2)) for m in _TIME_RE.finditer(console)},
            timed_out=timed_out,
            returncode=returncode,
            duration=duration,
            command_line=command_line,
        )


# --------------------------------------------------------------------------- images


@contextlib.contextmanager
def _cache_lock(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(cmd: Sequence[str], **kw) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)
    except FileNotFoundError as e:
        raise VmImageError(f"{cmd[0]} not found") from e
    except subprocess.CalledProcessError as e:
        raise VmImageError(f"{' '.join(cmd)} failed ({e.returncode}): {e.stderr.strip()}") from e


def _current_kernel(cache: Path) -> tuple[str, Path] | None:
    try:
        version = (cache / "kernel" / "current").read_text().strip()
    except FileNotFoundError:
        return None
    kdir = cache / "kernel" / version
    if version and (kdir / "vmlinuz").is_file() and (kdir / "modules").is_dir():
        return version, kdir
    return None


def _fetch_kernel(cache: Path) -> tuple[str, Path]:
    """apt-get download the current Debian cloud kernel and unpack it (no install)."""
    deps = _run(["apt-cache", "depends", KERNEL_META_PACKAGE]).stdout
    m = re.search(r"Depends:\s*linux-image-(\S+-cloud-amd64)", deps)
    if not m:
        raise VmImageError(f"cannot find the kernel behind {KERNEL_META_PACKAGE}:\n{deps}")
    version = m.group(1)
    kroot = cache / "kernel"
    kroot.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=kroot, prefix=".fetch-") as tmp:
        t = Path(tmp)
        os.chmod(t, 0o755)  # lets apt's sandbox user write here, avoiding a warning
        _run(["apt-get", "download", f"linux-image-{version}"], cwd=t)
        debs = list(t.glob("*.deb"))
        if len(debs) != 1:
            raise VmImageError(f"apt-get download produced {debs}")
        _run(["dpkg-deb", "-x", str(debs[0]), str(t / "root")])
        staged = t / version
        staged.mkdir()
        vmlinuz = next((t / "root" / "boot").glob("vmlinuz-*"))
        shutil.move(vmlinuz, staged / "vmlinuz")
        for cfg in (t / "root" / "boot").glob("config-*"):
            shutil.move(cfg, staged / "config")
        moddir = next((t / "root" / "lib" / "modules").iterdir())
        shutil.move(moddir, staged / "modules")
        final = kroot / version
        if final.exists():
            shutil.rmtree(final)
        os.rename(staged, final)
    tmpcur = kroot / ".current.tmp"
    tmpcur.write_text(version + "\n")
    os.replace(tmpcur, kroot / "current")
    return version, final


def _module_index(moddir: Path) -> dict[str, Path]:
    return {p.name[:-3].replace("-", "_"): p for p in moddir.rglob("*.ko")}


def _module_depends(ko: Path) -> list[str]:
    """The `depends=` field of a module's .modinfo (modules.dep is not shipped in the .deb)."""
    m = re.search(rb"(?:^|\x00)depends=([^\x00]*)\x00", ko.read_bytes())
    if not m:
        return []
    return [d.replace("-", "_") for d in m.group(1).decode().split(",") if d]


def _resolve_modules(moddir: Path, wanted: Sequence[str]) -> list[tuple[str, Path]]:
    """`wanted` plus their dependencies, dependencies first (insmod order)."""
    index = _module_index(moddir)
    order: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        if name not in index:
            raise VmImageError(f"kernel module {name} not found under {moddir}")
        for dep in _module_depends(index[name]):
            visit(dep)
        order.append((name, index[name]))

    for w in wanted:
        visit(w)
    return order


def _kernel_builtin_modules(kdir: Path) -> bool:
    """True if the kernel config says virtio-net is built in (then no modules needed)."""
    try:
        cfg = (kdir / "config").read_text()
    except FileNotFoundError:
        return False
    return all(f"CONFIG_{opt}=y" in cfg for opt in ("VIRTIO", "VIRTIO_PCI", "VIRTIO_NET"))


def _guest_modules(kdir: Path) -> tuple[str, ...]:
    """The modules to load: virtio-net unless built in, and ipv6 where it is a module.

    The tests check SLAAC, ping6 and TCP over IPv6 in the guest; Debian's cloud kernel
    builds IPv6 in (CONFIG_IPV6=y), but a kernel with it as a module would otherwise boot
    without IPv6 and fail those checks with no hint why.
    """
    try:
        cfg = (kdir / "config").read_text()
    except FileNotFoundError:
        cfg = ""
    wanted = () if _kernel_builtin_modules(kdir) else GUEST_MODULES
    if "CONFIG_IPV6=m" in cfg:
        wanted = ("ipv6", *wanted)
    return wanted


class _Cpio:
    """Minimal writer for the "newc" cpio format the kernel's initramfs unpacker reads."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)):
        encoded = name.encode() + b"\0"
        # ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        fields = [
            self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0,
        ]  # fmt: skip
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08X" % f for f in fields))
        self.buf.write(encoded)
        self.buf.write(b"\0" * (-(110 + len(encoded)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return gzip.compress(self.buf.getvalue(), compresslevel=6, mtime=0)


def _find_busybox() -> Path:
    for c in BUSYBOX_CANDIDATES:
        p = Path(c)
        if p.is_file():
            return p
    raise VmImageError("busybox not found (apt-get install -y busybox-static)")


def _build_initrd(dest: Path, busybox: bytes, init: bytes, modules: list[tuple[str, Path]]):
    c = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "tmp", "etc", "root", "lib", "lib/modules", "rn"):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3)
    c.file("bin/busybox", busybox, 0o755)
    c.file("init", init, 0o755)
    for name, path in modules:
        c.file(f"lib/modules/{name}.ko", path.read_bytes())
    c.file("lib/modules/load.list", "".join(f"{n}\n" for n, _ in modules).encode())
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_bytes(c.finish())
    os.replace(tmp, dest)


def build_vm_images(*, fetch: bool = True) -> VmImages:
    """Return the guest kernel and initramfs, building whatever is missing from the cache.

    fetch=False never runs apt (raises VmImageError if the kernel is not cached yet).
    """
    cache = CACHE_DIR
    with _cache_lock(cache):
        cur = _current_kernel(cache)
        if cur is None:
            if not fetch:
                raise VmImageError(
                    f"no guest kernel cached in {cache}; "
                    "run `python3 tests/support/vmguest.py build`"
                )
            cur = _fetch_kernel(cache)
        version, kdir = cur
        busybox = _find_busybox().read_bytes()
        init = INIT_SCRIPT.read_bytes()
        modules = _resolve_modules(kdir / "modules", _guest_modules(kdir))
        h = hashlib.sha256()
        for part in (BUILDER_VERSION.encode(), version.encode(), init, busybox):
            h.update(hashlib.sha256(part).digest())
        for name, path in modules:
            h.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
        initrd = cache / f"initrd-{h.hexdigest()[:16]}.img"
        if not initrd.is_file():
            _build_initrd(initrd, busybox, init, modules)
            for old in cache.glob("initrd-*.img"):  # keep the cache from growing forever
                if old != initrd and time.time() - old.stat().st_mtime > 86400:
                    old.unlink(missing_ok=True)
        return VmImages(kernel=kdir / "vmlinuz", initrd=initrd, kernel_version=version)


def vm_unavailable_reason() -> str | None:
    """Why a VM test cannot run here (for pytest.skip), or None if it can.

    Never fetches: a missing kernel is reported with the command that fetches it.
    """
    if shutil.which(QEMU) is None:
        return f"{QEMU} not installed (apt-get install -y qemu-system-x86)"
    try:
        build_vm_images(fetch=False)
    except VmImageError as e:
        return str(e)
    return None


# --------------------------------------------------------------------------- boot


def qemu_command(
    images: VmImages,
    socket_path: str | os.PathLike[str],
    *,
    append: Sequence[str] = DEFAULT_APPEND,
    initrd: Path | None = None,
    memory_mb: int = 256,
    mac: str = "52:54:00:12:34:56",
    extra_args: Sequence[str] = (),
    netdev: str = "stream",
    local_path: str | os.PathLike[str] | None = None,
) -> list[str]:
    """The qemu argv: q35 under TCG, serial console on stdout, one virtio-net NIC on a
    `-netdev stream` unix socket (qemu is the client) or, with netdev="dgram", a
    `-netdev dgram` socket bound at `local_path` sending to `socket_path`; nothing else."""
    return [
        QEMU,
        "-machine", "q35",
        "-accel", "tcg",
        "-cpu", "max",
        "-smp", "1",
        "-m", str(memory_mb),
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-serial", "stdio",
        "-monitor", "none",
        "-no-reboot",
        "-kernel", str(images.kernel),
        "-initrd", str(initrd or images.initrd),
        "-append", " ".join(append),
        "-netdev", netdev_spec(netdev, socket_path, local_path),
        "-device", f"virtio-net-pci,netdev=n0,mac={mac},romfile=",
        *extra_args,
    ]  # fmt: skip


def netdev_spec(
    netdev: str,
    socket_path: str | os.PathLike[str],
    local_path: str | os.PathLike[str] | None = None,
) -> str:
    """The `-netdev` value for the relay's socket: "stream" or "dgram" (needs local_path)."""
    if netdev == "stream":
        return f"stream,id=n0,server=off,addr.type=unix,addr.path={os.fspath(socket_path)}"
    if netdev == "dgram":
        if local_path is None:
            raise ValueError("-netdev dgram needs a local path for qemu's own socket")
        return (
            f"dgram,id=n0,local.type=unix,local.path={os.fspath(local_path)},"
            f"remote.type=unix,remote.path={os.fspath(socket_path)}"
        )
    raise ValueError(f"unknown netdev {netdev!r} (stream or dgram)")


_LEASE_RE = re.compile(r"^RN-LEASE (.*)$", re.M)
_EXIT_RE = re.compile(r"^RN-EXIT (\d+)$", re.M)
_TIME_RE = re.compile(r"^RN-TIME (\S+) ([\d.]+)$", re.M)


def _parse(console: str) -> tuple[int | None, str, dict[str, str], bool | None]:
    lease: dict[str, str] = {}
    for m in _LEASE_RE.finditer(console):
        lease = dict(kv.split("=", 1) for kv in m.group(1).split() if "=" in kv)
    dhcp_ok = True if "\nRN-DHCP-OK" in console else False if "\nRN-DHCP-FAIL" in console else None
    begin = console.find("RN-BEGIN\n")
    exit_m = _EXIT_RE.search(console, begin if begin >= 0 else 0)
    if begin < 0:
        return None, "", lease, dhcp_ok
    end = exit_m.start() if exit_m else len(console)
    output = console[begin + len("RN-BEGIN\n") : end]
    return (int(exit_m.group(1)) if exit_m else None), output, lease, dhcp_ok


def _overlay_initrd(base: Path, command: str, directory: Path) -> Path:
    """base initrd + an appended cpio holding /rn/cmd (the kernel unpacks both)."""
    c = _Cpio()
    c.file("rn/cmd", command.encode(), 0o644)
    out = directory / "initrd-with-cmd.img"
    with open(out, "wb") as f, open(base, "rb") as src:
        shutil.copyfileobj(src, f)
        f.write(c.finish())
    return out


def guest_boot_args(
    images: VmImages, command: str, directory: Path, *, dhcp: bool = True,
) -> tuple[list[str], Path]:
    """The whole kernel command line (qemu's `-append`, as words) and the initrd that
    make the guest run `command`: on the command line while it fits, else in an initrd
    overlay written to `directory`. For launchers other than boot_vm (examples/)."""
    encoded = base64.b64encode(command.encode()).decode()
    append = [*DEFAULT_APPEND, *([] if dhcp else ["rn.dhcp=0"])]
    if len(encoded) <= MAX_CMDLINE_COMMAND:
        return [*append, f"rn.cmd={encoded}"], images.initrd
    return append, _overlay_initrd(images.initrd, command, directory)


def boot_vm(
    socket_path: str | os.PathLike[str],
    command: str,
    timeout: float = 60.0,
    *,
    dhcp: bool = True,
    memory_mb: int = 256,
    extra_args: Sequence[str] = (),
    images: VmImages | None = None,
    netdev: str = "stream",
) -> VmResult:
    """Boot the guest connected to `socket_path`, run `command` (a /bin/sh script run by
    busybox in /root, after DHCP unless dhcp=False) and return what happened.

    netdev: "stream" (the relay listens on a stream socket) or "dgram" (the relay is
    bound at a datagram socket; qemu binds its own in a temporary directory).

    qemu is killed after `timeout` seconds (then timed_out=True, exit_status None); the
    process and any temporary files are always cleaned up.
    """
    if not stat.S_ISSOCK(os.stat(socket_path).st_mode):  # FileNotFoundError if absent
        raise ValueError(f"{os.fspath(socket_path)} is not a unix socket")
    images = images or build_vm_images(fetch=False)
    with tempfile.TemporaryDirectory(prefix="rn-vm-") as tmp:
        append, initrd = guest_boot_args(images, command, Path(tmp), dhcp=dhcp)
        argv = qemu_command(
            images,
            socket_path,
            append=append,
            initrd=initrd,
            memory_mb=memory_mb,
            extra_args=extra_args,
            netdev=netdev,
            local_path=Path(tmp) / "qemu.sock",
        )
        t0 = time.monotonic()
        timed_out = False
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        duration = time.monotonic() - t0
    return VmResult.from_console(out, timed_out=timed_out, returncode=proc.returncode,
                                 duration=duration, command_line=argv)


def _main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="fetch the kernel (apt) and build the initramfs")
    run = sub.add_parser("boot", help="boot the guest against a listening socket")
    run.add_argument("socket")
    run.add_argument("command")
    run.add_argument("--timeout", type=float, default=60.0)
    run.add_argument("--no-dhcp", action="store_true")
    run.add_argument("--netdev", choices=["stream", "dgram"], default="stream")
    args = p.parse_args(argv)
    if args.cmd == "build":
        im = build_vm_images()
        print(f"kernel  {im.kernel} ({im.kernel_version})\ninitrd  {im.initrd}")
        return 0
    r = boot_vm(args.socket, args.command, args.timeout, dhcp=not args.no_dhcp,
                netdev=args.netdev)
    sys.stdout.write(r.console)
    print(
        f"\n[vmguest] exit_status={r.exit_status} lease={r.lease} "
        f"times={r.times} timed_out={r.timed_out} duration={r.duration:.2f}s",
        file=sys.stderr,
    )
    return 0 if r.exit_status == 0 else 1


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
