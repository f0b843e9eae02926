"""TCP forwarders between cluster nodes that a test can cut and restore: a real partition.

Every node reaches each peer through its own forwarder (one per direction of each pair),
so a test can split the cluster into groups that cannot reach each other, while each
side keeps running and serving, and heal it again. Cutting closes the live connections
and refuses new ones until the link is restored, which is what a node sees when a switch
between two racks fails.
"""

from __future__ import annotations

import contextlib
import socket
import threading

CHUNK = 256 << 10


class SeverableLink:
    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.severed = False
        self.closed = False
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            if self.severed:
                client.close()
                continue
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        with self._lock:
            if self.severed:
                client.close()
                upstream.close()
                return
            self._sockets |= {client, upstream}
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(CHUNK):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def sever(self) -> None:
        with self._lock:
            self.severed = True
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def restore(self) -> None:
        self.severed = False

    def close(self) -> None:
        self.sever()
        self.listener.close()
