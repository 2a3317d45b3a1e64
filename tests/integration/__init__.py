"""Root, network namespaces and real tools (ip, curl, udhcpc, ...)."""
