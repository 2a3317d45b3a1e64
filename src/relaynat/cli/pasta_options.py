"""`relaynat-pasta`'s command line: the part of pasta's that podman 4.4 to 5.x builds,
read as pasta's getopt_long reads it (`parse`) and turned into `relaynat run --netns`'s
options and configuration (`run_argv`, `translate`); cli/pasta.py serves it.

Taken, and what they become:
- `--netns PATH|NAME` or a PID operand: the namespace (a PID's exit ends the relay too);
- `--config-net`: the TAP is addressed and routed; without it it is made, not configured;
- `-a ADDR[/PREFIX]`, `-n PREFIX|NETMASK`, `-g ADDR` (IPv4 or IPv6), `-m MTU`,
  `-I NAME` (the namespace's interface): relaynat run's -a, -g, --address6,
  --gateway6, -m, --tap-name. Without -a the guest gets relaynat's addressing
  (10.0.2.15/24 via 10.0.2.2, fd00::15 via fd00::2), not a copy of the host's as pasta;
- `-t`/`-u SPEC`: passt's port specs, which relaynat run's -t/-u take as they are;
  `none` forwards nothing; a TCP client on the host's loopback is spliced into the
  namespace as relaynat run splices it;
- `-T`/`-U SPEC`: the namespace's loopback ports forwarded to the host's loopback, as
  relaynat run's -T/-U (spliced, never through the guest's link); `none`: nothing;
- `--dns-forward ADDR`: the DNS address the guest's queries go to (relaynat forwards
  them to the host's resolver, as pasta does); `-D none`: no DNS server announced (with
  --config-net no DHCP client asks; the DNS address still answers);
- `--no-map-gw`: the gateway no longer stands for the host's loopback (pasta maps it by
  default, as relaynat does); `--map-gw` and `--map-host-loopback ADDR` as pasta's;
- `-4`/`--ipv4-only`, `-6`/`--ipv6-only`; `-f`, `-q`/`--quiet`, `-d`/`--debug`,
  `-P`/`--pid FILE`;
- `--runas UID|UID:GID|LOGIN|LOGIN:GROUP`: the user the relay becomes once confined
  (`nobody` as root by default, as pasta);
- `--no-confine`, relaynat's own (pasta has no way out of its sandbox): the relay is
  not confined (cli/pasta.py says what confinement is here).

Every other option is refused, naming it, with exit status 1. An option pasta has and
relaynat does not honour reads "unrecognized option '--NAME'" as pasta's getopt says
for options it lacks, so that podman 5.3's fallback for an older pasta (it retries
without `--map-guest-addr` on exactly that) works unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Network, ip_address

from relaynat.config import ConfigError, RelayConfig
from relaynat.portspec import Forward

PROG = "relaynat-pasta"

#: The options taken: long name -> (short letter or "", takes a value).
_TAKEN = {
    "config-net": ("", False), "tcp-ports": ("t", True), "udp-ports": ("u", True),
    "tcp-ns": ("T", True), "udp-ns": ("U", True), "dns-forward": ("", True),
    "dns": ("D", True), "map-gw": ("", False), "no-map-gw": ("", False),
    "map-host-loopback": ("", True), "address": ("a", True), "netmask": ("n", True),
    "gateway": ("g", True), "mtu": ("m", True), "ns-ifname": ("I", True),
    "netns": ("", True), "foreground": ("f", False), "quiet": ("q", False),
    "debug": ("d", False), "ipv4-only": ("4", False), "ipv6-only": ("6", False),
    "pid": ("P", True), "help": ("h", False), "version": ("", False),
    "runas": ("", True), "no-confine": ("", False),
}
_SHORT = {short: long for long, (short, _) in _TAKEN.items() if short}

#: pasta options refused with a reason beyond "unrecognized" (the reason follows it).
_WHY = {
    "interface": "relaynat does not copy a host interface's addresses or bind to it; "
                 "give -a, -n and -g",
    "map-guest-addr": "relaynat's guest address is not one of the host's",
    "outbound": "relaynat cannot bind outbound connections to an address",
    "outbound-if4": "relaynat cannot bind outbound connections to an interface",
    "outbound-if6": "relaynat cannot bind outbound connections to an interface",
    "userns": "give the network namespace's path; relaynat enters its owner itself",
    "trace": "relaynat has no packet trace; -d logs at debug level",
    "log-file": "relaynat logs to stderr (in the foreground: -f)",
    "no-dhcp": "relaynat's DHCP, NDP and DHCPv6 answers cannot be turned off",
    "no-ndp": "relaynat's DHCP, NDP and DHCPv6 answers cannot be turned off",
    "no-dhcpv6": "relaynat's DHCP, NDP and DHCPv6 answers cannot be turned off",
    "no-ra": "relaynat's router advertisements cannot be turned off",
}
_WHY_SHORT = {"i": "interface", "o": "outbound", "l": "log-file"}


class PastaUsageError(ConfigError):
    """A command line relaynat-pasta refuses; the message names the option."""


@dataclasses.dataclass
class PastaOptions:
    """What the pasta command line asks for, before it becomes relaynat run's."""

    config_net: bool = False
    tcp: list[str] = dataclasses.field(default_factory=list)
    udp: list[str] = dataclasses.field(default_factory=list)
    tcp_ns: list[str] = dataclasses.field(default_factory=list)
    udp_ns: list[str] = dataclasses.field(default_factory=list)
    dns_forward: list[str] = dataclasses.field(default_factory=list)
    dns: list[str] = dataclasses.field(default_factory=list)
    map_gw: bool = True
    map_host_loopback: str | None = None
    address: list[str] = dataclasses.field(default_factory=list)
    netmask: str | None = None
    gateway: list[str] = dataclasses.field(default_factory=list)
    mtu: str | None = None
    ifname: str = "tap0"
    netns: str | None = None
    foreground: bool = False
    debug: bool = False
    ipv4_only: bool = False
    ipv6_only: bool = False
    pid_file: str | None = None
    runas: str | None = None
    no_confine: bool = False
    help: bool = False
    version: bool = False
    operands: list[str] = dataclasses.field(default_factory=list)


def _unrecognized(option: str, name: str) -> PastaUsageError:
    why = _WHY.get(name)
    return PastaUsageError(f"unrecognized option '{option}'" + (f" ({why})" if why else ""))


def _store(opts: PastaOptions, name: str, value: str | None) -> None:
    lists = {"tcp-ports": opts.tcp, "udp-ports": opts.udp, "tcp-ns": opts.tcp_ns,
             "udp-ns": opts.udp_ns, "dns-forward": opts.dns_forward, "dns": opts.dns,
             "address": opts.address, "gateway": opts.gateway}
    if name in lists:
        assert value is not None
        lists[name].append(value)
        return
    flags = {"config-net": "config_net", "foreground": "foreground", "debug": "debug",
             "ipv4-only": "ipv4_only", "ipv6-only": "ipv6_only", "help": "help",
             "version": "version", "no-confine": "no_confine"}
    if name in flags:
        setattr(opts, flags[name], True)
    elif name in ("map-gw", "no-map-gw"):
        opts.map_gw = name == "map-gw"
    elif name == "quiet":
        pass  # relaynat says nothing but warnings and errors already
    else:
        attr = {"map-host-loopback": "map_host_loopback", "netmask": "netmask",
                "mtu": "mtu", "ns-ifname": "ifname", "netns": "netns", "pid": "pid_file",
                "runas": "runas"}
        setattr(opts, attr[name], value)


def parse(argv: Sequence[str]) -> PastaOptions:
    """pasta's command line as getopt_long(3) reads it: `--name VALUE`, `--name=VALUE`,
    `-x VALUE`, `-xVALUE`, flags bundled (`-fq`), `--` or the first operand ending the
    options."""
    opts = PastaOptions()
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            opts.operands.extend(args[i:])
            break
        if arg.startswith("--"):
            name, eq, inline = arg[2:].partition("=")
            if name not in _TAKEN:
                raise _unrecognized(f"--{name}", name)
            takes = _TAKEN[name][1]
            if takes and not eq:
                if i == len(args):
                    raise PastaUsageError(f"option '--{name}' requires an argument")
                inline = args[i]
                i += 1
            elif eq and not takes:
                raise PastaUsageError(f"option '--{name}' doesn't allow an argument")
            _store(opts, name, inline if takes else None)
        elif arg.startswith("-") and len(arg) > 1:
            j = 1
            while j < len(arg):
                letter = arg[j]
                j += 1
                if letter not in _SHORT:
                    why = _WHY.get(_WHY_SHORT.get(letter, ""))
                    raise PastaUsageError(f"invalid option -- '{letter}'"
                                          + (f" ({why})" if why else ""))
                name = _SHORT[letter]
                if _TAKEN[name][1]:
                    value = arg[j:]
                    if not value:
                        if i == len(args):
                            raise PastaUsageError(f"option requires an argument -- '{letter}'")
                        value = args[i]
                        i += 1
                    _store(opts, name, value)
                    break
                _store(opts, name, None)
        else:
            # pasta's optstring starts with "+": options end at the first operand (a PID,
            # or a command whose own options follow).
            opts.operands.extend(args[i - 1:])
            break
    return opts


def _prefix_of(netmask: str) -> int:
    if netmask.isdigit():
        return int(netmask)
    try:
        return IPv4Network(f"0.0.0.0/{netmask}").prefixlen
    except ValueError:
        raise PastaUsageError(f"-n {netmask}: not a prefix length or an IPv4 netmask") from None


def _split_families(values: list[str], option: str) -> tuple[str | None, str | None]:
    """The IPv4 and the IPv6 one of `values` (pasta takes one of each)."""
    v4: str | None = None
    v6: str | None = None
    for value in values:
        addr, _, _ = value.partition("/")
        try:
            parsed = ip_address(addr)
        except ValueError:
            raise PastaUsageError(f"{option} {value}: not an IP address") from None
        if isinstance(parsed, IPv4Address):
            if v4 is not None:
                raise PastaUsageError(f"{option} given twice for IPv4")
            v4 = value
        else:
            if v6 is not None:
                raise PastaUsageError(f"{option} given twice for IPv6")
            v6 = value
    return v4, v6


def run_argv(opts: PastaOptions) -> list[str]:
    """The `relaynat run` options (before the target) that `opts` become."""
    argv: list[str] = []
    addr4, addr6 = _split_families(opts.address, "-a")
    gw4, gw6 = _split_families(opts.gateway, "-g")
    if addr4 is not None or opts.netmask is not None:
        if addr4 is None:
            raise PastaUsageError("-n needs -a with an IPv4 address (relaynat does not take "
                                  "the host's address as pasta does)")
        addr, _, prefix = addr4.partition("/")
        if opts.netmask is not None:
            prefix = str(_prefix_of(opts.netmask))
        argv += ["-a", f"{addr}/{prefix or 24}"]
    if gw4 is not None:
        argv += ["-g", gw4]
    fwd4, fwd6 = _split_families(opts.dns_forward, "--dns-forward")
    if addr6 is not None:
        # The /64 around the address is the prefix advertised (SLAAC needs a /64,
        # RFC 4862); the gateway and DNS addresses default to its ::2 and ::3.
        net6 = IPv6Network(f"{addr6.partition('/')[0]}/64", strict=False)
        argv += ["--address6", addr6.partition("/")[0], "--prefix6", str(net6)]
        gw6 = gw6 if gw6 is not None else str(net6[2])
        fwd6 = fwd6 if fwd6 is not None else str(net6[3])
    if gw6 is not None:
        argv += ["--gateway6", gw6]
    if opts.mtu is not None:
        argv += ["-m", opts.mtu]
    if fwd4 is not None:
        argv += ["-D", fwd4]
    if fwd6 is not None:
        argv += ["--dns6", fwd6]
    for value in opts.dns:
        if value != "none":
            raise PastaUsageError(f"-D {value}: relaynat answers DNS at its own address, "
                                  "forwarding to the host's resolver; give --dns-forward "
                                  "ADDR for that address, or -D none")
    if opts.map_host_loopback is not None:
        argv += ["--map-host-loopback", opts.map_host_loopback]
    elif not opts.map_gw:
        argv += ["--map-host-loopback", "none"]
    for flag, specs in (("-t", opts.tcp), ("-u", opts.udp), ("-T", opts.tcp_ns),
                        ("-U", opts.udp_ns)):
        for spec in specs:
            if spec == "auto":
                raise PastaUsageError(f"{flag} auto: relaynat does not follow the ports "
                                      "bound on the other side; give them")
            if spec != "none":
                argv += [flag, spec]
    if opts.ipv4_only:
        argv.append("-4")
    if opts.ipv6_only:
        argv.append("-6")
    argv += ["--tap-name", opts.ifname]
    if opts.debug:
        argv += ["--log-level", "debug"]
    return argv


def target_text(opts: PastaOptions) -> str:
    if opts.netns is not None:
        if opts.operands:
            raise PastaUsageError(f"{opts.operands[0]}: give either --netns or a PID, not "
                                  "both")
        return opts.netns
    if len(opts.operands) == 1 and opts.operands[0].isdigit():
        return opts.operands[0]
    if opts.operands:
        raise PastaUsageError(f"{opts.operands[0]}: relaynat-pasta serves an existing "
                              "namespace (--netns PATH or a PID); to run a command in a new "
                              "one, use relaynat run -- COMMAND")
    raise PastaUsageError("give the namespace: --netns PATH or a PID (pasta's own "
                          "namespace with a shell is relaynat run's)")


def _parse_run(argv: list[str]) -> argparse.Namespace:
    """relaynat run's own parser over `argv`; its refusal becomes a PastaUsageError."""
    from relaynat.cli.options import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(argv)
    except SystemExit:
        lines = err.getvalue().strip().splitlines()
        raise PastaUsageError(lines[-1].partition("error: ")[2] if lines
                              else "refused by relaynat run") from None


#: A `-T`/`-U` forward: (proto, family 4 or 6, namespace port, host port).
LoopbackForward = tuple[str, int, int, int]


@dataclasses.dataclass
class Translated:
    """What relaynat run's parser made of the options: the relay's configuration, the
    `-t`/`-u` forwards into the namespace and the `-T`/`-U` ones out of it."""

    config: RelayConfig
    forwards: list[Forward]
    loopback: list[LoopbackForward]


def translate(opts: PastaOptions) -> Translated:
    """The relay configuration and forwards `opts` ask for, through relaynat run's own
    option parser (every run default applies). Raises PastaUsageError or ConfigError."""
    from relaynat.cli.options import (
        config_from_args,
        forwards_from_args,
        loopback_forwards_from_args,
    )

    if opts.mtu is not None and not opts.mtu.isdigit():
        raise PastaUsageError(f"-m {opts.mtu}: not a number")
    tail = ["--netns", target_text(opts)] + ([] if opts.config_net else ["--no-configure"])
    args = _parse_run(["run", *run_argv(opts), *tail])
    return Translated(config_from_args(args), forwards_from_args(args),
                      loopback_forwards_from_args(args))


USAGE = f"""usage: {PROG} [OPTION]... [PID | --netns PATH]

pasta's command line as podman 4.4 to 5.x runs it, served by relaynat:
  --config-net           address and route the namespace's interface
  -t, --tcp-ports SPEC   forward host TCP ports into the namespace (passt's SPEC; none)
  -u, --udp-ports SPEC   the same for UDP
  -T, --tcp-ns SPEC      the namespace's loopback TCP ports to the host's (none)
  -U, --udp-ns SPEC      the same for UDP
  -a, --address ADDR     -n, --netmask MASK   -g, --gateway ADDR   -m, --mtu MTU
  -I, --ns-ifname NAME   the namespace's interface (default tap0)
  --dns-forward ADDR     the address whose DNS queries go to the host's resolver
  -D, --dns none         announce no DNS server
  --map-gw, --no-map-gw  the gateway stands (or not) for the host's loopback
  --map-host-loopback ADDR
  -4, --ipv4-only        -6, --ipv6-only
  --netns PATH|NAME      the network namespace; or a PID operand
  -f, --foreground       -d, --debug (implies -f)   -q, --quiet   -P, --pid FILE
  --runas UID|UID:GID|LOGIN|LOGIN:GROUP
                         the user the relay becomes once set up (nobody as root)
  --no-confine           relaynat's own: do not confine the relay (weaker); by
                         default it leaves the filesystem, drops to --runas, keeps
                         no capability and runs under a seccomp allowlist, as pasta
Anything else is refused, naming the option.
"""
