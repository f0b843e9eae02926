"""Replication of index files to peer mounts: who has what, and what fsync waits for.

Topology: every node connects to every peer and streams its own changes over that
connection (it is the TLS client there); it accepts its peers' connections and applies
their changes (TLS server). So each origin's changes reach each peer over exactly one
connection, in order, and an acknowledgement means "committed to the peer's LMDB".
"""

from __future__ import annotations

import bisect
import errno
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from mailfs.cachemgr.metastore import MetaStore
from mailfs.cachemgr.records import Record
from mailfs.config import Config, Peer
from mailfs.replication.protocol import SnapshotProgress

log = logging.getLogger(__name__)

LAG_SAMPLES = 10_000
# Per change about 90 bytes of RAM; for a peer behind by more, lag seconds and unacked
# bytes count from the oldest change remembered (a lower bound).
REMEMBERED_CHANGES = 200_000


@dataclass
class PeerState:
    peer: Peer
    connected: bool = False
    acked_seq: int = 0          # own changes the peer has committed
    sent_seq: int = 0
    last_error: str = ""
    failures: int = 0
    snapshot: SnapshotProgress | None = None
    snapshots_sent: int = 0
    incoming: bool = False      # the peer's own stream to us is up
    incoming_snapshot: SnapshotProgress | None = None
    # While we send the peer a snapshot, we hold back acks of its own changes: an ack
    # lets it trim its log, and it re-applies from there whatever the snapshot lacks.
    holding_acks: bool = False
    snapshot_seq: int = 0       # our seq in the snapshot it is installing

    def note_failure(self, reason: str) -> None:
        # Log a peer's trouble when it starts or changes, not on every reconnect attempt.
        if reason != self.last_error or self.connected:
            log.warning("replication to %s (%s:%d): %s", self.peer.node_id, self.peer.host,
                        self.peer.port, reason)
        self.last_error = reason
        self.failures += 1
        self.connected = False
        self.snapshot = None


@dataclass
class ChangeClock:
    """When each recent own change was made, and the log bytes up to it: lag figures."""

    seqs: deque[int] = field(default_factory=deque)
    times: deque[float] = field(default_factory=deque)
    bytes_before: deque[int] = field(default_factory=deque)  # log bytes before each change
    total: int = 0

    def add(self, seq: int, size: int) -> None:
        self.seqs.append(seq)
        self.times.append(time.monotonic())
        self.bytes_before.append(self.total)
        self.total += size
        if len(self.seqs) > REMEMBERED_CHANGES:
            self.drop_through(self.seqs[0])

    def drop_through(self, seq: int) -> None:
        while self.seqs and self.seqs[0] <= seq:
            self.seqs.popleft()
            self.times.popleft()
            self.bytes_before.popleft()

    def made_at(self, seq: int) -> float | None:
        index = bisect.bisect_left(self.seqs, seq)
        if index < len(self.seqs) and self.seqs[index] == seq:
            return self.times[index]
        return None

    def oldest_after(self, seq: int) -> float | None:
        index = bisect.bisect_right(self.seqs, seq)
        return self.times[index] if index < len(self.seqs) else None

    def bytes_after(self, seq: int) -> int:
        index = bisect.bisect_right(self.seqs, seq)
        return self.total - self.bytes_before[index] if index < len(self.seqs) else 0


class Replicator:
    def __init__(self, config: Config, store: MetaStore) -> None:
        self.config = config
        self.store = store
        self.node_id = config.node_id
        self.peers = {peer.node_id: PeerState(peer) for peer in config.peers}
        self.sync = config.durability == "sync"
        self.quorum = config.quorum or len(config.peers)
        self.degraded = False
        self.degraded_since = 0.0
        self.degradations = 0
        self.clock = ChangeClock()
        self.lag_samples: deque[float] = deque(maxlen=LAG_SAMPLES)
        self.new_change = trio.Event()
        self.acked = trio.Event()
        self.rejected_connections = 0
        self.last_rejection = ""
        # Set by the daemon: what the file system must invalidate after a peer's change.
        self.on_applied: Callable[[Record, list[int]], None] = lambda record, fids: None
        self.on_replaced: Callable[[set[tuple[bytes, bytes]]], None] = lambda names: None
        store.on_local_change = self._local_change
        self.policy = config.ownership_policy
        if self.policy == "consistency":
            store.write_refusal = self.write_refusal
        # When each peer last said (by an idle Ping) that it had sent us everything.
        self.idle_since: dict[str, float] = {}
        self.idle_seen = trio.Event()

    # ------------------------------------------------------------ events from the store

    def _local_change(self, seq: int) -> None:
        tail = self.store.replog_tail
        self.clock.add(seq, len(tail[-1].record) if tail else 0)
        self.new_change.set()
        self.new_change = trio.Event()

    def note_ack(self, state: PeerState, seq: int) -> None:
        if seq <= state.acked_seq:
            return
        state.acked_seq = seq
        made = self.clock.made_at(seq)
        if made is not None:
            self.lag_samples.append(time.monotonic() - made)
        self._acks_changed()

    def peer_resumed(self, state: PeerState, seq: int) -> None:
        """At a handshake the peer says what it has; that may be less than it acked before
        (it installed another node's snapshot since), and then counts for less."""
        state.acked_seq = seq
        self._acks_changed()

    def _acks_changed(self) -> None:
        everyone = min(p.acked_seq for p in self.peers.values())
        self.store.acknowledged_by_all(everyone)
        self.clock.drop_through(everyone)
        if self.degraded and self._confirmed(self.store.journal.seq):
            self.degraded = False
            log.warning("sync replication restored: %d of %d peers have every change again",
                        self._count_acked(self.store.journal.seq), len(self.peers))
        self.acked.set()
        self.acked = trio.Event()

    def note_idle(self, origin: str) -> None:
        self.idle_since[origin] = time.monotonic()
        self.idle_seen.set()
        self.idle_seen = trio.Event()

    # ------------------------------------------------------------ ownership

    def reachable_nodes(self) -> int:
        """This node and the peers connected to it in either direction."""
        return 1 + sum(1 for p in self.peers.values() if p.connected or p.incoming)

    def write_refusal(self) -> str | None:
        """The consistency policy: no writes without a majority of the cluster, so a
        minority side of a partition (or one node of two) can never diverge."""
        cluster = 1 + len(self.peers)
        reachable = self.reachable_nodes()
        if 2 * reachable > cluster:
            return None
        return (f"only {reachable} of {cluster} nodes reachable, and ownership.policy is "
                "consistency (writes need a majority)")

    async def take_over(self, user: bytes, timeout: float, force: bool) -> dict[str, Any]:
        """A planned move of a user to this node: wait until its owner has sent us every
        change it has (an idle Ping after all its changes), then take it over."""
        deadline = trio.current_time() + timeout
        waited_for = ""
        while True:
            owner = self.store.owners.get(user)
            if (owner is None or owner.node == self.node_id or owner.node not in self.peers
                    or owner.node == waited_for):
                break
            # Another node may take the user over while we wait: then wait for that one.
            asked = time.monotonic()
            with trio.move_on_at(deadline):
                while self.idle_since.get(owner.node, 0.0) <= asked:
                    await self.idle_seen.wait()
            if self.idle_since.get(owner.node, 0.0) > asked:
                waited_for = owner.node
            elif force:
                break
            else:
                raise OSError(errno.ETIMEDOUT, (
                    f"{owner.node} owns {user.decode(errors='replace')} and did not show "
                    f"within {timeout:.0f}s that it has sent every change (not connected?); "
                    "--force takes it over anyway, and its unsent changes are then fenced"))
        before = owner.node if owner is not None else ""
        taken = self.store.take_over(user)
        log.warning("user %s taken over by an admin: %s -> %s, epoch %d",
                    user.decode(errors="replace"), before or "nobody", taken.node, taken.epoch)
        return {"user": user.decode(errors="replace"), "previous_owner": before,
                "epoch": taken.epoch, "caught_up_with": waited_for}

    def note_rejection(self, reason: str) -> None:
        self.rejected_connections += 1
        self.last_rejection = reason

    # ------------------------------------------------------------ durability

    def _count_acked(self, seq: int) -> int:
        return sum(1 for p in self.peers.values() if p.acked_seq >= seq)

    def _confirmed(self, seq: int) -> bool:
        return self._count_acked(seq) >= self.quorum

    async def wait_durable(self, seq: int) -> None:
        """In sync mode, return once the quorum of peers has committed `seq`.

        A quorum that does not answer within sync_timeout makes the mount degrade to
        async: Dovecot must never hang on a dead peer.
        """
        if not self.sync or self.degraded or self._confirmed(seq):
            return
        with trio.move_on_after(self.config.sync_timeout):
            while not self._confirmed(seq):
                await self.acked.wait()
            return
        if not self.degraded:
            self.degraded = True
            self.degraded_since = time.time()
            self.degradations += 1
            behind = [p.peer.node_id for p in self.peers.values() if p.acked_seq < seq]
            log.error("SYNC REPLICATION DEGRADED TO ASYNC: peers %s did not commit change %d "
                      "within %.1fs; fsync now waits for local LMDB only until they catch up",
                      ", ".join(behind), seq, self.config.sync_timeout)

    async def wait_all_acked(self, timeout: float) -> list[str]:
        """Wait until every connected peer has every change; returns those still behind."""
        target = self.store.journal.seq
        with trio.move_on_after(timeout):
            while True:
                behind = [p for p in self.peers.values()
                          if p.connected and p.acked_seq < target]
                if not behind:
                    break
                await self.acked.wait()
        return [p.peer.node_id for p in self.peers.values() if p.acked_seq < target]

    def unmount_blockers(self) -> list[str]:
        """Sync peers still missing changes (what makes `mailfs umount` refuse)."""
        if not self.sync:
            return []
        target = self.store.journal.seq
        if self._confirmed(target):
            return []
        return [f"{p.peer.node_id} is {target - p.acked_seq} changes behind"
                for p in self.peers.values() if p.acked_seq < target]

    # ------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        seq = self.store.journal.seq
        samples = sorted(self.lag_samples)
        peers: dict[str, Any] = {}
        for node_id, state in self.peers.items():
            oldest = self.clock.oldest_after(state.acked_seq) if state.acked_seq < seq else None
            peers[node_id] = {
                "address": f"{state.peer.host}:{state.peer.port}",
                "connected": state.connected,
                "incoming_connected": state.incoming,
                "acked_seq": state.acked_seq,
                "sent_seq": state.sent_seq,
                "lag_changes": max(0, seq - state.acked_seq),
                "lag_seconds": round(now - oldest, 3) if oldest is not None else 0.0,
                "unacked_log_bytes": self.clock.bytes_after(state.acked_seq),
                "applied_from_peer": self.store.applied.get(node_id, 0),
                "snapshot": str(state.snapshot) if state.snapshot else None,
                "snapshot_fraction": round(state.snapshot.fraction, 3)
                if state.snapshot else None,
                "incoming_snapshot": str(state.incoming_snapshot)
                if state.incoming_snapshot else None,
                "snapshots_sent": state.snapshots_sent,
                "failures": state.failures,
                "last_error": state.last_error,
            }
        return {
            "node_id": self.node_id,
            "cluster": self.config.cluster,
            "epoch": self.store.epoch,
            "durability": self.config.durability,
            "quorum": self.quorum,
            "degraded": self.degraded,
            "degradations": self.degradations,
            "seq": seq,
            "log_bytes": self.store.counts()["replog_bytes"],
            "log_limit_bytes": self.config.log_limit,
            "conflicts": self.store.stats.conflicts,
            "ownership": {"policy": self.policy, **self.store.ownership_status()},
            "last_conflict": self.store.stats.last_conflict,
            "remote_applied": self.store.stats.remote_applied,
            "rejected_connections": self.rejected_connections,
            "last_rejection": self.last_rejection,
            "lag_p50_seconds": _percentile(samples, 0.50),
            "lag_p99_seconds": _percentile(samples, 0.99),
            "peers": peers,
        }


def _percentile(ordered: list[float], fraction: float) -> float:
    if not ordered:
        return 0.0
    return round(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))], 4)
