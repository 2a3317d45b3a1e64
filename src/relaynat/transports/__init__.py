"""How the guest's frames arrive: TAP, stream (qemu `-netdev stream`), unixgram, interface.
"""
