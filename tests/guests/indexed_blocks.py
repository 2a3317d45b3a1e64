"""The data of the handover transfers (transfer_peer.py, transfer_guest.py), imported
by both from this directory: 1 MiB blocks of one random block, each led by its own
index, so that a lost, repeated or reordered block changes the hash."""

import os
from collections.abc import Iterator


def blocks(seed: bytes | None, size: int) -> Iterator[bytes]:
    """`size` bytes as whole 1 MiB blocks: `seed` (or a random block), its first 8
    bytes replaced by the block's index."""
    base = bytearray(os.urandom(1 << 20)) if seed is None else bytearray(seed)
    for i in range(size >> 20):
        base[:8] = i.to_bytes(8, "big")
        yield bytes(base)
