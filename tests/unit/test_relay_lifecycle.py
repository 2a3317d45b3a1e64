"""A Relay's lifecycle: a closed relay refuses to be used where it is called, and
`close()` removes the socket file of `serve_stream` (only while it is still the file the
relay bound).

Before, `serve_stream()` on a closed relay succeeded and the first client then raised
RuntimeError inside a loop callback, and `close()` left the socket file behind.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from relaynat import Relay, RelayConfig, StreamTransport, serve_unixgram
from relaynat.errors import Error, RelayClosedError


async def test_close_removes_the_stream_socket_file(tmp_path: Path) -> None:
    path = str(tmp_path / "vm.sock")
    async with Relay(RelayConfig()) as relay:
        relay.serve_stream(path)
        assert os.path.exists(path)
    assert not os.path.exists(path)


async def test_close_leaves_a_path_bound_again_by_another(tmp_path: Path) -> None:
    path = str(tmp_path / "vm.sock")
    relay = Relay(RelayConfig())
    relay.start()
    relay.serve_stream(path)
    os.unlink(path)  # someone removed it and another process bound the path since
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(path)
    try:
        relay.close()
        assert os.path.exists(path)
    finally:
        other.close()


async def test_serve_stream_twice_is_refused(tmp_path: Path) -> None:
    async with Relay(RelayConfig()) as relay:
        relay.serve_stream(str(tmp_path / "a.sock"))
        with pytest.raises(RuntimeError, match="already serving"):
            relay.serve_stream(str(tmp_path / "b.sock"))
        assert not (tmp_path / "b.sock").exists()


def _calls(tmp_path: Path) -> dict[str, Callable[[Relay], object]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b.close()
    return {
        "serve_stream": lambda r: r.serve_stream(str(tmp_path / "s.sock")),
        "attach": lambda r: r.attach(StreamTransport(a, 16)),
        "attach_stream_fd": lambda r: r.attach_stream_fd(a.fileno()),
        "add_forward": lambda r: r.add_forward("tcp", "127.0.0.1", 0, 80),
        "remove_forward": lambda r: r.remove_forward(forward_id=1),
        "set_policy": lambda r: r.set_policy(None),
        "start": lambda r: r.start(),
        "serve_unixgram": lambda r: serve_unixgram(r, str(tmp_path / "u.sock")),
    }


@pytest.mark.parametrize("call", sorted(_calls(Path("/nonexistent"))))
async def test_a_closed_relay_refuses_at_the_call(tmp_path: Path, call: str) -> None:
    relay = Relay(RelayConfig())
    relay.start()
    relay.close()
    with pytest.raises(RelayClosedError, match="closed") as caught:
        _calls(tmp_path)[call](relay)
    assert isinstance(caught.value, Error) and isinstance(caught.value, RuntimeError)
    assert list(tmp_path.iterdir()) == []  # no socket file left bound
    relay.close()  # closing again does nothing


async def test_serve_stream_before_start_says_so(tmp_path: Path) -> None:
    relay = Relay(RelayConfig())
    with pytest.raises(RuntimeError, match=r"start\(\)"):
        relay.serve_stream(str(tmp_path / "s.sock"))
    assert not (tmp_path / "s.sock").exists()
