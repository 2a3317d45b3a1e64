"""Write the seed corpus of fuzz_frames.py: real frames of every protocol the relay
serves, valid and broken, drawn from relaynat.testing's strategies with a fixed seed
(the same corpus on every run; nothing binary is committed).

    python fuzz/make_corpus.py fuzz/corpus [count]
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from relaynat.testing.strategies import broken_frames, tcp_conversations, valid_frames

#: Keep the corpus well under 200 KiB: frames from the strategies are at most ~2 KiB.
MAX_BYTES = 150 << 10


def write_corpus(directory: Path, count: int = 150) -> int:
    """Write up to `count` distinct frames to `directory`; return how many files."""
    directory.mkdir(parents=True, exist_ok=True)
    frames: dict[str, bytes] = {}

    @seed(20261123)
    @settings(max_examples=count, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    # Ports drawn from the whole range, edge values first (the fuzz target runs in a
    # network namespace of its own as root), not the testing kit's sink: its port
    # differs from run to run, and the corpus must not.
    @given(st.one_of(valid_frames(tcp_port="any", udp_port="any").map(lambda x: [x.data]),
                     broken_frames(tcp_port="any", udp_port="any").map(lambda x: [x.data]),
                     tcp_conversations("any").map(lambda c: c.frames(0))))
    def collect(group: list[bytes]) -> None:
        for data in group:
            frames.setdefault(hashlib.sha1(data).hexdigest(), data)

    collect()
    total = 0
    written = 0
    for name, data in sorted(frames.items()):
        if total + len(data) > MAX_BYTES:
            break
        (directory / name).write_bytes(data)
        total += len(data)
        written += 1
    return written


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "fuzz/corpus")
    n = write_corpus(out, int(sys.argv[2]) if len(sys.argv) > 2 else 150)
    print(f"{n} frames in {out}")
