"""A shell scenario in a network and mount namespace of its own (`unshare -n -m`, private
propagation), as the drop-in front ends' tests run the real rootlesskit and podman: the
scenario bind-mounts what it needs (a 0666 tun node, a subordinate id range, a
resolv.conf naming a loopback resolver) and adds addresses to its own `lo`, and none of
it outlives the namespace.

The scenario runs in a session of its own, so a timeout kills all of it (its background
servers too), not only its shell.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping, Sequence


def run_scenario(script: str, args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`bash -c script scenario ARGS...` under `unshare -n -m`; output captured. On a
    timeout the whole process group is killed and TimeoutExpired raised."""
    proc = subprocess.Popen(
        ["unshare", "-n", "-m", "--propagation", "private", "bash", "-c", script, "scenario",
         *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(env) if env is not None else None, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
