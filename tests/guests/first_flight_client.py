"""A TLS client whose ClientHello leaves in pieces, and a client that sends given bytes.

    python3 first_flight_client.py tls HOST PORT SNI PIECES DELAY CAFILE
    python3 first_flight_client.py raw HOST PORT HEX
    python3 first_flight_client.py raw-fin HOST PORT HEX

tls: a real TLS handshake (OpenSSL through Python's ssl module, memory BIOs) with
server name SNI ("-" for none) to HOST:PORT, its ClientHello written in PIECES writes
DELAY seconds apart (each its own segment: TCP_NODELAY); prints "handshake" once the
handshake completed (verified against CAFILE), "reset" if the connection was reset or
closed before.

raw: connects, sends the bytes HEX and waits up to 5 s for an answer: prints "reset"
(connection reset, or closed without a byte), or "answer". raw-fin: the same, with
its FIN right after the bytes (shutdown(SHUT_WR)).
"""

import socket
import ssl
import sys
import time


def _tls(host: str, port: int, sni: str, pieces: int, delay: float, cafile: str) -> str:
    ctx = ssl.create_default_context(cafile=cafile)
    if sni == "-":
        ctx.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname=None if sni == "-" else sni)
    sock = socket.create_connection((host, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    first = True
    try:
        while True:
            try:
                conn.do_handshake()
                return "handshake"
            except ssl.SSLWantReadError:
                pass
            data = outgoing.read()
            if data:
                if first:
                    step = -(-len(data) // pieces)
                    for start in range(0, len(data), step):
                        sock.sendall(data[start:start + step])
                        time.sleep(delay)
                    first = False
                else:
                    sock.sendall(data)
            got = sock.recv(65536)
            if not got:
                return "reset"
            incoming.write(got)
    except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
        return "reset"
    finally:
        sock.close()


def _raw(host: str, port: int, data: bytes, fin: bool) -> str:
    sock = socket.create_connection((host, port), timeout=5)
    try:
        sock.sendall(data)
        if fin:
            sock.shutdown(socket.SHUT_WR)
        return "answer" if sock.recv(1) else "reset"
    except (ConnectionResetError, BrokenPipeError):
        return "reset"
    finally:
        sock.close()


def main() -> None:
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "tls":
        print(_tls(host, port, sys.argv[4], int(sys.argv[5]), float(sys.argv[6]),
                   sys.argv[7]), flush=True)
    else:
        print(_raw(host, port, bytes.fromhex(sys.argv[4]), mode == "raw-fin"), flush=True)


if __name__ == "__main__":
    main()
