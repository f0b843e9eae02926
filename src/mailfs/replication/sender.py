"""Streaming this node's changes to one peer, over a connection this node opens.

The peer says at the handshake what it has applied of our changes; streaming resumes
right after that, from the replication log (LMDB) or the uncommitted tail (RAM). A peer
that needs changes the log no longer has (it was away too long, or it is new and the log
no longer starts at the first change) gets a snapshot first.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import ssl
import time

import trio

from mailfs.cachemgr.metastore import NeedSnapshot
from mailfs.cachemgr.snapshot import remove_quietly, snapshot_path, write_snapshot
from mailfs.replication.link import (
    CONNECTION_ERRORS,
    HANDSHAKE_TIMEOUT,
    ConnectionClosed,
    Link,
    connection_error,
    describe,
)
from mailfs.replication.protocol import (
    Ack,
    Change,
    Changes,
    Goodbye,
    Ping,
    Pong,
    Session,
    SnapshotBegin,
    SnapshotChunk,
    SnapshotEnd,
)
from mailfs.replication.replicator import PeerState, Replicator

log = logging.getLogger(__name__)

BATCH_BYTES = 1 << 20
SNAPSHOT_CHUNK = 1 << 20
KEEPALIVE = 2.0      # a Ping after this long without traffic
SILENCE_LIMIT = 15.0  # no Ack or Pong for this long: the peer is gone
PROGRESS_LOG_INTERVAL = 5.0


class PeerSender:
    def __init__(self, replicator: Replicator, state: PeerState,
                 context: ssl.SSLContext) -> None:
        self.replicator = replicator
        self.store = replicator.store
        self.state = state
        self.context = context
        self._nonces = itertools.count(1)

    async def run(self) -> None:
        """Connect, stream, and reconnect after any failure, until cancelled."""
        while True:
            try:
                await self._connect_and_stream()
            except Exception as exc:
                error = connection_error(exc)
                if error is None:
                    # A bug must not stop replication for good, nor take the mount down.
                    log.exception("replication to %s failed", self.state.peer.node_id)
                    self.state.note_failure(f"internal error: {exc!r}")
                else:
                    self.state.note_failure(describe(error))
            self.state.connected = False
            await trio.sleep(self.replicator.config.reconnect_interval)

    async def _connect_and_stream(self) -> None:
        peer = self.state.peer
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            tcp = await trio.open_tcp_stream(peer.host, peer.port)
            stream = trio.SSLStream(tcp, self.context, server_hostname=peer.node_id)
            session = Session("client", self.replicator.node_id, self.replicator.config.cluster,
                              self.store.epoch, lambda: self.store.committed_applied,
                              expected_peer_id=peer.node_id,
                              contiguous_seqs=False)  # SKIP records jump seqs
            link = Link(stream, session)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await stream.do_handshake()
                await link.send_frame(session.hello())
                while not session.established:
                    await link.receive()
            await self._stream(link)
        finally:
            self.state.holding_acks = False
            if not link.session.failed:
                try:
                    with trio.move_on_after(1):
                        await link.send(Goodbye("closing"))
                except CONNECTION_ERRORS:
                    pass
            await link.aclose()

    async def _stream(self, link: Link) -> None:
        me = self.replicator.node_id
        position = link.session.peer_applied.get(me, 0)
        diverged = position > self.store.journal.seq
        if diverged:
            log.error("peer %s has applied %d of this node's changes, but this node only "
                      "has %d: changes made here were lost (machine crash before commit?); "
                      "new changes continue after %d and the peer gets a snapshot",
                      self.state.peer.node_id, position, self.store.journal.seq, position)
            self.store.skip_to(position)
            await self.store.commit()
        self.state.connected = True
        if self.state.last_error:
            log.info("replication to %s connected again", self.state.peer.node_id)
        self.state.last_error = ""
        self.replicator.peer_resumed(self.state, position)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_answers, link)
            if diverged:
                position = await self._send_snapshot(link, "it has changes this node lost")
            while True:
                try:
                    entries = self.store.records_after(position, BATCH_BYTES)
                except NeedSnapshot as exc:
                    position = await self._send_snapshot(link, str(exc))
                    continue
                if entries:
                    await link.send(Changes(me, self.store.epoch, tuple(
                        Change(e.seq, e.base_version, e.record) for e in entries)))
                    position = entries[-1].seq
                    self.state.sent_seq = position
                    continue
                with trio.move_on_after(KEEPALIVE) as idle:
                    await self.replicator.new_change.wait()
                if idle.cancelled_caught:
                    await link.send(Ping(next(self._nonces)))

    async def _read_answers(self, link: Link) -> None:
        me = self.replicator.node_id
        while True:
            with trio.move_on_after(SILENCE_LIMIT) as silent:
                messages = await link.receive()
            if silent.cancelled_caught:
                raise ConnectionClosed(f"no answer for {SILENCE_LIMIT:.0f}s")
            for message in messages:
                if isinstance(message, Ack) and message.origin == me:
                    self.replicator.note_ack(self.state, message.seq)
                    if self.state.holding_acks and message.seq >= self.state.snapshot_seq:
                        self.state.holding_acks = False  # it installed the snapshot
                elif isinstance(message, Goodbye):
                    raise ConnectionClosed(f"the peer said goodbye: {message.reason}")
                elif not isinstance(message, Pong):
                    raise ConnectionClosed(f"unexpected {type(message).__name__} from a "
                                           "receiving peer")

    async def _send_snapshot(self, link: Link, why: str) -> int:
        """Stream a snapshot of the committed state; returns our seq it includes."""
        peer = self.state.peer.node_id
        # Until the peer has installed it: see PeerState.holding_acks.
        self.state.holding_acks = True
        self.state.snapshot_seq = 1 << 64
        ident = secrets.randbits(63)
        path = snapshot_path(self.store, "out", ident)
        started = time.monotonic()
        try:
            await self.store.commit()
            def write() -> dict[str, int]:
                with open(path, "wb") as out:
                    return write_snapshot(self.store, out)

            origin_seqs = await trio.to_thread.run_sync(write)
            total = path.stat().st_size
            log.info("sending a snapshot to %s (%s): %.1f MB", peer, why, total / 1e6)
            await link.send(SnapshotBegin(origin_seqs, total, ident))
            last_log = time.monotonic()
            with open(path, "rb") as source:
                offset = 0
                while True:
                    data = await trio.to_thread.run_sync(source.read, SNAPSHOT_CHUNK)
                    if not data:
                        break
                    await link.send(SnapshotChunk(ident, offset, data))
                    offset += len(data)
                    self.state.snapshot = link.session.outgoing_snapshot
                    if time.monotonic() - last_log > PROGRESS_LOG_INTERVAL:
                        last_log = time.monotonic()
                        log.info("snapshot to %s: %s", peer, self.state.snapshot)
            await link.send(SnapshotEnd(ident, link.session.outgoing_snapshot_checksum()))
        except BaseException:
            self.state.holding_acks = False
            raise
        finally:
            remove_quietly(path)
        seconds = max(time.monotonic() - started, 1e-6)
        log.info("snapshot to %s sent: %.1f MB in %.2fs (%.1f MB/s)", peer, total / 1e6,
                 seconds, total / 1e6 / seconds)
        self.state.snapshot = None
        self.state.snapshots_sent += 1
        position = origin_seqs.get(self.replicator.node_id, 0)
        self.state.sent_seq = position
        self.state.snapshot_seq = position
        return position
