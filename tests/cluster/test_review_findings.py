"""Replication bugs found in review, on real mounts (each fails before its fix)."""

from __future__ import annotations

import os
import shutil

from tests.cluster.conftest import MakeCluster
from tests.rigs.cluster import wait_for, write_synced
from tests.rigs.stores import pretend_booted_since


def test_seqs_lost_by_an_origin_crash_are_never_reused(make_cluster: MakeCluster) -> None:
    """ARCHITECTURE.md: after a machine crash of the origin, a peer that applied changes the
    origin lost reports a higher applied seq "at the next handshake" and the origin
    continues after it, never reusing a seq. But only the handshake with that very peer
    does this: if that peer is down when the origin comes back, the origin hands the lost
    seqs to new changes, and when the peer returns it treats them as resends it already
    has (`seq <= applied`): it silently misses them, for good.

    The machine crash is simulated by restoring the origin's state dir as it was before
    changes that were streamed to b but (as far as a's disk is concerned) never committed,
    marked as a mount that was running when the machine went down (another boot id).
    """
    cluster = make_cluster(size=2)
    a, b = cluster[0], cluster[1]
    box = a.path("box")
    box.mkdir()
    write_synced(box / "dovecot.index", b"before the crash\n")
    cluster.wait_converged()

    a.stop()
    saved = a.state_dir.parent / "state-before-crash"
    shutil.copytree(a.state_dir, saved)
    a.start()
    wait_for(lambda: a.replication()["peers"]["b"]["connected"], what="a streams to b")
    for number in range(5):  # streamed to b, then lost by a's "machine crash"
        write_synced(box / f"dovecot.index.lost{number}", b"lost\n")
    lost_through = a.replication()["seq"]
    wait_for(lambda: b.replication()["peers"]["a"]["applied_from_peer"] >= lost_through,
             what="b applied a's changes")
    a.kill()
    shutil.rmtree(a.state_dir)
    shutil.copytree(saved, a.state_dir)
    pretend_booted_since(a.state_dir, still_running=True)

    b.stop()  # b is away when a comes back
    a.start()
    fresh = {f"box/dovecot.index.new{number}": b"new %d\n" % number for number in range(8)}
    for relative, data in fresh.items():
        write_synced(a.path(relative), data)
    assert a.replication()["seq"] > lost_through
    b.start()
    wait_for(lambda: b.replication()["peers"]["a"]["applied_from_peer"]
             >= a.replication()["seq"], what="b caught up with a's seq")
    # Whatever b does about the lost changes, it must get every change a made afterwards.
    for relative, data in fresh.items():
        path = b.path(relative)
        assert path.exists() and path.read_bytes() == data, f"b never got {relative}"


def test_a_snapshot_cut_off_by_a_crash_leaves_no_temp_file(make_cluster: MakeCluster) -> None:
    """The receiver writes an incoming snapshot to state_dir/snapshot-in-<id>.tmp and only
    removes it in `finally` blocks; after a kill -9 mid-transfer nothing ever removes it
    (no cleanup at mount), so every crash during a snapshot leaks up to a whole store's
    size in the state dir."""
    cluster = make_cluster(size=2, options={"log_limit": "1M"})
    a, b = cluster[0], cluster[1]
    box = a.path("box")
    box.mkdir()
    cluster.wait_converged()
    b.stop()
    for number in range(8):  # a snapshot big enough to catch in flight
        write_synced(box / f"dovecot.index.cache.{number}", os.urandom(8 << 20))
    b.start()

    def receiving() -> bool:
        return any(name.startswith("snapshot-in-") for name in os.listdir(b.state_dir))

    wait_for(receiving, 60, "b to start receiving a snapshot")
    b.kill()
    b.start()
    cluster.wait_converged(timeout=60)
    leftovers = [name for node in cluster.nodes for name in os.listdir(node.state_dir)
                 if name.startswith("snapshot-")]
    assert leftovers == []
