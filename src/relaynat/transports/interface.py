"""Interface transport: serve a guest whose frames appear on a host-side interface.

Firecracker and cloud-hypervisor open the TAP device themselves (`host_dev_name`,
`--net tap=tap0`): whatever the guest transmits leaves the VMM as a write to the TAP
and shows up on the host as a frame *received* by `tap0`; whatever the host transmits
on `tap0` reaches the guest. A veth pair whose far end sits in another namespace
behaves the same way. So the relay attaches to the interface with a packet socket
(packet(7)), not to the TAP fd:

- `AF_PACKET, SOCK_RAW`, bound to the interface's ifindex with `ETH_P_ALL`: every
  frame the interface receives, whatever its ethertype or destination MAC. The socket
  is created with protocol 0 and only bound (which registers the receive hook) once
  every option is set, so no frame of another interface is ever queued.
- `PACKET_IGNORE_OUTGOING` (Linux 4.20+): the socket does not see frames the host
  transmits on the interface. Our own injections are never looped back to the socket
  that sent them anyway (`dev_queue_xmit_nit` skips the originating socket), but other
  host traffic leaving the interface (the host kernel's IPv6 solicitations, another
  sniffer injecting) would otherwise look like the guest speaking. Older kernels:
  `recvfrom` and drop `sll_pkttype == PACKET_OUTGOING`.
- `PACKET_ADD_MEMBERSHIP(PACKET_MR_PROMISC)`: the guest addresses the gateway MAC,
  not the interface's. TAP and veth deliver every unicast frame anyway, but a NIC
  filters them; the membership is counted per socket and the kernel drops it when the
  socket closes, so nothing outlives the relay.
- `PACKET_VNET_HDR` (on by default): every frame carries the 10-byte `struct
  virtio_net_hdr` both ways, exactly as our TAP path with offload. Toward the guest
  we then send 64 KiB GSO_TCPV4 super-frames with NEEDS_CSUM, and the kernel segments
  and checksums them (in software if the device lacks TSO, in the guest's kernel if
  the VMM's TAP took the offload): one `sendmsg` per 64 KiB at any MTU. See the
  module docstring of packet_builder.py; the header we receive is skipped (the relay
  does not verify TCP/UDP checksums, and a GSO frame from the guest arrives whole).
- Not used, measured (benches/interface_throughput.py, docs/performance.md): without the header,
  plain MSS-sized frames toward a guest at MTU 1500 cost one checksum and one syscall
  each (several times slower); `PACKET_QDISC_BYPASS` drops every GSO frame the device
  must segment in software (`__dev_direct_xmit` gives up when validate_xmit_skb
  replaces the skb, and packet-socket GSO is SKB_GSO_DODGY), so host->guest stalls,
  and without the header it gained nothing on veth (noqueue); a `PACKET_RX_RING`
  (TPACKET_V2, 64 KiB slots) was within noise of `recv_into` here, for 16 MiB of
  kernel memory per guest. TPACKET_V3 hands over blocks only when full or at a
  millisecond timer, which would delay the guest's ACKs.
- `SO_RCVBUF`/`SO_SNDBUF` forced large: the packet socket's default (rmem_default,
  ~208 KiB) holds only three 64 KiB super-frames, and a frame that does not fit is
  dropped by the kernel, which the guest's TCP pays for with a retransmission.

The host kernel must not answer the guest itself: the interface should have no IPv4
address (else the host answers ARP for it and routes the guest's packets) and,
ideally, no IPv6 link-local either (`ip link set tap0 addrgenmode none` before it
goes up). The transport changes no addressing or routing; `open()` warns when the
interface has an IPv4 address and refuses an interface that is missing or down.

When the interface goes down or is removed, the kernel sets ENETDOWN on the socket
(packet_notifier); the next read fails with it and the transport is lost.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import socket
import struct

from relaynat.errors import Error
from relaynat.guest_log import guest_logger
from relaynat.transports.base import WAKEUP_SLICE_S, FrameSink, TransportBase, slice_clock

log = guest_logger("relaynat.interface")

# <linux/if_packet.h> and <linux/if_ether.h>; Python's socket module lacks most.
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
PACKET_VNET_HDR = 15
PACKET_IGNORE_OUTGOING = 23
PACKET_OUTGOING = 4
ETH_P_ALL = 0x0003
# <linux/sockios.h>
SIOCGIFFLAGS = 0x8913
SIOCGIFADDR = 0x8915
SIOCGIFMTU = 0x8921
IFF_UP = 0x1
#: IFNAMSIZ (16) minus the terminating NUL.
IFNAME_MAX = 15
#: `struct virtio_net_hdr` without num_buffers: what PACKET_VNET_HDR prepends.
PACKET_VNET_HDR_LEN = 10

_FRAMES_PER_WAKEUP = 128
# A GSO super-frame from a veth or TAP: up to 64 KiB of IP plus headers.
_FRAME_MAX = 65536 + 256
#: Room for a batch's frames, each in its own stretch (`keeps_frames`), as transports/tap.py.
_BUF_SIZE = 16 * _FRAME_MAX
_SOCKET_BUF = 8 << 20
_PACKET_MREQ = struct.Struct("iHH8s")  # mr_ifindex, mr_type, mr_alen, mr_address


class InterfaceError(Error, OSError):
    """The interface cannot be served; the message names it and says why."""


def check_interface_name(name: str) -> str:
    """Return `name` if the kernel could accept it as an interface name (the rules of
    dev_valid_name in net/core/dev.c), else raise ValueError saying what is wrong."""
    if not name:
        raise ValueError("interface name is empty")
    if len(name.encode()) > IFNAME_MAX:
        raise ValueError(f"interface name {name!r} is longer than {IFNAME_MAX} bytes")
    if name in (".", ".."):
        raise ValueError(f"{name!r} is not an interface name")
    bad = [c for c in name if c in "/:" or c.isspace()]
    if bad:
        raise ValueError(f"interface name {name!r} contains {bad[0]!r} "
                         "(no '/', ':' or whitespace allowed)")
    return name


def _ifreq_int(sock: socket.socket, request: int, name: str) -> int:
    """An int-valued SIOCGIF* ioctl (struct ifreq: 16-byte name, then the union)."""
    ifreq = struct.pack("16s16x", name.encode())
    value: int = struct.unpack_from("i", fcntl.ioctl(sock.fileno(), request, ifreq), 16)[0]
    return value


def _ipv4_address(name: str) -> str | None:
    """The interface's primary IPv4 address, or None (SIOCGIFADDR: EADDRNOTAVAIL)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            out = fcntl.ioctl(probe.fileno(), SIOCGIFADDR, struct.pack("16s16x", name.encode()))
        except OSError:
            return None
    return socket.inet_ntoa(out[20:24])  # sockaddr_in at 16: family, port, then address


class InterfaceTransport(TransportBase):
    """A packet socket on one interface; build it with `InterfaceTransport.open(name)`,
    which sets the socket up and passes what it found out to the constructor."""

    keeps_frames = True

    def __init__(self, sock: socket.socket, name: str, ifindex: int, mtu: int,
                 vnet_hdr: bool, ignores_outgoing: bool,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.sock = sock
        self.name = name
        self.ifindex = ifindex
        #: The interface's MTU when opened: the largest plain frame it sends (GSO frames
        #: may be larger); a guest MTU above it would have its replies refused.
        self.mtu = mtu
        self.vnet_hdr_len = PACKET_VNET_HDR_LEN if vnet_hdr else 0
        # With the header the kernel completes NEEDS_CSUM and segments GSO frames for
        # any device (validate_xmit_skb), so offload needs nothing from the interface.
        self.offload = vnet_hdr
        self._ignores_outgoing = ignores_outgoing
        self._loop = loop
        self._buf = bytearray(_BUF_SIZE)
        self._view = memoryview(self._buf)
        self._sink: FrameSink | None = None
        self.send_errors = 0
        self.frames_truncated = 0
        self.frames_outgoing_ignored = 0

    @classmethod
    def open(cls, name: str, *, vnet_hdr: bool = True, promisc: bool = True,
             loop: asyncio.AbstractEventLoop | None = None) -> InterfaceTransport:
        """Attach to interface `name` in the current network namespace.

        Raises ValueError for a name the kernel could never accept and InterfaceError
        (an OSError) when the interface is missing or down, or the socket is refused
        (packet sockets need CAP_NET_RAW).
        """
        check_interface_name(name)
        try:
            ifindex = socket.if_nametoindex(name)
        except OSError:
            raise InterfaceError(errno.ENODEV, f"interface {name!r} does not exist in this "
                                 "network namespace") from None
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_NONBLOCK
                                 | socket.SOCK_CLOEXEC, 0)
        except PermissionError as exc:
            raise InterfaceError(exc.errno, f"interface {name!r}: a packet socket needs "
                                 "CAP_NET_RAW") from None
        try:
            flags = _ifreq_int(sock, SIOCGIFFLAGS, name)
            if not flags & IFF_UP:
                raise InterfaceError(errno.ENETDOWN, f"interface {name!r} is down "
                                     f"(bring it up first: ip link set {name} up)")
            mtu = _ifreq_int(sock, SIOCGIFMTU, name)
            address = _ipv4_address(name)
            if address is not None:
                log.warning("interface %s has IPv4 address %s: the host kernel answers ARP "
                            "for it and may route the guest's packets itself; serve an "
                            "interface without addresses", name, address)
            if vnet_hdr:
                sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            try:
                sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
                ignores_outgoing = True
            except OSError:  # before 4.20: filter on sll_pkttype per frame instead
                ignores_outgoing = False
            for opt, force in ((socket.SO_RCVBUF, 33), (socket.SO_SNDBUF, 32)):
                try:  # SO_RCVBUFFORCE / SO_SNDBUFFORCE pass rmem_max/wmem_max (root)
                    sock.setsockopt(socket.SOL_SOCKET, force, _SOCKET_BUF)
                except OSError:
                    sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKET_BUF)
            sock.bind((name, ETH_P_ALL))
            if sock.getsockname()[0] != name:  # renamed or replaced in between
                raise InterfaceError(errno.ENODEV, f"interface {name!r} changed while "
                                     "attaching; try again")
            if promisc:
                sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP,
                                _PACKET_MREQ.pack(ifindex, PACKET_MR_PROMISC, 0, b""))
        except InterfaceError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            raise InterfaceError(exc.errno, f"interface {name!r}: {exc.strerror}") from None
        log.info("opened interface %s (ifindex %d, mtu %d, vnet header %s, promisc %s)",
                 name, ifindex, mtu, "on" if vnet_hdr else "off", "on" if promisc else "off")
        return cls(sock, name, ifindex, mtu, vnet_hdr, ignores_outgoing, loop)

    def start(self, sink: FrameSink) -> None:
        self._sink = sink
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._on_readable)
        # Said once the guest is served: `serve` installs its signal handlers before
        # attaching, so a launcher that waits for this line may stop it right after.
        log.info("serving interface %s", self.name)

    def _on_readable(self) -> None:
        sink = self._sink
        assert sink is not None
        sock, view, skip = self.sock, self._view, self.vnet_hdr_len
        size = _FRAME_MAX
        last, at = len(view) - size, 0
        deadline = slice_clock() + WAKEUP_SLICE_S
        for _ in range(_FRAMES_PER_WAKEUP):
            if at > last:
                sink.end_of_batch()  # the frames read so far are done with
                at = 0
            slot = view[at:at + size]
            try:
                if self._ignores_outgoing:
                    # MSG_TRUNC: the return value is the frame's real length, so a
                    # frame larger than the buffer is seen and dropped, not cut short.
                    n = sock.recv_into(slot, size, socket.MSG_TRUNC)
                else:
                    n, addr = sock.recvfrom_into(slot, size, socket.MSG_TRUNC)
                    if addr[2] == PACKET_OUTGOING:
                        self.frames_outgoing_ignored += 1
                        continue
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError as exc:
                # ENETDOWN: the interface went down or was unregistered (packet(7),
                # packet_notifier); ENXIO/ENODEV if it vanished under a read.
                self._lost(f"interface {self.name}: {exc.strerror} (down or removed)")
                return
            if n > size:
                self.frames_truncated += 1
                continue
            if n > skip:
                sink.handle_frame(view[at + skip:at + n])
                at += (n + 63) & ~63  # the next frame on a cache line of its own
                if slice_clock() > deadline:
                    break
        sink.end_of_batch()

    def stop(self) -> None:
        """`HandoverTransport`: stop reading, the socket open and bound. Frames the
        interface receives meanwhile wait in the socket's receive queue (SO_RCVBUF);
        its options and the promiscuous membership belong to the socket, so whoever
        holds it next serves the same interface as it is."""
        if self._sink is not None and self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
        self._sink = None

    @property
    def ignores_outgoing(self) -> bool:
        """PACKET_IGNORE_OUTGOING is set (else outgoing frames are filtered per read)."""
        return self._ignores_outgoing

    def send(self, head: bytes, payload: bytes | memoryview = b"") -> None:
        try:
            if payload:
                self.sock.sendmsg((head, payload))
            else:
                self.sock.send(head)
        except OSError as exc:
            # ENETDOWN/ENXIO while the link is going away (the reader reports it),
            # ENOBUFS/EAGAIN under pressure, EMSGSIZE for a frame over the MTU: the
            # frame is lost like on a wire, and TCP recovers it.
            self.send_errors += 1
            log.debug("send on %s failed: %s", self.name, exc)

    def stats(self) -> dict[str, int]:
        """The transport's own counters, for `--stats`."""
        return {"interface_send_errors": self.send_errors,
                "interface_frames_truncated": self.frames_truncated,
                "interface_outgoing_ignored": self.frames_outgoing_ignored}

    def close(self) -> None:
        if self._sink is not None and self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
        self._sink = None
        if self.sock.fileno() >= 0:
            self.sock.close()
