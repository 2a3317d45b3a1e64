"""The host-socket side: the TCP, UDP and ICMP relays, the host pump, and forwarded ports.

The shell that executes the protocol core's decisions on real sockets.
"""
