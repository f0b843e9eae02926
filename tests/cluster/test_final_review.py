"""Replication bugs found in the final review, on real mounts (each fails before its fix)."""

from __future__ import annotations

from tests.cluster.conftest import MakeCluster
from tests.rigs.cluster import wait_for, write_synced
from tests.rigs.stores import pretend_booted_since


def test_a_two_node_cluster_converges_after_both_machines_crashed(
        make_cluster: MakeCluster) -> None:
    """A power loss takes both machines down. After the reboot each node's own seqs jump by
    SEQ_JUMP_AFTER_CRASH, so records_after() raises NeedSnapshot for every peer, even one
    that had all of its changes (the jumped-over seqs never held a change). Each node sends
    the other a snapshot, and each refuses the other's: can_reapply_after(known) is False
    because its own log "no longer reaches back" across its own gap. The two nodes never
    exchange another change."""
    cluster = make_cluster(size=2)
    a, b = cluster[0], cluster[1]
    box = a.path("box")
    box.mkdir()
    # Each node writes its own user after the reboot: two nodes writing one user at once
    # is a takeover race, not what this test is about (tests/cluster/test_ownership.py).
    a.path("box2").mkdir()
    write_synced(box / "dovecot.index", b"before the power loss\n")
    cluster.wait_converged()
    for node in (a, b):
        node.stop()
        pretend_booted_since(node.state_dir, still_running=True)
    a.start()
    b.start()
    write_synced(a.path("box/dovecot.index.log"), b"written on a after the reboot\n")
    write_synced(b.path("box2/dovecot.index.cache"), b"written on b after the reboot\n")
    wait_for(lambda: b.path("box/dovecot.index.log").exists()
             and a.path("box2/dovecot.index.cache").exists(),
             what="both nodes got the other's change made after the reboot")
    cluster.wait_converged()
