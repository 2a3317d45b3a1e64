"""The event loop the command line runs on, and how a front end's relay ends on it."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from relaynat.relay import Relay


def new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (the default dependency), stdlib asyncio otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_to_end(prog: str, main: Coroutine[Any, Any, int],
               loop: asyncio.AbstractEventLoop | None = None) -> int:
    """`main` on `loop` (by default a new one), closed after: its exit status, or 1 for
    an OSError it raised (the message under `prog`'s name)."""
    if loop is None:
        loop = new_loop()
    try:
        return loop.run_until_complete(main)
    except OSError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    finally:
        loop.close()


def stop_on_signals() -> asyncio.Event:
    """An event SIGINT and SIGTERM set, on the running loop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    return stop


async def until_stopped(relay: Relay, stop: asyncio.Event) -> None:
    """Return when the relay's transport is lost (a TAP gone with its namespace, a
    stream's peer gone) or `stop` is set, whichever comes first."""
    lost = asyncio.ensure_future(relay.transport_lost_event.wait())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({lost, stopped}, return_when=asyncio.FIRST_COMPLETED)
    lost.cancel()
    stopped.cancel()
