"""The seccomp allowlist of a confined relay (libseccomp through pyseccomp).

The list is traced with the filter's default action set to SECCOMP_RET_LOG
(RELAYNAT_CONFINE_TRACE), so that the kernel logs every system call made outside it
(`audit: type=1326 ... syscall=N`) and lets it run; the whole integration and VM
suites ran so (docs/confinement.md, How the list was made). Every group, ioctl request
and socket option below says what needs it.
Architectures other than the native one are refused (libseccomp's bad-arch action),
so the x32 and i386 numberings cannot be used to slip past the list.

A call outside the list kills the whole process (SECCOMP_RET_KILL_PROCESS): a call
the relay never makes is a sign that something else runs in it, and returning EPERM
would let that go on trying; the kernel closes every descriptor of a killed process,
so the guest's link ends (a stream guest reads EOF, a TAP's command loses its parent
and is ended with it) and the host side of every flow sees its socket closed rather
than an open connection that never moves again. The kernel logs the kill
(`actions_logged` includes kill_process by default) with the call's number, and the
exit status is that of SIGSYS (159 from a shell).

Paths: open, stat, readlink, unlink and getdents on paths stay allowed, because after
the pivot_root they find nothing (the root is an empty read-only tmpfs) and Landlock
refuses what a descriptor opened before might reach beyond resolv.conf's directory;
killing on them would kill the relay for formatting a traceback (linecache opens the
source file) or for the resolv.conf look at a moment its directory is gone.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Collection
from typing import TypeVar

import pyseccomp

T = TypeVar("T")

#: clone(2) flags (include/uapi/linux/sched.h): a thread, never a new process.
_CLONE_THREAD = 0x00010000

#: Each group: what needs it. Names are libseccomp's; one the running architecture
#: does not have (x86_64's legacy calls on aarch64) is skipped.
GROUPS: dict[str, tuple[str, ...]] = {
    # The interpreter itself: memory (the allocator, numpy's buffers, mmap'd modules
    # already loaded), signals (asyncio's signal handlers, the wakeup fd), time, ids
    # asked for by logging and os, random numbers (hash seeds, the ICMP identifier
    # cursor, TCP initial sequence numbers), limits, and exiting.
    "interpreter": (
        "brk", "mmap", "munmap", "mremap", "mprotect", "madvise", "rt_sigaction",
        "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "restart_syscall",
        "clock_gettime", "clock_getres", "clock_nanosleep", "gettimeofday", "nanosleep",
        "time", "getpid", "gettid", "getppid", "getuid", "geteuid", "getgid", "getegid",
        "getresuid", "getresgid", "getgroups", "getrandom", "prlimit64", "getrlimit",
        "getrusage", "sysinfo", "uname", "sched_yield", "sched_getaffinity", "exit",
        "exit_group", "futex", "set_robust_list", "get_robust_list", "rseq",
        "set_tid_address", "membarrier", "getcwd", "capget", "getpriority",
        # ^C of `run` in a terminal: is the relay's process group the foreground one?
        "getpgrp",
    ),
    # Threads: asyncio.to_thread (a handover's blocking socket calls) starts executor
    # threads; clone is allowed for threads only (the flag check in `install`), clone3
    # answers ENOSYS so that glibc falls back to clone.
    # Descriptors: every socket, the TAP, epoll, pipes, the pcap file, duplicated and
    # closed sockets of a handover, fcntl for O_NONBLOCK and FD_CLOEXEC (and
    # F_SETPIPE_SZ); splice moves a spliced forward's bytes between its sockets through
    # a pipe pair (host/splice.py).
    "descriptors": (
        "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev",
        "close", "close_range", "dup", "dup2", "dup3", "fcntl", "lseek", "fstat",
        "fsync", "fdatasync", "ftruncate", "pipe", "pipe2", "eventfd2", "splice",
    ),
    # The event loop: uvloop's (libuv) epoll, asyncio's selectors, the nested
    # edge-triggered epoll of the TCP relay, timers.
    "event loop": (
        "epoll_create", "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait",
        "epoll_pwait2", "poll", "ppoll", "select", "pselect6", "timerfd_create",
        "timerfd_settime", "timerfd_gettime", "signalfd4",
    ),
    # Sockets: host sockets of flows and forwards (bound, connected, accepted), ping
    # and raw ICMP sockets, the control socket's clients, a handover's SCM_RIGHTS,
    # the queue sizes (IOCTLS below), socket options (SOCKOPTS below). socket(2) is
    # limited to AF_INET and AF_INET6 (_FAMILIES below): no netlink, packet or unix
    # socket is made after confinement (the --interface one exists before).
    "sockets": (
        "socketpair", "bind", "listen", "connect", "accept", "accept4", "getsockname",
        "getpeername", "getsockopt", "sendto", "recvfrom", "sendmsg",
        "recvmsg", "sendmmsg", "recvmmsg", "shutdown",
    ),
    # Paths (see the module docstring): they find an empty root; resolv.conf is read
    # through its directory's descriptor (openat, newfstatat, readlinkat).
    "paths": (
        "open", "openat", "stat", "lstat", "newfstatat", "statx", "readlink",
        "readlinkat", "access", "faccessat", "faccessat2", "getdents64", "unlink",
        "unlinkat", "fstatfs", "statfs",
    ),
    # The command of `relaynat run` and a handed-over command: signals passed on and
    # the namespace ended (kill, below: one process; pidfd_send_signal), a handover's pidfd,
    # and reaping it (uvloop's SIGCHLD handler waits with wait4).
    "processes": ("tgkill", "tkill", "pidfd_open", "pidfd_send_signal", "wait4",
                  "waitid"),
}

#: socket(2) address families allowed after confinement: AF_INET and AF_INET6. Every
#: unix socket a confined relay uses exists before (the control socket, a stream
#: guest's listener, the janitor's pair) or comes accepted or passed (SCM_RIGHTS), and
#: socketpair(2) stays; a new AF_UNIX socket could only reach abstract names (a path
#: leads nowhere from the empty root): bind one a host daemon expects, or connect to
#: one, which Landlock refuses only from ABI 6.
_FAMILIES = (2, 10)

#: ioctl(2) requests allowed after confinement, each with what makes it: any other
#: request kills. An ioctl is a call into whatever driver holds the descriptor, and
#: the relay holds some that must not be driven: the terminal `run` was started from
#: (TIOCSTI types into the shell that started the relay, with dev.tty.legacy_tiocsti
#: at its default of 1) and, with CAP_NET_ADMIN kept for TCP_REPAIR, any AF_INET
#: socket (SIOCSIFFLAGS, SIOCSIFADDR, SIOCADDRT reconfigure the host's interfaces
#: and routes).
IOCTLS: dict[int, str] = {
    0x541B: "FIONREAD (SIOCINQ): a socket's queued bytes (host/tcp_repair.py)",
    0x5411: "TIOCOUTQ (SIOCOUTQ): a host socket's unacknowledged bytes (host/tcp_flow.py)",
    0x894B: "SIOCOUTQNSD: the unsent part of them, for an export (host/tcp_repair.py)",
    0x5421: "FIONBIO: CPython's socket.setblocking, libuv's non-blocking descriptors",
    0x5451: "FIOCLEX: CPython's os.set_inheritable(False), libuv",
    0x5450: "FIONCLEX: CPython's os.set_inheritable(True)",
    0x5401: "TCGETS: isatty(3), which Python's open() and stdio ask",
    0x540F: "TIOCGPGRP: run's ^C check, tcgetpgrp(3) of its terminal (cli/main.py)",
    0x800454D2: "TUNGETIFF: a handed-over TAP checked (moving/handover_transport.py)",
    0x8910: "SIOCGIFNAME: CPython's getsockname() of a packet socket names its interface "
            "(a handed-over --interface checked, moving/handover_transport.py)",
}
#: setsockopt(2) (level, option) pairs allowed after confinement, each with what sets
#: it: any other kills. Most options touch the socket alone, but with CAP_NET_ADMIN
#: (kept for TCP_REPAIR) some reach the host: IPPROTO_IP's netfilter range
#: (IPT_SO_SET_REPLACE 64, ARPT 96, EBT 128, IP_VS 1024: on any IPv4 socket) replaces
#: its firewall tables, IP_TRANSPARENT binds to any address (a spoofed source),
#: SO_MARK slips past mark-based routing and firewall rules, TCP_ULP and
#: TCP_CONGESTION load kernel modules.
SOCKOPTS: dict[tuple[int, int], str] = {
    (1, 2): "SO_REUSEADDR: forwards' and the control socket's listeners (asyncio, libuv)",
    (1, 7): "SO_SNDBUF: a unixgram guest's socket (transports/unixgram.py)",
    (1, 8): "SO_RCVBUF: host sockets' receive buffers (host/pump.py, host/sockets.py)",
    (1, 32): "SO_SNDBUFFORCE: as SO_SNDBUF, with CAP_NET_ADMIN (transports/unixgram.py)",
    (1, 33): "SO_RCVBUFFORCE: as SO_RCVBUF, with CAP_NET_ADMIN (host/pump.py)",
    (1, 13): "SO_LINGER: a flow reset toward its host peer (host/tcp_flow.py)",
    (1, 25): "SO_BINDTODEVICE: a forward's ADDR%IF (host/forward.py)",
    (1, 42): "SO_PEEK_OFF: host TCP sockets read by peeking (host/tcp_flow.py)",
    (6, 1): "TCP_NODELAY: host flows, the relay's own connections (asyncio, libuv)",
    (6, 19): "TCP_REPAIR: ctl export/import, handover (host/tcp_repair.py)",
    (6, 20): "TCP_REPAIR_QUEUE: the same",
    (6, 21): "TCP_QUEUE_SEQ: the same",
    (6, 22): "TCP_REPAIR_OPTIONS: the same",
    (6, 24): "TCP_TIMESTAMP: the same",
    (6, 29): "TCP_REPAIR_WINDOW: the same",
    (41, 26): "IPV6_V6ONLY: forwards' IPv6 listeners (host/forward.py, asyncio, libuv)",
}
#: kill(2)'s pid: one process (0 < pid < 2**31; or 0, the relay's own process group),
#: never -1 (every process the caller may signal: with CAP_KILL, kept for a joined
#: namespace's command, every process of the host) nor a group (-PGID). A register
#: whose lower half is negative fails the mask however its upper half is set.
_ONE_PROCESS = (0xFFFF_FFFF_8000_0000, 0)
#: The kernel reads an ioctl's request as an unsigned int (fs/ioctl.c), and a socket
#: option's level and name as ints (net/socket.c): the upper half of the register is
#: not compared, as it is not used.
_LOWER_32 = 0xFFFF_FFFF


def allowed() -> list[str]:
    """Every allowed call name, in group order."""
    return list(dict.fromkeys(name for names in GROUPS.values() for name in names))


def install(action: str = "kill", extra: Collection[str] = ()) -> None:
    """Load the filter into every thread of this process (TSYNC); needs no_new_privs or
    CAP_SYS_ADMIN. `action` for a call outside the list: "kill" (the default) or "log"
    (allowed and logged by the kernel: how the list is traced). `extra`: more names."""
    default = pyseccomp.KILL_PROCESS if action == "kill" else pyseccomp.LOG
    flt = pyseccomp.SyscallFilter(default)
    flt.set_attr(pyseccomp.Attr.CTL_TSYNC, 1)
    for name in [*allowed(), *extra]:
        try:
            flt.add_rule(pyseccomp.ALLOW, name)
        except (OSError, ValueError):
            continue  # not a call of this architecture
    flt.add_rule(pyseccomp.ALLOW, "clone",
                 pyseccomp.Arg(0, pyseccomp.MASKED_EQ, _CLONE_THREAD, _CLONE_THREAD))
    flt.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")
    for family in _FAMILIES:
        flt.add_rule(pyseccomp.ALLOW, "socket", pyseccomp.Arg(0, pyseccomp.EQ, family))
    for request in IOCTLS:
        flt.add_rule(pyseccomp.ALLOW, "ioctl",
                     pyseccomp.Arg(1, pyseccomp.MASKED_EQ, _LOWER_32, request))
    flt.add_rule(pyseccomp.ALLOW, "kill", pyseccomp.Arg(0, pyseccomp.MASKED_EQ, *_ONE_PROCESS))
    for level, option in SOCKOPTS:
        flt.add_rule(pyseccomp.ALLOW, "setsockopt",
                     pyseccomp.Arg(1, pyseccomp.MASKED_EQ, _LOWER_32, level),
                     pyseccomp.Arg(2, pyseccomp.MASKED_EQ, _LOWER_32, option))
    flt.load()


def without_io_uring(make: Callable[[], T]) -> T:
    """`make()` (an event loop's constructor) run in a thread of its own whose seccomp
    filter answers io_uring_setup(2) with ENOSYS, and its result.

    libuv (uvloop) sets up an io_uring with each loop to batch epoll_ctl, whatever
    UV_USE_IO_URING says, and aborts if io_uring_enter(2) later fails; the relay's
    filter refuses io_uring (a large kernel surface: its operations, openat and
    connect among them, are not system calls a filter sees), so the loop must be made
    without one. A filter is a thread's: the thread ends with it, and nothing this
    process starts later (the namespace child, the guest's command) inherits it."""
    result: list[T] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            from relaynat.netns.syscalls import PR_SET_NO_NEW_PRIVS, prctl

            prctl(PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")  # this thread's only
            flt = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
            flt.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "io_uring_setup")
            flt.load()
            result.append(make())
        except BaseException as exc:  # handed to the caller's thread
            failed.append(exc)

    thread = threading.Thread(target=run, name="relaynat-loop-maker")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return result[0]
