"""relaynat: a userspace network relay (NAT) for microVMs and network-namespace guests.

It reads a guest's raw Ethernet frames, answers ARP and DHCP itself, and relays the
guest's TCP flows through ordinary host sockets, as passt/pasta and slirp4netns do.
"""

from relaynat.config import ConfigError, RelayConfig

__all__ = ["ConfigError", "RelayConfig"]
__version__ = "0.1.0"
