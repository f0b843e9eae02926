"""The replication side of a mount: the listener, one sender per peer, and the wiring
into the store and the file system."""

from __future__ import annotations

import logging
import socket

import trio

from mailfs.cachemgr.metastore import MetaStore
from mailfs.cachemgr.records import Record
from mailfs.config import Config, parse_address
from mailfs.errors import UserError
from mailfs.fs.core import MailFS
from mailfs.fs.invalidation import invalidate_change, invalidate_everything
from mailfs.replication.receiver import Receiver
from mailfs.replication.replicator import Replicator
from mailfs.replication.sender import PeerSender
from mailfs.replication.tls import client_context, server_context

log = logging.getLogger(__name__)


class Replication:
    def __init__(self, config: Config, store: MetaStore, fs: MailFS) -> None:
        self.config = config
        self.fs = fs
        self.replicator = Replicator(config, store)
        self.replicator.on_applied = self._applied
        self.replicator.on_replaced = self._replaced
        self.server_ssl = server_context(config.tls_cert, config.tls_key, config.tls_ca)
        client_ssl = client_context(config.tls_cert, config.tls_key, config.tls_ca)
        self.receiver = Receiver(self.replicator, self.server_ssl)
        self.senders = [PeerSender(self.replicator, state, client_ssl)
                        for state in self.replicator.peers.values()]
        self._socket: socket.socket | None = None
        if self.replicator.sync:
            fs.wait_replicated = self.replicator.wait_durable

    def bind(self) -> None:
        """Take the listening port before mounting, so that a busy port is a clear error."""
        if not self.config.listen:
            return
        host, port = parse_address(self.config.listen, "replication.listen")
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            raise UserError(f"cannot listen for peers on {self.config.listen}: "
                            f"{exc.strerror or exc}") from None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise UserError(f"cannot listen for peers on {self.config.listen}: "
                            f"{exc.strerror or exc}") from None
        self._socket = sock

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        async with trio.open_nursery() as nursery:
            if self._socket is not None:
                listener = trio.SocketListener(trio.socket.from_stdlib_socket(self._socket))
                nursery.start_soon(trio.serve_listeners, self.receiver.handle, [listener])
            for sender in self.senders:
                nursery.start_soon(sender.run)
            log.info("replication: node %s, %s durability, listening on %s, peers %s",
                     self.config.node_id, self.config.durability, self.config.listen or "-",
                     ", ".join(f"{p.node_id}@{p.host}:{p.port}" for p in self.config.peers))
            task_status.started()

    def _applied(self, record: Record, displaced: list[int]) -> None:
        invalidate_change(record, displaced, self.fs.table, self.fs.invalidator)
        self.fs.peer_changed(record)

    def _replaced(self, names: set[tuple[bytes, bytes]]) -> None:
        invalidate_everything(names, self.fs.table, self.fs.invalidator)
        self.fs.store_replaced()
