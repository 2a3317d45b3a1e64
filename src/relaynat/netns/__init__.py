"""Network-namespace guests: the namespace, its TAP, the command inside, and the syscalls."""
