"""The Internet checksum (RFC 1071) for IPv4 headers and TCP/UDP segments.

Sums are kept in the "mod 0xffff" domain: since 2**16 ≡ 1 (mod 0xffff), the
ones'-complement sum of 16-bit words equals the value of the bytes read as one
big-endian integer, modulo 0xffff (RFC 1071 §2(B) calls this the deferred carries
property). That lets short buffers use `int.from_bytes` and long ones numpy, and lets
partial sums of header and payload be added with `+` and reduced once.

Measured on the target machine for 64 KiB: dpkt's pure-Python `in_cksum` 430 µs,
`int.from_bytes(...) % 0xffff` 95 µs, a numpy sum of little-endian u32 words 5.6 µs.
The numpy path sums 32-bit little-endian words; each is congruent (mod 0xffff) to the
sum of its two little-endian 16-bit halves, and the ones'-complement sum is byte-order
independent (RFC 1071 §2(B)), so a final 16-bit byte swap gives the big-endian sum.
"""

from __future__ import annotations

import os

# numpy's OpenBLAS starts a worker thread per core at import unless told otherwise;
# relaynat sums vectors and does no linear algebra, and confinement (relaynat.confine)
# needs a process of one thread: unshare(CLONE_NEWNS) refuses one whose threads share
# its filesystem context, and capset(2) changes the calling thread only. An embedder
# that imported numpy first, or set the variable, keeps its own choice.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

#: Below this many bytes `int.from_bytes` beats numpy's call overhead.
_NUMPY_THRESHOLD = 768


def _swap16(value: int) -> int:
    return ((value & 0xFF) << 8) | (value >> 8)


def partial_sum(data: bytes | bytearray | memoryview) -> int:
    """Ones'-complement sum of `data` as big-endian 16-bit words, in [0, 0xffff).

    An odd trailing byte is padded with a zero byte on the right (RFC 793 §3.1).
    Only the last buffer of a checksummed sequence may have odd length.
    """
    n = len(data)
    if n < _NUMPY_THRESHOLD:
        value = int.from_bytes(data, "big")
        if n & 1:
            value <<= 8
        return value % 0xFFFF
    n4 = n & ~3
    words = np.frombuffer(data, dtype="<u4", count=n4 >> 2)
    total = _swap16(int(words.sum(dtype=np.uint64)) % 0xFFFF)
    if n4 != n:
        tail = int.from_bytes(data[n4:], "big")
        if (n - n4) & 1:
            tail <<= 8
        total += tail
    return total % 0xFFFF


def finish(total: int) -> int:
    """Turn a (possibly unreduced) sum into the checksum field value."""
    return 0xFFFF - total % 0xFFFF


def fold(total: int) -> int:
    """Reduce a sum to 16 bits without complementing it (for partial-checksum offload)."""
    return total % 0xFFFF


def pseudo_header_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """Pseudo-header sum of TCP/UDP/ICMPv6 over IPv4 (RFC 9293 §3.1: source,
    destination, zero, protocol, length) or IPv6 (RFC 8200 §8.1: source, destination,
    32-bit length, three zeros, next header). A 32-bit length is congruent mod 0xffff to
    the sum of its 16-bit halves, so both are the same sum in this domain."""
    return (int.from_bytes(src + dst, "big") + proto + length) % 0xFFFF


def internet_checksum(data: bytes | bytearray | memoryview) -> int:
    """The checksum field value for `data` alone (e.g. an IPv4 header with check = 0)."""
    return finish(partial_sum(data))


def verify(data: bytes | bytearray | memoryview, initial: int = 0) -> bool:
    """True if `data` (checksum field included) sums to ones'-complement zero."""
    return (initial + partial_sum(data)) % 0xFFFF == 0


def segment_checksum_ok(src: bytes, dst: bytes, proto: int,
                        segment: bytes | bytearray | memoryview, field_at: int) -> bool:
    """True if the TCP/UDP `segment` (checksum field at `field_at`) sums to zero over
    the pseudo-header, or if the field holds only the pseudo-header's sum: the
    partial checksum a sender with checksum offload leaves (virtio's NEEDS_CSUM,
    Linux's CHECKSUM_PARTIAL), which carries no integrity check to verify."""
    pseudo = pseudo_header_sum(src, dst, proto, len(segment))
    if (pseudo + partial_sum(segment)) % 0xFFFF == 0:
        return True
    field = int.from_bytes(segment[field_at:field_at + 2], "big")
    return field % 0xFFFF == pseudo
