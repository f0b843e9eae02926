"""Accepting peers' connections and applying their changes.

Trust: the TLS handshake proves the client holds a certificate from the cluster CA, and
the node id in its Hello must be one of the names in that certificate and one of our
configured peers. A peer may only send its own changes. Anything wrong, including a
record that fails its checksum or does not parse, closes the connection before anything
of it is applied, and is logged and counted.

A change is acknowledged only once it is committed to LMDB here; the applied seq of its
origin is in the same LMDB transaction, so a crash can never apply a change twice.
"""

from __future__ import annotations

import logging
import shutil
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import BinaryIO

import trio

from mailfs.cachemgr.metastore import SeqGap, SnapshotStale, size_problem
from mailfs.cachemgr.ownership import data_pieces, own_problem, unpack_manifest
from mailfs.cachemgr.records import (
    CorruptRecord,
    Op,
    Record,
    decode_one,
    path_problem,
    skipped_through,
)
from mailfs.cachemgr.snapshot import install_snapshot, remove_quietly, snapshot_path
from mailfs.fs.invalidation import names_changed
from mailfs.replication.identity import node_namespace
from mailfs.replication.link import (
    HANDSHAKE_TIMEOUT,
    Link,
    Refused,
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
from mailfs.replication.replicator import Replicator
from mailfs.replication.tls import certificate_names

log = logging.getLogger(__name__)

ACK_HOLD_POLL = 0.05
REFUSAL_LOG_EVERY = 10.0
SNAPSHOT_DISK_RESERVE = 64 << 20
NOT_CHANGES = frozenset({Op.SNAP_FILE, Op.SNAP_NAME, Op.SNAP_OWNER, Op.REMOTE})


@dataclass
class Incoming:
    """One peer's stream of changes to us."""

    origin: str
    link: Link
    acked: int
    snapshot_file: BinaryIO | None = None
    snapshot_path: Path | None = None
    snapshot_begin: SnapshotBegin | None = None
    conflicts_logged: int = 0
    # A takeover waiting for the rest of its content (OWN, then OWN_DATA pieces).
    takeover: list[tuple[Change, Record]] = field(default_factory=list)
    pieces_left: int = 0


class Receiver:
    def __init__(self, replicator: Replicator, context: ssl.SSLContext) -> None:
        self.replicator = replicator
        self.store = replicator.store
        self.context = context
        self.active: dict[str, trio.CancelScope] = {}
        # origin -> (when last logged, the reason, refusals since not logged)
        self.refusals_logged: dict[str, tuple[float, str, int]] = {}

    async def handle(self, tcp: trio.SocketStream) -> None:
        try:
            host, port = tcp.socket.getpeername()[:2]
            address = f"{host}:{port}"
        except OSError:
            address = "?"
        stream = trio.SSLStream(tcp, self.context, server_side=True)
        link: Link | None = None
        origin = "?"
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await stream.do_handshake()
                session = Session("server", self.replicator.node_id,
                                  self.replicator.config.cluster, self.store.epoch,
                                  lambda: self.store.committed_applied,
                                  contiguous_seqs=False)  # SKIP records jump; see apply_remote
                link = Link(stream, session)
                while session.peer_node_id is None:
                    await link.receive()
            origin = session.peer_node_id
            self._check_identity(stream, origin)
            await link.send_frame(session.welcome())
            with self._exclusive(origin):
                await self._serve_peer(link, origin)
        except Exception as exc:
            error = connection_error(exc)
            if error is None:
                log.exception("replication connection from %s (%s) failed", origin, address)
                reason = f"internal error: {exc!r}"
            else:
                reason = describe(error)
            if link is not None and not isinstance(error, Refused) and link.session.established:
                log.warning("replication stream from %s (%s) closed: %s", origin, address,
                            reason)
            else:
                self._log_refusal(origin, address, reason)
                self.replicator.note_rejection(f"{origin} ({address}): {reason}")
            if link is not None and isinstance(error, Refused):
                try:
                    with trio.move_on_after(1):
                        await link.send(Goodbye(reason))
                except Exception:
                    pass
        finally:
            if link is not None:
                await link.aclose()
            else:
                with trio.move_on_after(1) as scope:
                    scope.shield = True
                    await tcp.aclose()

    def _log_refusal(self, origin: str, address: str, reason: str) -> None:
        """A peer reconnects every fraction of a second while this node's state disk is
        full: log the same refusal once per REFUSAL_LOG_EVERY then, with a count. (Every
        refusal for what a peer sent is logged.)"""
        now = time.monotonic()
        last = self.refusals_logged.get(origin)
        if (last is not None and last[1] == reason and now - last[0] < REFUSAL_LOG_EVERY
                and self.store.journal.out_of_space):
            self.refusals_logged[origin] = (last[0], reason, last[2] + 1)
            return
        again = (f" ({last[2]} more refusals not logged since the last such line)"
                 if last is not None and last[2] else "")
        log.warning("refused replication connection from %s (%s): %s%s", origin, address,
                    reason, again)
        self.refusals_logged[origin] = (now, reason, 0)

    def _check_identity(self, stream: trio.SSLStream[trio.SocketStream], origin: str) -> None:
        names = certificate_names(stream)
        if origin not in names:
            raise Refused(f"node id {origin!r} is not in its certificate "
                          f"(which names {', '.join(sorted(names)) or 'nothing'})")
        if origin not in self.replicator.peers:
            raise Refused(f"node {origin!r} is not one of this node's configured peers")

    @contextmanager
    def _exclusive(self, origin: str) -> Iterator[None]:
        """One stream per origin: a reconnect replaces a connection that has not noticed
        its end yet, so changes of one origin are never applied from two at once."""
        previous = self.active.get(origin)
        if previous is not None:
            previous.cancel()
        with trio.CancelScope() as scope:
            self.active[origin] = scope
            state = self.replicator.peers[origin]
            state.incoming = True
            try:
                yield
            finally:
                if self.active.get(origin) is scope:
                    del self.active[origin]
                    state.incoming = False
                    state.incoming_snapshot = None

    async def _serve_peer(self, link: Link, origin: str) -> None:
        incoming = Incoming(origin, link, link.session.advertised.get(origin, 0))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._acknowledge, incoming)
                while True:
                    for message in await link.receive():
                        if await self._on_message(incoming, message):
                            nursery.cancel_scope.cancel()
                            return
        finally:
            if incoming.snapshot_file is not None:
                incoming.snapshot_file.close()
            if incoming.snapshot_path is not None:
                remove_quietly(incoming.snapshot_path)

    async def _on_message(self, incoming: Incoming, message: object) -> bool:
        """Act on one message; True when the peer said goodbye."""
        match message:
            case Changes():
                self._apply(incoming, message)
            case Ping():
                # A sender pings only when it has sent everything it has: a planned
                # takeover waits for this (Replicator.wait_caught_up).
                self.replicator.note_idle(incoming.origin)
                await incoming.link.send(Pong(message.nonce))
            case SnapshotBegin():
                await self._snapshot_begin(incoming, message)
            case SnapshotChunk():
                assert incoming.snapshot_file is not None
                await trio.to_thread.run_sync(incoming.snapshot_file.write, message.data)
                self.replicator.peers[incoming.origin].incoming_snapshot = (
                    incoming.link.session.incoming_snapshot)
            case SnapshotEnd():
                await self._snapshot_end(incoming)
            case Goodbye():
                log.info("replication stream from %s ended: %s", incoming.origin,
                         message.reason)
                return True
            case _:
                raise Refused(f"unexpected {type(message).__name__} from a sending peer")
        return False

    def _apply(self, incoming: Incoming, changes: Changes) -> None:
        origin = incoming.origin
        if changes.origin != origin:
            raise Refused(f"{origin!r} sent changes of {changes.origin!r}; a peer may only "
                          "send its own")
        # Check every record before applying any: a damaged batch applies nothing.
        records = []
        expected = self.store.applied.get(origin, 0) + 1
        for change in changes.records:
            try:
                record = decode_one(change.record)
            except CorruptRecord as exc:
                raise Refused(f"change {change.seq} of {origin!r} is damaged: {exc}") from exc
            if record.seq != change.seq or record.op in NOT_CHANGES:
                raise Refused(f"change {change.seq} of {origin!r} carries a "
                              f"{record.op.name} record with seq {record.seq}")
            problem = path_problem(record) or size_problem(record)
            if record.op is Op.OWN:
                problem = problem or own_problem(record, self.store.ownership_depth)
                if record.fields[1] != origin.encode():
                    problem = f"a takeover in the name of {record.fields[1]!r}"
            if problem is not None:
                raise Refused(f"change {change.seq} of {origin!r} is impossible: {problem}")
            if change.seq > expected:
                raise Refused(f"Changes of {origin!r}: seq {change.seq} where {expected} was "
                              "expected (missing or reordered change)")
            if change.seq == expected:  # lower ones are resends after a reconnect
                skipped = skipped_through(change.record)
                expected = max(change.seq, skipped or 0) + 1
            records.append((change, record))
        for change, record in records:
            if incoming.takeover:
                # A takeover is applied with all of its content at once, never half: the
                # files it replaces would read as zeros in between.
                if record.op is not Op.OWN_DATA:
                    raise Refused(f"{origin!r} sent a {record.op.name} inside the content of "
                                  "its takeover")
                incoming.takeover.append((change, record))
                incoming.pieces_left -= 1
                if incoming.pieces_left == 0:
                    group, incoming.takeover = incoming.takeover, []
                    for grouped in group:
                        self._apply_one(incoming, *grouped)
                continue
            if record.op is Op.OWN:
                pieces = data_pieces(unpack_manifest(record.fields[5]))  # type: ignore[arg-type]
                if pieces:
                    incoming.takeover, incoming.pieces_left = [(change, record)], pieces
                    continue
            self._apply_one(incoming, change, record)
        self.store.request_commit()

    def _apply_one(self, incoming: Incoming, change: Change, record: Record) -> None:
        origin = incoming.origin
        displaced = [fid for fid in (self.store.lookup(d, n)
                                     for d, n in names_changed(record)) if fid]
        names_before = (self.store.user_names(record.fields[0])  # type: ignore[arg-type]
                        if record.op is Op.OWN else set())
        try:
            conflict = self.store.apply_remote(origin, node_namespace(origin), change.seq,
                                               change.base_version, record, change.record)
        except SeqGap as exc:
            raise Refused(str(exc)) from exc
        except OSError as exc:
            # The journal could not take it (full disk): nothing of it was applied.
            raise Refused(f"change {change.seq} of {origin!r} cannot be journaled: "
                          f"{exc.strerror or exc}") from exc
        except (ValueError, TypeError, AssertionError) as exc:
            raise Refused(f"change {change.seq} of {origin!r} cannot be applied: "
                          f"{exc}") from exc
        if conflict is not None:
            if incoming.conflicts_logged < 100:
                incoming.conflicts_logged += 1
                log.error("CONFLICT: change %d of %s not applied: %s", change.seq,
                          origin, conflict)
        elif record.op is Op.OWN:
            # A takeover can change every file and name of the user.
            self.replicator.on_replaced(
                names_before | self.store.user_names(record.fields[0]))  # type: ignore[arg-type]
        else:
            self.replicator.on_applied(record, displaced)

    async def _acknowledge(self, incoming: Incoming) -> None:
        state = self.replicator.peers[incoming.origin]
        while True:
            if state.holding_acks:
                await trio.sleep(ACK_HOLD_POLL)
                continue
            committed = self.store.committed
            # Never more than this connection carried: after another node's snapshot the
            # applied seq can be ahead of it, and the sender would take that as a lie.
            done = min(self.store.committed_applied.get(incoming.origin, 0),
                       incoming.link.session.received_through(incoming.origin))
            if done > incoming.acked:
                await incoming.link.send(Ack(incoming.origin, done))
                incoming.acked = done
                continue
            await committed.wait()

    async def _snapshot_begin(self, incoming: Incoming, begin: SnapshotBegin) -> None:
        free = shutil.disk_usage(self.store.state_dir).free
        if begin.total_bytes > free - SNAPSHOT_DISK_RESERVE:
            raise Refused(f"the snapshot from {incoming.origin!r} has {begin.total_bytes} "
                          f"bytes; the state dir has {free} free")
        known = begin.origin_seqs.get(self.replicator.node_id, 0)
        if not self.store.can_reapply_after(known):
            # Installing it would throw away changes made here that neither the sender nor
            # our own log has any more.
            raise Refused(f"the snapshot from {incoming.origin!r} has this node's changes "
                          f"only up to {known}, and this node's log no longer reaches back")
        if incoming.snapshot_file is not None:
            incoming.snapshot_file.close()
        path = snapshot_path(self.store, "in", begin.snapshot_id)
        incoming.snapshot_path = path
        incoming.snapshot_file = await trio.to_thread.run_sync(open, path, "wb")
        incoming.snapshot_begin = begin
        log.info("receiving a snapshot from %s: %.1f MB", incoming.origin,
                 begin.total_bytes / 1e6)

    async def _snapshot_end(self, incoming: Incoming) -> None:
        begin, path, out = (incoming.snapshot_begin, incoming.snapshot_path,
                            incoming.snapshot_file)
        assert begin is not None and path is not None and out is not None
        await trio.to_thread.run_sync(out.close)
        incoming.snapshot_file = None
        names_before = self.store.all_names()
        try:
            await self.store.replace_state(
                partial(install_snapshot, self.store, path, begin.origin_seqs),
                begin.origin_seqs)
        except CorruptRecord as exc:
            raise Refused(f"snapshot from {incoming.origin!r} is damaged: {exc}") from exc
        except SnapshotStale as exc:
            raise Refused(f"snapshot from {incoming.origin!r} refused: {exc}") from exc
        finally:
            remove_quietly(path)
            incoming.snapshot_path = None
        self.replicator.on_replaced(names_before | self.store.all_names())
        self.replicator.peers[incoming.origin].incoming_snapshot = None
        log.info("installed a snapshot from %s (%.1f MB); applied seqs now %s",
                 incoming.origin, begin.total_bytes / 1e6, begin.origin_seqs)
        # The sender forgot what we acknowledged before: acknowledge the snapshot.
        incoming.acked = -1
