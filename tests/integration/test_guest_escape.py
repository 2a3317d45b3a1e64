"""A root guest of `relaynat run` stays in its box.

The command runs as root of its own user namespace, which maps it to `nobody` outside,
in its own PID, network and mount namespaces. Each test starts a real `relaynat run`
whose command, as root inside, tries what a hostile guest did before: open the relay's
control socket (through /proc/RELAY/root and by its path, after trying to unmount what
covers it) and drop the egress policy with it, see or signal the relay's process, enter
the relay's network namespace (through /proc and through a file bound to it that the
guest can open), and read a root-only file of the host. Every attempt must fail, the
policy must still be the one the relay started with, and root inside must still rule
its own network: address it, ping the gateway, reach an allowed host peer.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import site
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.faultkit import wait_until
from support.relaynat_cli import guest_python
from support.sysctl import ALL_GROUPS, ping_group_range

pytestmark = pytest.mark.integration
pytest_plugins = ["support.guest_fs"]

GATEWAY = "10.0.2.2"
SET_POLICY_NONE = json.dumps({"execute": "set_policy", "arguments": {"policy": None}})

#: Run by `sh` as the command. Each attempt prints one line, "blocked NAME" or
#: "ESCAPED NAME: what it got"; the network checks print "ok NAME" or "FAILED NAME".
#: Once the attempts are over, it waits for the test to look at the relay's policy.
#: $1 the shared directory (the test writes the relay's pid there), $2 the control
#: socket, $3 the root-only file, $4 a file bound to the relay's network namespace,
#: $5 and $6 the host peer ports the policy allows and denies.
GUEST_SCRIPT = r"""
dir=$1 ctl=$2 secret=$3 netns=$4 allowed=$5 denied=$6
i=0
while [ ! -s "$dir/relay.pid" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
relay=$(cat "$dir/relay.pid")
attempt() {  # NAME CMD...: the command succeeding is an escape
    name=$1; shift
    if got=$("$@" 2>&1); then echo "ESCAPED $name: $got"; else echo "blocked $name"; fi
}
check() {  # NAME CMD...: the command must succeed
    name=$1; shift
    if got=$("$@" 2>&1); then echo "ok $name"; else echo "FAILED $name: $got"; fi
}
ctl_request() {  # PATH: connect, ask for no policy, print the answer
    printf '%s\n' '@REQUEST@' | timeout 10 socat -t 5 - "UNIX-CONNECT:$1"
}
echo "uid $(id -u)"
attempt ctl-via-proc-root ctl_request "/proc/$relay/root$ctl"
attempt ctl-by-path ctl_request "$ctl"
umount "$ctl" 2>/dev/null; umount -l "$ctl" 2>/dev/null
attempt ctl-by-path-after-umount ctl_request "$ctl"
attempt relay-pid-in-proc test -e "/proc/$relay"
attempt relay-pid-signal kill -0 "$relay"
attempt relay-in-process-list sh -c "ps -eo pid= | grep -qw $relay"
attempt setns-via-proc nsenter "--net=/proc/$relay/ns/net" true
attempt setns-via-bound-file nsenter "--net=$netns" true
attempt read-root-only-file cat "$secret"
attempt host-loopback-denied-port socat -u /dev/null "TCP:@GATEWAY@:$denied,connect-timeout=5"
touch "$dir/attempts-done"
i=0
while [ ! -e "$dir/policy-checked" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
check ip-addr sh -c "ip -o -4 addr show dev tap0 | grep -q 10.0.2.15/"
check ip-add-address ip addr add 192.0.2.7/32 dev lo
check ping-gateway ping -c 1 -W 5 @GATEWAY@
check tcp-to-allowed-peer sh -c \
    "echo hello | socat -t 5 - TCP:@GATEWAY@:$allowed,connect-timeout=5 | grep -qx hello"
""".replace("@REQUEST@", SET_POLICY_NONE).replace("@GATEWAY@", GATEWAY)

ATTEMPTS = ["ctl-via-proc-root", "ctl-by-path", "ctl-by-path-after-umount",
            "relay-pid-in-proc", "relay-pid-signal", "relay-in-process-list",
            "setns-via-proc", "setns-via-bound-file", "read-root-only-file",
            "host-loopback-denied-port"]
CHECKS = ["ip-addr", "ip-add-address", "ping-gateway", "tcp-to-allowed-peer"]


@pytest.fixture
def root_dir() -> Iterator[Path]:
    """A directory of root's that anyone may search, for what only root may open."""
    path = Path(tempfile.mkdtemp(prefix="relaynat-root-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def _policy_shown(sock: Path) -> object:
    """The relay's policy as `relaynat ctl policy show` prints it: JSON, or a line
    saying there is none."""
    shown = subprocess.run([sys.executable, "-m", "relaynat", "ctl", "--socket", str(sock),
                            "policy", "show"], capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0, shown.stderr
    return None if shown.stdout.startswith("none") else json.loads(shown.stdout)


def _kill_all(proc: subprocess.Popen[str]) -> None:
    """SIGKILL relaynat's process group if relaynat still runs: the relay, its namespace
    child and the command's namespace (a relay killed alone leaves the child, which
    holds the output pipes, running: it is how a handover lets the command go on)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def test_root_guest_reaches_neither_relay_nor_host_secrets(
        start_peer, guest_dir: Path, root_dir: Path) -> None:
    allowed, denied = start_peer("echo"), start_peer("echo")
    policy = {"default": "allow", "rule": [
        {"action": "allow", "proto": "icmp", "to": "host"},
        {"action": "allow", "proto": "tcp", "to": "host", "ports": str(allowed)},
        {"action": "deny", "to": ["host", "loopback"], "comment": "host loopback"}]}
    policy_file = root_dir / "policy.json"
    policy_file.write_text(json.dumps(policy))
    secret = root_dir / "secret"
    secret.write_text("only root reads this\n")
    secret.chmod(0o600)
    ctl_sock = root_dir / "ctl.sock"
    netns_file = root_dir / "relay-netns"
    netns_file.touch()
    # The relay runs in a private mount namespace where `netns_file` is bound to its
    # network namespace (the suite's): a handle on it the guest can open, so only
    # setns(2)'s own check stands in the way. The mount goes with the namespace.
    bind_then_exec = 'mount --bind /proc/self/ns/net "$0" && exec "$@"'
    with ping_group_range(ALL_GROUPS):
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
             bind_then_exec, str(netns_file),
             sys.executable, "-m", "relaynat", "run", "--policy", str(policy_file),
             "--control-socket", str(ctl_sock), "--",
             "sh", "-c", GUEST_SCRIPT, "guest", str(guest_dir), str(ctl_sock), str(secret),
             str(netns_file), str(allowed), str(denied)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, start_new_session=True)
        try:
            wait_until(ctl_sock.exists, 30, "control socket", proc)
            (guest_dir / "relay.pid").write_text(str(proc.pid))
            before = _policy_shown(ctl_sock)
            wait_until((guest_dir / "attempts-done").exists, 30, "the guest's attempts", proc)
            after = _policy_shown(ctl_sock)
            (guest_dir / "policy-checked").touch()
            out, err = proc.communicate(timeout=120)
        finally:
            _kill_all(proc)
    assert proc.returncode == 0, out + err
    lines = out.splitlines()
    assert "uid 0" in lines, out  # root inside
    for name in ATTEMPTS:
        assert f"blocked {name}" in lines, out
    for name in CHECKS:
        assert f"ok {name}" in lines, out
    assert not [line for line in lines if line.startswith(("ESCAPED", "FAILED"))], out
    assert before == after == {"default": "allow", "rule": [
        {"action": "allow", "proto": "icmp", "to": "host"},
        {"action": "allow", "proto": "tcp", "to": "host", "ports": str(allowed)},
        {"action": "deny", "proto": "any", "to": ["host", "loopback"],
         "comment": "host loopback"}]}


@pytest.mark.parametrize(("command", "status"), [
    ("trap 'exit 42' TERM; touch {ready}; while :; do sleep 0.1; done", 42),
    ("touch {ready}; exec sleep 600", 128 + signal.SIGTERM),
], ids=["command-traps-term", "command-dies-of-term"])
def test_sigterm_to_relaynat_ends_the_command_with_its_status(
        guest_dir: Path, command: str, status: int) -> None:
    ready = guest_dir / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-m", "relaynat", "run", "--", "sh", "-c",
         command.format(ready=ready)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        wait_until(ready.exists, 30, "the command", proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        _kill_all(proc)
    assert proc.returncode == status, err


#: Run as root of a private mount namespace (`unshare --mount`): give the unprivileged
#: caller a /dev/net/tun it may open (the host's may be root's, mode 0600; the node is
#: made on a tmpfs of this namespace and bound over it), then run relaynat as that
#: caller: $1 the uid:gid, $2 the tmpfs directory; the rest is the command line.
AS_CALLER = r"""
set -e
ids=$1 dir=$2; shift 2
mount -t tmpfs -o mode=755 relaynat-test "$dir"
mknod -m 666 "$dir/tun" c 10 200
mount --bind "$dir/tun" /dev/net/tun
exec setpriv --reuid="${ids%:*}" --regid="${ids#*:}" --clear-groups -- "$@"
"""

#: The command: as root inside, uncover and reach the control socket (here the same
#: uid outside as the relay, so only the locked /dev/null cover stands in the way).
CALLER_GUEST = r"""
ctl=$1 relay=$2
echo "uid $(id -u)"
umount "$ctl" 2>/dev/null; umount -l "$ctl" 2>/dev/null
if socat -t 5 - "UNIX-CONNECT:$ctl" </dev/null >/dev/null 2>&1; then echo "ESCAPED ctl"
else echo "blocked ctl"; fi
if [ -e "/proc/$relay" ]; then echo "ESCAPED relay-pid"; else echo "blocked relay-pid"; fi
touch "${ctl%/*}/written-by-guest"
"""


def test_unprivileged_callers_guest_cannot_uncover_the_control_socket(
        guest_dir: Path, root_dir: Path) -> None:
    """Without root, relaynat maps the command's root to the caller itself, whose
    control socket it may connect to: the /dev/null that covers it must be locked
    (made in a more privileged user namespace than the command's)."""
    uid, gid = guest_dir.stat().st_uid, guest_dir.stat().st_gid
    python = guest_python()
    env = dict(os.environ)
    if python != sys.executable:  # another interpreter: give it this one's packages
        import relaynat
        env["PYTHONPATH"] = os.pathsep.join(
            [str(Path(relaynat.__file__).parents[1]), *site.getsitepackages()])
    ctl_sock = guest_dir / "ctl.sock"
    relay_pid = guest_dir / "relay.pid"
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", AS_CALLER,
         "as-caller", f"{uid}:{gid}", str(root_dir),
         python, "-m", "relaynat", "run", "--control-socket", str(ctl_sock), "--",
         "sh", "-c", f'i=0; while [ ! -s {relay_pid} ] && [ $i -lt 300 ]; do sleep 0.1; '
                     f'i=$((i+1)); done; exec sh -c "$0" guest {ctl_sock} "$(cat {relay_pid})"',
         CALLER_GUEST],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env, start_new_session=True)
    try:
        wait_until(ctl_sock.exists, 30, "control socket", proc)
        relay_pid.write_text(str(proc.pid))
        out, err = proc.communicate(timeout=60)
    finally:
        _kill_all(proc)
    assert proc.returncode == 0, out + err
    lines = out.splitlines()
    assert lines == ["uid 0", "blocked ctl", "blocked relay-pid"], out
    # Root inside is the caller outside.
    assert (guest_dir / "written-by-guest").stat().st_uid == uid


def test_runas_picks_the_ids_outside_and_refuses_root(root_dir: Path) -> None:
    """As root, `--runas UID:GID` is who the command's root is outside (nobody by
    default); root itself is refused, as it would undo the isolation, however it is
    spelled. A lone UID (passt's syntax) takes the gid of the same number when the user
    database has no such user."""
    where = root_dir / "runas"
    where.mkdir()
    os.chown(where, 4242, 4243)
    done = subprocess.run(
        [sys.executable, "-m", "relaynat", "run", "--runas", "4242:4243", "--",
         "sh", "-c", f"id -u; touch {where}/made"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0"]
    made = (where / "made").stat()
    assert (made.st_uid, made.st_gid) == (4242, 4243)
    alone = subprocess.run(
        [sys.executable, "-m", "relaynat", "run", "--runas", "4242", "--",
         "sh", "-c", f"touch {where}/alone"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert alone.returncode == 0, alone.stderr
    assert (where / "alone").stat().st_uid == 4242
    assert (where / "alone").stat().st_gid == 4242
    for ids in ("0:4243", "4242:0", "0", "root", "root:4243", "4242:root"):
        refused = subprocess.run(
            [sys.executable, "-m", "relaynat", "run", "--runas", ids, "--", "true"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2, (ids, refused.stderr)
        assert "--runas" in refused.stderr, refused.stderr
