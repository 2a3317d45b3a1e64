"""The `relaynat` command line: options, subcommands and the demo."""

import os

# numpy's OpenBLAS starts a worker thread per core when it is imported; the relay does
# no linear algebra, and its confinement (relaynat.confinement) applies to a process
# of one thread (a mount namespace and a Landlock domain are a thread's).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
