"""Ownership of user directories through real mounts: claims, takeovers, fencing, split
brain and the consistency policy (cachemgr/ownership.py).

A partition here is real: every node reaches each peer through a TCP forwarder that the
test cuts (tests/rigs/partition.py), while both sides keep running and serving.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.conftest import MakeCluster
from tests.rigs.cluster import Cluster, Node, wait_for, write_synced
from tests.rigs.mount import run_cli

REFUSED = ("write to user", "FENCED")


def owners(node: Node) -> dict[str, dict[str, Any]]:
    result = run_cli("owners", str(node.mountpoint), "--json")
    assert result.returncode == 0, result.stderr
    return {entry["user"]: entry for entry in json.loads(result.stdout)["owners"]}


def owner_of(node: Node, user: str) -> tuple[str, int] | None:
    entry = owners(node).get(user)
    return None if entry is None else (entry["node"], entry["epoch"])


def ownership(node: Node) -> dict[str, Any]:
    return node.replication()["ownership"]  # type: ignore[no-any-return]


def conflicts(node: Node, save: Path | None = None) -> dict[str, Any]:
    args = ["conflicts", str(node.mountpoint), "--json"]
    if save is not None:
        args += ["--save", str(save)]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def wait_owner(nodes: list[Node], user: str, expected: tuple[str, int]) -> None:
    wait_for(lambda: all(owner_of(node, user) == expected for node in nodes),
             what=f"every node to see {user} owned by {expected}")


def refused_write(path: Path) -> int:
    with pytest.raises(OSError) as caught:
        write_synced(path, b"must not land")
    return caught.value.errno or 0


def wait_cut_off(node: Node, others: list[Node]) -> None:
    def cut() -> bool:
        peers = node.replication()["peers"]
        return not any(peers[o.node_id]["connected"] or peers[o.node_id]["incoming_connected"]
                       for o in others)
    wait_for(cut, what=f"{node.node_id} to lose its peers")


def test_the_first_write_claims_a_user_and_a_write_elsewhere_takes_it_over(
        cluster: Cluster) -> None:
    a, b, c = cluster.nodes
    a.path("alice").mkdir()
    write_synced(a.path("alice/dovecot.index"), b"from a")
    cluster.wait_converged()
    wait_owner(cluster.nodes, "alice", ("a", 1))

    write_synced(b.path("alice/dovecot.index"), b"from b, after a")
    wait_owner(cluster.nodes, "alice", ("b", 2))
    cluster.wait_converged()
    assert owners(a)["alice"]["lost_here"] and not owners(c)["alice"]["lost_here"]
    # The old owner reads the new owner's bytes, and may no longer write.
    assert a.path("alice/dovecot.index").read_bytes() == b"from b, after a"
    assert refused_write(a.path("alice/dovecot.index")) == errno.EROFS
    assert refused_write(a.path("alice/dovecot-uidlist")) == errno.EROFS
    assert ownership(a)["refused_writes"] >= 2
    assert ownership(a)["lost_here"] == 1

    # A planned move back: a waits until b has sent everything, then owns it again.
    moved = run_cli("takeover", str(a.mountpoint), "alice", "--timeout", "20")
    assert moved.returncode == 0, moved.stderr
    assert "epoch 3" in moved.stdout
    wait_owner(cluster.nodes, "alice", ("a", 3))
    write_synced(a.path("alice/dovecot.index"), b"a again")
    assert refused_write(b.path("alice/dovecot.index")) == errno.EROFS
    sums = cluster.wait_converged()
    assert len(sums) == 1
    assert c.path("alice/dovecot.index").read_bytes() == b"a again"
    # Nothing was ever fenced: every write went to the owner of the moment.
    assert all(ownership(node)["fenced_changes"] == 0 for node in cluster.nodes)
    assert not cluster.problems(allowed=REFUSED)


def test_a_split_brain_converges_on_the_later_takeover_everywhere(
        make_cluster: MakeCluster, tmp_path: Path) -> None:
    cluster = make_cluster(3, partitionable=True)
    a, b, c = cluster.nodes
    a.path("alice").mkdir()
    a.path("bob").mkdir()
    write_synced(a.path("alice/dovecot.index"), b"base")
    write_synced(a.path("alice/dovecot-uidlist"), b"uidlist base")
    cluster.wait_converged()
    wait_owner(cluster.nodes, "alice", ("a", 1))

    cluster.partition([a], [b, c])
    wait_cut_off(a, [b, c])
    # a does not know it is cut off and goes on writing alice: these writes are fenced.
    write_synced(a.path("alice/dovecot.index"), b"a during the partition")
    write_synced(a.path("alice/dovecot.index.log"), b"a's new log")
    # b serves alice meanwhile: a takeover, with what b has.
    write_synced(b.path("alice/dovecot.index"), b"b during the partition")
    wait_owner([b, c], "alice", ("b", 2))
    # Both sides claim bob, owned by nobody yet: (epoch 1, "b") beats (epoch 1, "a").
    write_synced(a.path("bob/dovecot.index"), b"bob by a")
    write_synced(b.path("bob/dovecot.index"), b"bob by b")

    cluster.heal()
    cluster.wait_connected()
    cluster.wait_converged()
    for node in cluster.nodes:
        assert node.path("alice/dovecot.index").read_bytes() == b"b during the partition"
        assert node.path("alice/dovecot-uidlist").read_bytes() == b"uidlist base"
        assert not node.path("alice/dovecot.index.log").exists()
        assert node.path("bob/dovecot.index").read_bytes() == b"bob by b"
    wait_owner(cluster.nodes, "alice", ("b", 2))
    wait_owner(cluster.nodes, "bob", ("b", 1))

    # Both peers refused what a wrote without owning: fenced on every peer.
    for node in (b, c):
        wait_for(lambda node=node: ownership(node)["fenced_changes"] >= 3,  # type: ignore[misc]
                 what=f"{node.node_id} to fence a's changes")
    # a kept what it lost, where an admin can look at it.
    listed = conflicts(a, save=tmp_path)
    paths = {version["path"] for version in listed["versions"]}
    assert {"alice/dovecot.index", "alice/dovecot.index.log", "bob/dovecot.index"} <= paths
    saved = {Path(p).read_bytes() for p in listed["saved"]}
    assert {b"a during the partition", b"a's new log", b"bob by a"} <= saved
    assert ownership(a)["conflict_versions"] == len(listed["versions"])
    assert not conflicts(b)["versions"]

    # a learnt it lost both users: its writes fail, and nothing of them reaches anyone.
    assert owners(a)["alice"]["lost_here"] and owners(a)["bob"]["lost_here"]
    assert refused_write(a.path("alice/dovecot.index")) == errno.EROFS
    assert refused_write(a.path("bob/dovecot.index")) == errno.EROFS
    write_synced(b.path("alice/dovecot.index"), b"b after the heal")
    cluster.wait_converged()
    assert a.path("alice/dovecot.index").read_bytes() == b"b after the heal"
    assert not cluster.problems(allowed=REFUSED)


def test_the_consistency_policy_refuses_writes_without_a_majority(
        make_cluster: MakeCluster) -> None:
    cluster = make_cluster(2, {"ownership_policy": "consistency"}, partitionable=True)
    a, b = cluster.nodes
    a.path("alice").mkdir()
    write_synced(a.path("alice/dovecot.index"), b"with both nodes up")
    cluster.wait_converged()

    cluster.partition([a], [b])
    wait_cut_off(a, [b])
    wait_cut_off(b, [a])
    # One node of two is no majority: neither the owner nor the other may write.
    assert refused_write(a.path("alice/dovecot.index")) == errno.EROFS
    assert refused_write(b.path("alice/dovecot.index")) == errno.EROFS
    assert ownership(a)["last_refused"].endswith("(writes need a majority)")

    cluster.heal()
    cluster.wait_connected()
    write_synced(a.path("alice/dovecot.index"), b"after the heal")
    cluster.wait_converged()
    assert b.path("alice/dovecot.index").read_bytes() == b"after the heal"
    assert owner_of(b, "alice") == ("a", 1)
    assert not cluster.problems(allowed=REFUSED)


def test_users_two_levels_deep_are_owned_one_by_one(make_cluster: MakeCluster) -> None:
    """ownership.depth = 2, for %d/%n layouts: each user of a domain has its own owner,
    and a file directly in the domain's directory has none."""
    cluster = make_cluster(2, {"ownership_depth": "2"})
    a, b = cluster.nodes
    a.path("example.com/alice").mkdir(parents=True)
    a.path("example.com/bob").mkdir()
    write_synced(a.path("example.com/alice/dovecot.index"), b"alice on a")
    write_synced(b.path("example.com/bob/dovecot.index"), b"bob on b")
    write_synced(a.path("example.com/dovecot.index"), b"the domain's, on a")
    cluster.wait_converged()
    write_synced(b.path("example.com/dovecot.index"), b"the domain's, on b")
    write_synced(a.path("example.com/alice/dovecot.index"), b"alice on a again")
    write_synced(b.path("example.com/bob/dovecot.index"), b"bob on b again")
    cluster.wait_converged()
    wait_owner(cluster.nodes, "example.com/alice", ("a", 1))
    wait_owner(cluster.nodes, "example.com/bob", ("b", 1))
    assert set(owners(a)) == {"example.com/alice", "example.com/bob"}
    assert a.path("example.com/dovecot.index").read_bytes() == b"the domain's, on b"
    for node in cluster.nodes:
        assert ownership(node)["refused_writes"] == 0
        assert ownership(node)["fenced_changes"] == 0
    assert not cluster.problems()
