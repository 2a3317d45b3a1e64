"""A guest that opens many TCP connections at once and checks that each one echoes.

    python3 tcp_burst_echo.py PORT COUNT

Starts COUNT non-blocking connects to 10.0.2.2:PORT (an echo peer) at once; as each
completes, sends its index and a newline and expects the same line back, then closes
it. Fails (an AssertionError) if a connect fails, an echo differs, or nothing happens
for 20 s; else prints "connected COUNT".
"""

import selectors
import socket
import sys


def main() -> None:
    port, count = int(sys.argv[1]), int(sys.argv[2])
    sel, done = selectors.DefaultSelector(), 0
    for i in range(count):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("10.0.2.2", port))
        sel.register(s, selectors.EVENT_WRITE, i)
    while done < count:
        events = sel.select(timeout=20)
        assert events, f"only {done} of {count} connected"
        for key, _ in events:
            s = key.fileobj  # type: ignore[assignment]
            if key.events == selectors.EVENT_WRITE:
                assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                s.send(f"{key.data}\n".encode())
                sel.modify(s, selectors.EVENT_READ, key.data)
            else:
                assert s.recv(100) == f"{key.data}\n".encode()
                sel.unregister(s)
                s.close()
                done += 1
    print("connected", done)


if __name__ == "__main__":
    main()
