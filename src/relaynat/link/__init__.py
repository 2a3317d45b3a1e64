"""What the relay answers on the guest's link itself: ARP, DHCP, DHCPv6, NDP and DNS.

Sans-I/O: each module turns the guest's request into the reply frame; relay.py sends it.
"""
