"""A backend that accepts connections, echoes what it reads and holds them open.

Used by the idle-connection RSS figure: every client sends one byte and waits for it to come
back, which proves its connection was proxied all the way to here. Runs as its own process
(``python -m bench.holder --port P``) so its file descriptors do not count against the bench's.
Closes a connection when the peer does; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import resource
import selectors
import signal
import socket
import sys


def serve(host: str, port: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sel = selectors.DefaultSelector()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(4096)
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ, None)
    running = True

    def stop(_signum: int, _frame: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while running:
        for key, _mask in sel.select(timeout=0.5):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is listener:
                for _ in range(256):
                    try:
                        conn, _addr = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError as exc:  # EMFILE and the like: report, keep serving
                        print(f"holder: accept: {exc}", file=sys.stderr, flush=True)
                        break
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ, None)
                continue
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if data:
                try:
                    sock.send(data)
                except OSError:
                    data = b""
            if not data:
                sel.unregister(sock)
                sock.close()
    listener.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    serve(args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
