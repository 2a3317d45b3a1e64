"""The `relaynat` command line's options: the parser, and the RelayConfig, egress policy
and port forwards they stand for. Options are named as pasta and slirp4netns users know
them where they exist (`-a/--address`, `-g/--gateway`, `-m/--mtu`, `--map-host-loopback`,
`--pcap`). A bad value is refused with a message naming the option and the problem:
argparse's for a malformed value (exit 2), ConfigError for values that disagree.
No I/O beyond reading a policy file.
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
from ipaddress import IPv4Address, IPv6Address, IPv6Network

from relaynat import __version__
from relaynat.config import (
    MAX_MTU,
    MIN_MTU,
    ConfigError,
    RelayConfig,
    parse_ip,
    parse_ipv4,
    parse_ipv6,
)
from relaynat.control.client import add_parser as add_ctl_parser
from relaynat.policy import Policy
from relaynat.portspec import Forward as PortForward
from relaynat.portspec import parse_portspec
from relaynat.syn_backlog import SYN_RATE
from relaynat.transports.interface import check_interface_name

#: Whether `run` and `serve` confine the relay without --confine or --no-confine.
CONFINE_BY_DEFAULT = True
#: Why a relay with `serve --unixgram` cannot be confined: it answers a datagram guest
#: at the path that guest sends from, and a confined relay has no path left to reach
#: it by (nor, as nobody, the right to write to a socket file root made).
UNIXGRAM_UNCONFINED = ("--unixgram: a confined relay cannot answer its guest (it sends "
                       "to the socket path the guest sends from, and has no path left)")


def resolve_confinement(args: argparse.Namespace) -> str | None:
    """Settle `args.confine` for `run` and `serve`: --confine or --no-confine as given,
    else CONFINE_BY_DEFAULT unless the options ask for what cannot work confined.
    Returns why the relay runs unconfined by default (to be said at start), None
    otherwise; ConfigError when --confine asks for it anyway."""
    why = UNIXGRAM_UNCONFINED if getattr(args, "unixgram", None) else None
    if args.confine is None:
        args.confine = CONFINE_BY_DEFAULT and why is None
        return why if CONFINE_BY_DEFAULT else None
    if args.confine and why is not None:
        raise ConfigError(f"{why}: give --no-confine, or serve the guest on --socket, "
                          "--interface or --fd")
    return None


def _mib(text: str) -> int:
    """A size in MiB, 0 allowed (fractions too), as bytes."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of MiB") from None
    if not 0 <= value <= 1 << 20:
        raise argparse.ArgumentTypeError(f"{value} MiB is out of range")
    return int(value * (1 << 20))


def _positive_int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be positive")
    return value


def _rate(text: str, hint: str) -> float:
    """`N` or `N/s`: flows per second, positive and finite; `hint` ends the refusal."""
    number = text[:-2] if text.endswith("/s") else text
    try:
        value = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of flows per second "
                                         "(N or N/s)") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of flows per "
                                         f"second ({hint})")
    return value


def _runas(text: str) -> tuple[int, int]:
    """--runas USER|UID[:GROUP|GID] (a lone user: its primary group from the user
    database, a uid it lacks: the gid of the same number); root (0) refused: it would
    undo the isolation."""
    user, sep, group = text.partition(":")
    if not user or (sep and not group):
        raise argparse.ArgumentTypeError(f"{text!r} is not USER, UID, USER:GROUP or UID:GID")
    try:
        uid = int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid
        if sep:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        else:
            gid = pwd.getpwuid(uid).pw_gid if user.isdigit() else pwd.getpwnam(user).pw_gid
    except KeyError:
        if not sep and user.isdigit():
            gid = uid
        else:
            raise argparse.ArgumentTypeError(f"{text}: no such user or group") from None
    ids = uid, gid
    if 0 in ids:
        raise argparse.ArgumentTypeError(
            f"{text}: the command's root may not be root outside its namespace (it could "
            "open every file root may)")
    if max(ids) >= 0xFFFFFFFF:  # (uid_t)-1 means "no change" and cannot be mapped
        raise argparse.ArgumentTypeError(f"{text}: ids are 32-bit, below 4294967295")
    return ids


def _flow_rate(text: str) -> float:
    """--new-flow-rate: without the option, new flows are unlimited."""
    return _rate(text, "leave the option out for no limit")


def _syn_rate(text: str) -> float:
    """--syn-rate: always a rate (the SYN backlog has no "off"), by default SYN_RATE."""
    return _rate(text, f"default {SYN_RATE:g}; a large number lifts it")


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("guest addressing (defaults as slirp: 10.0.2.0/24)")
    g.add_argument("-a", "--address", default="10.0.2.15/24", metavar="ADDR[/PREFIX]",
                   help="guest IPv4 address and prefix length (default %(default)s)")
    g.add_argument("-g", "--gateway", default="10.0.2.2", metavar="ADDR",
                   help="gateway address the guest routes through (default %(default)s)")
    g.add_argument("-D", "--dns", default="10.0.2.3", metavar="ADDR",
                   help="DNS address announced by DHCP (default %(default)s)")
    g.add_argument("--dns-upstream", metavar="ADDR",
                   help="resolver (IPv4 or IPv6) the DNS addresses forward to, port 53 "
                        "(default: the first nameserver of --resolv-conf, followed as the "
                        "file changes)")
    g.add_argument("--resolv-conf", default="/etc/resolv.conf", metavar="PATH",
                   help="the host's resolver configuration, whose first nameserver DNS "
                        "goes to without --dns-upstream; followed as it changes (VPN, DHCP, "
                        "NetworkManager): looked at again at most once a second, when the "
                        "guest asks (default %(default)s)")
    g.add_argument("--dns-record", action="append", default=[], metavar="NAME=ADDR",
                   help="answer A (IPv4 ADDR) or AAAA (IPv6 ADDR) queries for NAME at the "
                        "DNS addresses (repeatable; a name may have several)")
    g.add_argument("-m", "--mtu", type=int, default=None, metavar="N",
                   help=f"guest MTU, {MIN_MTU}..{MAX_MTU} (default {MAX_MTU}, as passt; "
                        "with --interface, the interface's MTU)")
    g.add_argument("--map-host-loopback", default="gateway", metavar="ADDR|none",
                   help="guest address whose traffic goes to the host's 127.0.0.1 (an "
                        "IPv6 ADDR: to ::1); 'none' cuts the guest off from host loopback "
                        "(default: the gateway, fd00::2 for IPv6)")
    v6 = p.add_argument_group("IPv6 (defaults as slirp: fd00::/64, SLAAC, DHCPv6)")
    family = v6.add_mutually_exclusive_group()
    family.add_argument("-4", "--ipv4-only", action="store_true",
                        help="serve IPv4 only: IPv6 frames are dropped and counted")
    family.add_argument("-6", "--ipv6-only", action="store_true",
                        help="serve IPv6 only: no ARP, DHCP or IPv4 relaying")
    v6.add_argument("--prefix6", default="fd00::/64", metavar="PREFIX/64",
                    help="prefix the router advertisement offers (default %(default)s)")
    v6.add_argument("--address6", default="fd00::15", metavar="ADDR",
                    help="address DHCPv6 assigns and `run` configures (default %(default)s)")
    v6.add_argument("--gateway6", default="fd00::2", metavar="ADDR",
                    help="IPv6 gateway address (default %(default)s)")
    v6.add_argument("--dns6", default="fd00::3", metavar="ADDR",
                    help="IPv6 DNS address announced by RA and DHCPv6 (default %(default)s)")
    fw = p.add_argument_group("inbound forwards and egress policy")
    fw.add_argument("-t", "--tcp-ports", action="append", default=[], metavar="SPEC",
                    help="forward host TCP ports to the guest, passt's syntax: "
                         "[ADDR[%%IF]/]PORT[-PORT][:GUESTPORT[-GUESTPORT]], comma lists, "
                         "~EXCLUDE, all; host port 0 picks a free one (repeatable)")
    fw.add_argument("-u", "--udp-ports", action="append", default=[], metavar="SPEC",
                    help="forward host UDP ports to the guest, same syntax as -t "
                         "(repeatable)")
    fw.add_argument("--inbound-source", choices=["gateway", "client"], default="gateway",
                    help="source address the guest sees on forwarded connections: the "
                         "gateway (default, as passt) or the client's real address "
                         "(host-loopback clients still appear as the gateway)")
    policy = fw.add_mutually_exclusive_group()
    policy.add_argument("--policy", metavar="FILE",
                        help="egress policy for the guest's flows (TOML, or JSON if FILE "
                             "ends in .json): first-match allow/deny rules")
    policy.add_argument("--sandbox", action="store_true",
                        help="deny the metadata address, link-local and private ranges and "
                             "host loopback; allow the rest")
    policy.add_argument("--allow-domain", action="append", default=[], metavar="NAME",
                        help="allow TCP 80 and 443 to NAME (a name, or *.NAME for the names "
                             "below it) as resolved through the relay, the name on the wire "
                             "checked, and deny everything else; other names get REFUSED "
                             "(repeatable)")
    lim = p.add_argument_group("limits")
    lim.add_argument("--max-tcp-flows", "--max-flows", dest="max_flows", type=_positive_int,
                     default=16384, metavar="N",
                     help="concurrent TCP flows; SYNs beyond get RST (default %(default)s)")
    lim.add_argument("--max-udp-flows", type=_positive_int, default=4096, metavar="N",
                     help="concurrent UDP flows; datagrams that would open more are dropped "
                          "(default %(default)s)")
    lim.add_argument("--max-icmp-flows", type=_positive_int, default=1024, metavar="N",
                     help="concurrent ping sessions (identifier, destination); echo "
                          "requests that would open more are dropped (default %(default)s)")
    lim.add_argument("--new-flow-rate", type=_flow_rate, metavar="N[/s]",
                     help="new guest flows per second, TCP, UDP (DNS included) and ping "
                          "together: SYNs over it get RST, datagrams are dropped "
                          "(default: unlimited; forwarded inbound flows do not count)")
    lim.add_argument("--new-flow-burst", type=_positive_int, metavar="N",
                     help="new flows allowed at once after a quiet spell (default: one "
                          "second's worth of --new-flow-rate)")
    lim.add_argument("--syn-rate", type=_syn_rate, default=SYN_RATE, metavar="N[/s]",
                     help="guest TCP flows opened per second under a stream of SYNs, after "
                          "a burst of 256; the SYNs beyond wait (up to 1024), then are "
                          "dropped for the guest to retransmit (default %(default)g)")
    lim.add_argument("--first-flight-timeout", type=_positive_float, default=10.0,
                     metavar="SECONDS",
                     help="how long a guest has to send the TLS ClientHello or HTTP request "
                          "of a flow whose name is checked (--allow-domain, domain rules) "
                          "before it is reset (default %(default)g)")
    lim.add_argument("--max-pending-connects", type=_positive_int, default=512, metavar="N",
                     help="host connects in progress (default %(default)s)")
    lim.add_argument("--tcp-ooo-budget", type=_mib, default="16", metavar="MIB",
                     help="out-of-order guest TCP data held by all flows together, in MiB; "
                          "0: none, and no SACK (default %(default)s)")
    p.add_argument("--audit", metavar="FILE",
                   help="append an audit trail to FILE, JSON lines: each flow decision "
                        "(names, SNI/Host, rule), flow end and DNS query; never blocks "
                        "the relay (records it cannot keep up with are dropped, counted "
                        "as audit_dropped)")
    p.add_argument("--control-socket", metavar="PATH",
                   help="serve runtime control (relaynat ctl) on this unix socket, mode "
                        "0600 (a stale socket file is replaced)")
    conf = p.add_argument_group("confinement (docs/confinement.md)")
    conf.add_argument("--confine", dest="confine", action="store_true", default=None,
                      help="once set up, the relay drops to --runas (nobody as root) and "
                           "the capabilities its features need, leaves the filesystem "
                           "and installs a seccomp allowlist"
                           + (" (the default)" if CONFINE_BY_DEFAULT else ""))
    conf.add_argument("--no-confine", dest="confine", action="store_false",
                      help="do not confine the relay (weaker: it keeps the user it was "
                           "started as, every capability and the whole filesystem, with "
                           "no seccomp filter)")
    out = p.add_argument_group("output")
    out.add_argument("--pcap", metavar="FILE", help="capture the guest side to FILE")
    out.add_argument("--log-level", default="warning",
                     choices=["debug", "info", "warning", "error"])
    out.add_argument("--stats", action="store_true", help="print counters on exit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relaynat",
        description="Userspace network for microVMs and namespaces: answers ARP and DHCP, "
                    "relays the guest's TCP through host sockets (like pasta/slirp4netns).")
    parser.add_argument("--version", action="version", version=f"relaynat {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a command in a new network namespace (pasta-style)",
                         description="Run CMD in a new network namespace whose only "
                                     "interface is a TAP served by the relay. CMD runs as "
                                     "root of its own user namespace (and PID, mount, IPC "
                                     "and UTS namespaces); outside, that root is you, or "
                                     "nobody when relaynat runs as root (see --runas). "
                                     "With --netns TARGET, serve an existing network "
                                     "namespace instead, CMD optional.")
    _add_common(run)
    run.add_argument("--tap-name", default="tap0", help="interface name (default %(default)s)")
    run.add_argument("--no-offload", action="store_true",
                     help="open the TAP without virtio-net header (no TSO/checksum offload)")
    run.add_argument("--runas", type=_runas, metavar="USER|UID[:GID]",
                     help="as root: the ids outside that CMD's root maps to, and the "
                          "relay's own once it confines itself (default: nobody's); not 0")
    lo = run.add_argument_group("spliced and loopback forwards (pasta's)")
    lo.add_argument("-T", "--tcp-ns", action="append", default=[], metavar="SPEC",
                    help="forward TCP ports of the guest's loopback to the host's loopback, "
                         "-t's syntax with PORT[:HOSTPORT] (ADDR, if given: 127.0.0.1 or "
                         "::1; none: both); spliced, never through the guest's link")
    lo.add_argument("-U", "--udp-ns", action="append", default=[], metavar="SPEC",
                    help="forward UDP ports of the guest's loopback to the host's loopback, "
                         "same syntax as -T")
    lo.add_argument("--no-splice", action="store_true",
                    help="serve -t clients through the guest's link only, never spliced "
                         "(-T and -U then refused)")
    joined = run.add_argument_group("joining an existing network namespace")
    joined.add_argument("--netns", metavar="TARGET",
                        help="serve the network namespace of process TARGET (a PID: "
                             "without CMD, relaynat ends when it does), of a path "
                             "(/run/netns/NAME, /proc/PID/ns/net, a bind mount) or of an "
                             "ip netns name, rather than making one: the TAP is made there "
                             "(or opened, if it exists) and CMD, if given, runs there with "
                             "your own ids")
    joined.add_argument("--no-configure", action="store_true",
                        help="with --netns: leave the TAP down, with no address or route "
                             "(the guest configures it, e.g. by DHCP)")
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")

    serve = sub.add_parser("serve", help="serve a qemu/libkrun/vfkit guest over a unix socket",
                           description="qemu: -netdev stream,id=n0,server=off,addr.type=unix,"
                                       "addr.path=PATH -device virtio-net-pci,netdev=n0 "
                                       "(--socket PATH); -netdev dgram,id=n0,local.type=unix,"
                                       "local.path=QEMU_SOCK,remote.type=unix,remote.path=PATH "
                                       "(--unixgram PATH). vfkit/krunkit: --device virtio-net,"
                                       "unixSocketPath=PATH (--unixgram PATH).")
    _add_common(serve)
    where = serve.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", "-s", metavar="PATH",
                       help="listen on this unix stream socket, qemu -netdev stream "
                            "(a stale file is replaced)")
    where.add_argument("--unixgram", metavar="PATH",
                       help="bind this unix datagram socket: qemu -netdev dgram, vfkit, "
                            "krunkit, libkrun unixgram (a leftover socket file is replaced)")
    where.add_argument("--fd", type=int, metavar="N",
                       help="use this inherited unix socket: stream (qemu stream framing) "
                            "or datagram (one frame per datagram), by its type")
    where.add_argument("--receive-handover", metavar="PATH",
                       help="wait on this unix socket for a running relay to hand its "
                            "guest over (relaynat ctl handover --to PATH): its transport, "
                            "flows, forwards and control socket")
    where.add_argument("--interface", type=_interface_name, metavar="NAME",
                       help="attach to this host interface with a packet socket: the TAP "
                            "a Firecracker or cloud-hypervisor VM uses, or a veth end "
                            "(it should carry no address); exits when it goes away")
    iface = serve.add_argument_group("--interface options")
    iface.add_argument("--no-vnet-hdr", action="store_true",
                       help="exchange plain frames (no PACKET_VNET_HDR: no GSO, no "
                            "checksum offload toward the guest)")
    serve.add_argument("--runas", type=_runas, metavar="USER|UID[:GID]",
                       help="as root: the ids the relay takes once it confines itself "
                            "(default: nobody's); not 0")
    serve.add_argument("--incoming", action="store_true",
                       help="with --interface or --fd: serve the guest only after `relaynat "
                            "ctl import` of flows moving here (needs --control-socket)")

    add_ctl_parser(sub)

    demo = sub.add_parser("demo", help="download through the relay and print hash and speed",
                          description="Starts an HTTP server on host loopback, a namespace "
                                      "guest that downloads a file through the relay, and "
                                      "prints the SHA-256 both sides saw and the speed. "
                                      "Needs root; runs in a private network namespace.")
    demo.add_argument("--size-mib", type=_positive_int, default=256, metavar="N",
                      help="file size (default %(default)s)")
    demo.add_argument("--log-level", default="warning",
                      choices=["debug", "info", "warning", "error"])
    return parser


def _interface_name(text: str) -> str:
    try:
        return check_interface_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _dns_records(items: list[str]) -> tuple[tuple[str, str], ...]:
    records = []
    for item in items:
        name, sep, addr = item.partition("=")
        if not sep or not name.strip("."):
            raise ConfigError(f"--dns-record {item!r}: expected NAME=ADDR")
        records.append((name, str(parse_ip(addr, f"--dns-record {name}"))))
    return tuple(records)


def config_from_args(args: argparse.Namespace) -> RelayConfig:
    """Turn parsed options into a validated RelayConfig (raises ConfigError)."""
    addr, _, prefix = args.address.partition("/")
    try:
        prefix_len = int(prefix) if prefix else 24
    except ValueError:
        raise ConfigError(f"--address: prefix length {prefix!r} is not a number") from None
    gateway = parse_ipv4(args.gateway, "--gateway")
    gateway6 = parse_ipv6(args.gateway6, "--gateway6")
    mapped: IPv4Address | None = gateway
    mapped6: IPv6Address | None = gateway6
    if args.map_host_loopback == "none":
        mapped = mapped6 = None
    elif args.map_host_loopback != "gateway":
        chosen = parse_ip(args.map_host_loopback, "--map-host-loopback")
        if isinstance(chosen, IPv6Address):
            mapped6 = chosen
        else:
            mapped = chosen
    if args.new_flow_burst is not None and args.new_flow_rate is None:
        raise ConfigError("--new-flow-burst needs --new-flow-rate (without a rate, new flows "
                          "are unlimited)")
    if not args.resolv_conf:
        raise ConfigError("--resolv-conf: the path is empty")
    try:
        prefix6 = IPv6Network(args.prefix6, strict=True)
    except ValueError as exc:
        raise ConfigError(f"--prefix6: {args.prefix6!r} is not an IPv6 prefix ({exc})") from None
    return RelayConfig(
        guest_ipv4=parse_ipv4(addr, "--address"), prefix_len_v4=prefix_len,
        gateway_ipv4=gateway, dns_ipv4=parse_ipv4(args.dns, "--dns"),
        dns_upstream=parse_ip(args.dns_upstream, "--dns-upstream") if args.dns_upstream
        else None, dns_records=_dns_records(args.dns_record),
        # Absolute: the relay reads it again later, from whatever directory it is in then.
        resolv_conf=os.path.abspath(args.resolv_conf),
        map_host_loopback_v4=mapped, mtu=MAX_MTU if args.mtu is None else args.mtu,
        max_tcp_flows=args.max_flows, max_udp_flows=args.max_udp_flows,
        max_icmp_flows=args.max_icmp_flows, new_flow_rate=args.new_flow_rate,
        new_flow_burst=args.new_flow_burst, syn_rate=args.syn_rate,
        max_pending_connects=args.max_pending_connects, pcap_path=args.pcap,
        first_flight_timeout_s=args.first_flight_timeout,
        tcp_ooo_budget=args.tcp_ooo_budget,
        ipv4=not args.ipv6_only, ipv6=not args.ipv4_only, prefix_v6=prefix6,
        guest_ipv6=parse_ipv6(args.address6, "--address6"), gateway_ipv6=gateway6,
        dns_ipv6=parse_ipv6(args.dns6, "--dns6"), map_host_loopback_v6=mapped6,
        inbound_source=args.inbound_source,
    ).validate()


def policy_from_args(args: argparse.Namespace, config: RelayConfig) -> Policy | None:
    """The egress policy the options ask for (raises ConfigError naming the problem)."""
    if args.sandbox:
        return Policy.sandbox(config)
    if args.policy:
        return Policy.load(args.policy, config)
    if args.allow_domain:
        return Policy.allow_domains(args.allow_domain, config)
    return None


def forwards_from_args(args: argparse.Namespace) -> list[PortForward]:
    """Every `-t` and `-u` spec parsed (raises ConfigError quoting the bad one)."""
    return [fwd for proto, specs in (("tcp", args.tcp_ports), ("udp", args.udp_ports))
            for spec in specs for fwd in parse_portspec(spec, proto)]


def loopback_forwards_from_args(args: argparse.Namespace) -> list[tuple[str, int, int, int]]:
    """Every `-T` and `-U` spec as (proto, family 4 or 6, guest port, host port), one per
    port and loopback address (raises ConfigError quoting the bad spec)."""
    out: list[tuple[str, int, int, int]] = []
    for proto, specs in (("tcp", getattr(args, "tcp_ns", [])),
                         ("udp", getattr(args, "udp_ns", []))):
        for spec in specs:
            for fwd in parse_portspec(spec, proto):
                if fwd.interface is not None:
                    raise ConfigError(f"-{proto[0].upper()} {spec!r}: no %INTERFACE here: "
                                      "the guest's loopback is the one listened on")
                if fwd.address is not None and not fwd.address.is_loopback:
                    raise ConfigError(f"-{proto[0].upper()} {spec!r}: {fwd.address} is not a "
                                      "loopback address (127.0.0.1 or ::1)")
                if fwd.host_first == 0:
                    raise ConfigError(f"-{proto[0].upper()} {spec!r}: give the guest's port, "
                                      "not 0")
                families = [4, 6] if fwd.address is None else [fwd.address.version]
                for guest_port, host_port in fwd.pairs():
                    out.extend((proto, family, guest_port, host_port) for family in families)
    return out
