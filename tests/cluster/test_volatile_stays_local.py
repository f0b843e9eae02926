"""Lock files are this node's alone: never streamed, never visible on a peer."""

from __future__ import annotations

import os

from tests.cluster.conftest import MakeCluster


def test_lock_files_are_never_sent_to_peers(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(size=2)
    a, b = cluster[0], cluster[1]
    box = a.path("box")
    box.mkdir()
    seq_before = a.replication()["seq"]
    fd = os.open(box / "dovecot.index.log.lock", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"12345\n")
    os.fsync(fd)
    os.close(fd)
    (box / "dovecot-uidlist.lock").write_bytes(b"lock")
    assert a.replication()["seq"] == seq_before  # no change was journaled for the locks
    # A replicated file written after the locks arrives on b; the locks never do.
    fd = os.open(box / "dovecot.index", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"index")
    os.fsync(fd)
    os.close(fd)
    cluster.wait_converged()
    names_on_b = sorted(os.listdir(b.path("box")))
    assert names_on_b == ["dovecot.index"]
    assert not b.path("box/dovecot.index.log.lock").exists()
    assert cluster.problems() == []
