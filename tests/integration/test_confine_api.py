"""`relaynat.confine(guests)` from Python, as a sandbox runtime embeds it: one process,
one loop, two namespace guests of one `Guests`, confined once they are set up. Both
guests download through their relays afterwards, and the process's /proc status shows
the confinement while they do. Without the `confine` call the status check fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from support.procfs import status

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="confinement starts as root")

#: The embedder: two guests, each a curl of the same file; confined (argv[2] == "1")
#: before the commands go, then a line on stdin lets them go.
EMBEDDER = textwrap.dedent('''
    import asyncio, json, sys
    from concurrent.futures import ThreadPoolExecutor
    from relaynat import Guests, NamespaceGuest, NamespaceSetupError, RelayConfig, confine

    async def main(url: str, confined: bool) -> None:
        loop = asyncio.get_running_loop()
        # Python 3.11's asyncio waits for each child in a thread of its own; a pidfd
        # watcher waits in the loop (3.12 does so by itself).
        watcher = asyncio.PidfdChildWatcher()
        asyncio.set_child_watcher(watcher)
        watcher.attach_loop(loop)
        pool = ThreadPoolExecutor()
        loop.set_default_executor(pool)
        async with Guests() as guests:
            spawned = []
            for name in ("a", "b"):
                config = RelayConfig()
                ns = await NamespaceGuest.spawn(
                    config, ["sh", "-c", f"curl -sS --fail {url} | sha256sum"],
                    stdout=sys.stderr.fileno())
                guests.add(name, config).attach(ns.transport)
                spawned.append(ns)
            pool.shutdown(wait=True)  # confinement applies to a process of one thread
            loop.set_default_executor(ThreadPoolExecutor())
            if confined:
                print(confine(guests).describe(), file=sys.stderr)
                try:  # a process now would be killed by the filter: refused instead
                    await NamespaceGuest.spawn(RelayConfig(), ["true"])
                except NamespaceSetupError as exc:
                    print(f"refused: {exc}", file=sys.stderr)
            print("set up", flush=True)
            await loop.run_in_executor(None, sys.stdin.readline)
            for ns in spawned:
                ns.go()
            codes = [await ns.wait() for ns in spawned]
            print(json.dumps({"codes": codes,
                              "opened": [guests.stats()[n]["tcp_flows_opened"]
                                         for n in ("a", "b")]}), flush=True)

    asyncio.run(main(sys.argv[1], sys.argv[2] == "1"))
''')


@pytest.mark.parametrize("confined", [True, False], ids=["confined", "not-confined"])
def test_two_guests_of_one_process_download_confined(
        start_peer, big_file: tuple[Path, str], tmp_path: Path, confined: bool) -> None:
    path, digest = big_file
    port = start_peer("http", "--root", str(path.parent))
    script = tmp_path / "embedder.py"
    script.write_text(EMBEDDER)
    out_log = tmp_path / "guests.out"
    with open(out_log, "w") as guests_out:
        proc = subprocess.Popen(
            [sys.executable, str(script), f"http://10.0.2.2:{port}/{path.name}",
             "1" if confined else "0"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=guests_out, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "set up", out_log.read_text()
        st = status(proc.pid)
        root_entries = os.listdir(f"/proc/{proc.pid}/root")
        proc.stdin.write("go\n")
        proc.stdin.flush()
        result = json.loads(proc.stdout.readline())
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = out_log.read_text()
    assert proc.returncode == 0, log
    assert result["codes"] == [0, 0], log
    assert result["opened"] == [1, 1], result
    assert log.count(digest) == 2, log
    # A guest spawned after confine() is refused with a message, the process serving on.
    assert ("refused: this process is confined" in log) == confined, log
    # What the guests downloaded through was a confined process (the check the
    # not-confined arm must fail, so that it is the confinement that passes it).
    is_confined = (st["Uid"].split() == ["65534"] * 4 and st["Seccomp"] == "2"
                   and st["NoNewPrivs"] == "1" and int(st["CapEff"], 16) == 0
                   and root_entries == [])
    assert is_confined == confined, st
