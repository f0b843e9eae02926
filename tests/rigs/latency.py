"""A TCP proxy that holds every byte back for a fixed time in each direction.

The kernel here has no netem, so the sshfs rig puts this in front of sshd to give its
network filesystem a real round trip (two one-way delays). Bytes keep their order: each
direction has a reader thread that stamps what it receives and a writer thread that sends it
once its stamp plus the delay has passed, so throughput is not limited by the delay, as on a
real link.

It runs as its own process (`python latency.py --target HOST:PORT --delay-ms 0.5`), so that
its threads never compete with the caller's for the GIL; it prints the port it listens on,
then serves until it is killed.
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import socket
import sys
import threading
import time

CHUNK = 256 << 10


def _pump(source: socket.socket, sink: socket.socket, delay: float) -> None:
    """Copy source to sink, each chunk sent `delay` seconds after it arrived."""
    pending: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()

    def read() -> None:
        try:
            while data := source.recv(CHUNK):
                pending.put((time.monotonic() + delay, data))
        except OSError:
            pass
        pending.put((time.monotonic() + delay, b""))

    def write() -> None:
        try:
            while True:
                due, data = pending.get()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if not data:
                    sink.shutdown(socket.SHUT_WR)
                    return
                sink.sendall(data)
        except OSError:
            with contextlib.suppress(OSError):
                source.shutdown(socket.SHUT_RDWR)  # the far side is gone: stop reading too

    threading.Thread(target=read, daemon=True).start()
    threading.Thread(target=write, daemon=True).start()


def _connect(client: socket.socket, target: tuple[str, int], delay: float) -> None:
    try:
        upstream = socket.create_connection(target, timeout=10)
    except OSError:
        client.close()
        return
    upstream.settimeout(None)
    for sock in (client, upstream):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _pump(client, upstream, delay)
    _pump(upstream, client, delay)


def serve(listener: socket.socket, target: tuple[str, int], delay: float) -> None:
    while True:
        client, _ = listener.accept()
        threading.Thread(target=_connect, args=(client, target, delay), daemon=True).start()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=_address, default=("127.0.0.1", 0))
    parser.add_argument("--target", type=_address, required=True)
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay")
    args = parser.parse_args(argv)
    listener = socket.create_server(args.listen)
    print(listener.getsockname()[1], flush=True)
    serve(listener, args.target, args.delay_ms / 1000.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
