"""The exceptions relaynat raises on purpose share one base, `Error`.

Each public exception also keeps the builtin base it had before `Error` existed
(`ConfigError` is a `ValueError`, `InterfaceError` an `OSError`...), so a caller's
`except ValueError` goes on catching what it caught; `except relaynat.Error` catches
them all.
"""

from __future__ import annotations


class Error(Exception):
    """Base of every exception relaynat raises on purpose."""


class RelayClosedError(Error, RuntimeError):
    """A `Relay` (or `Guests`) was used after `close()`: a closed relay serves nothing,
    so the call is refused where it is made, not in a callback later."""
