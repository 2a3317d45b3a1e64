"""Log lines that name the guest they are about, when a program serves several.

`Guests` names each guest's `Relay`; one event loop serves them all, so a line such as
"guest transport lost" must say whose. The guest's name is a context variable
(`GUEST`), set while a relay's entry points run (`in_guest_scope`). asyncio copies the
current context into every handle it creates (`add_reader`, `call_soon`, `call_at`,
tasks), so the readers, timers and tasks a relay registers in its entry points carry the
name, and so do the handles those callbacks register in turn: no per-frame cost, and no
logger to hand down to every flow table.

`guest_logger(name)` is the per-module logger: it prefixes the message with the guest's
name (so any handler's format shows it) and sets `record.guest` (None outside a named
relay, as for `relaynat run`'s one guest).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

#: The name of the guest whose relay is running the current code (None: unnamed).
GUEST: ContextVar[str | None] = ContextVar("relaynat_guest", default=None)

P = ParamSpec("P")
R = TypeVar("R")


class _Named(Protocol):
    name: str | None


S = TypeVar("S", bound=_Named)


class GuestLogger(logging.LoggerAdapter[logging.Logger]):
    """A module's logger that names the guest in each line."""

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if not self.isEnabledFor(level):
            return
        guest = GUEST.get()
        kwargs["extra"] = {**(kwargs.get("extra") or {}), "guest": guest}
        # One frame more than the caller's: this one (logging skips its own).
        kwargs["stacklevel"] = kwargs.get("stacklevel", 1) + 1
        if guest is not None:
            if args:  # the name goes in as an argument: a '%' in it stays literal
                msg, args = f"guest %s: {msg}", (guest, *args)
            else:  # no arguments, no formatting: the line is taken as it is
                msg = f"guest {guest}: {msg}"
        self.logger.log(level, msg, *args, **kwargs)


def guest_logger(name: str) -> GuestLogger:
    return GuestLogger(logging.getLogger(name), {})


@contextlib.contextmanager
def guest_scope(name: str | None) -> Iterator[None]:
    """`GUEST` is `name` inside the block."""
    token = GUEST.set(name)
    try:
        yield
    finally:
        GUEST.reset(token)


def in_guest_scope(method: Callable[Concatenate[S, P], R]) -> Callable[Concatenate[S, P], R]:
    """Run a relay's method with `GUEST` set to the relay's `name`: what it registers
    with the event loop, and what it logs, belongs to that guest."""

    @functools.wraps(method)
    def scoped(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with guest_scope(self.name):
            return method(self, *args, **kwargs)

    return scoped
