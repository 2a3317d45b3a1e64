"""`--pcap FILE`: what crosses the guest side, in libpcap format (dpkt's writer).

Frames are written as the guest's link sees them, without a virtio-net header. With
TAP offload, frames we send carry partial TCP checksums (the kernel completes them),
so a capture shows those as incorrect, exactly as a capture on an offloading NIC does.
"""

from __future__ import annotations

import time

import dpkt


class PcapWriter:
    def __init__(self, path: str) -> None:
        self._file = open(path, "wb")  # noqa: SIM115 - lives as long as the relay
        self._writer = dpkt.pcap.Writer(self._file, snaplen=65535 + 14,
                                        linktype=dpkt.pcap.DLT_EN10MB)

    def write(self, frame: bytes | memoryview) -> None:
        self._writer.writepkt(bytes(frame), time.time())

    def write_parts(self, head: bytes | memoryview, payload: bytes | memoryview) -> None:
        self._writer.writepkt(bytes(head) + bytes(payload), time.time())

    def close(self) -> None:
        self._file.close()
