"""Index-only clusters: directories are replicated like index files, seen through every mount."""

from __future__ import annotations

import os
import stat

from tests.cluster.conftest import MakeCluster
from tests.rigs.cluster import wait_for, write_synced

LOCK = "dovecot-uidlist.lock"


def test_directory_changes_reach_every_node(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(size=3, index_only=True)
    a, b, c = cluster[0], cluster[1], cluster[2]
    for node in (b, c):  # the peers' kernels have looked, and cached what they saw
        assert not node.path("alice").exists()
    inbox = a.path("alice/mailboxes/INBOX")
    inbox.mkdir(parents=True)
    write_synced(inbox / "dovecot.index", b"inbox index")
    (inbox / LOCK).write_bytes(b"a's lock")
    os.chown(a.path("alice"), 5000, 5000)
    os.chmod(a.path("alice"), 0o700)
    cluster.wait_converged()
    for node in (b, c):
        assert node.path("alice/mailboxes/INBOX").is_dir()
        assert node.path("alice/mailboxes/INBOX/dovecot.index").read_bytes() == b"inbox index"
        assert not node.path(f"alice/mailboxes/INBOX/{LOCK}").exists()  # locks stay local
        st = node.path("alice").stat()
        assert (st.st_uid, st.st_mode & 0o7777) == (5000, 0o700)

    os.rename(a.path("alice/mailboxes/INBOX"), a.path("alice/mailboxes/Archive"))
    cluster.wait_converged()
    for node in (b, c):
        assert not node.path("alice/mailboxes/INBOX").exists()
        assert node.path("alice/mailboxes/Archive/dovecot.index").read_bytes() == b"inbox index"

    os.unlink(a.path(f"alice/mailboxes/Archive/{LOCK}"))
    os.unlink(a.path("alice/mailboxes/Archive/dovecot.index"))
    os.rmdir(a.path("alice/mailboxes/Archive"))
    cluster.wait_converged()
    for node in (b, c):
        assert os.listdir(node.path("alice/mailboxes")) == []
    assert cluster.problems() == []


def test_a_directory_made_while_a_peer_is_down(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(size=2, index_only=True)
    a, b = cluster[0], cluster[1]
    b.stop()
    a.path("bob/mailboxes/Sent").mkdir(parents=True)
    write_synced(a.path("bob/mailboxes/Sent/dovecot.index.log"), b"sent log")
    write_synced(a.path("bob/subscriptions"), b"Sent\n")
    b.start()
    wait_for(lambda: b.path("bob/mailboxes/Sent/dovecot.index.log").exists(),
             what="b to catch up with a directory made while it was down")
    sums = cluster.wait_converged()
    assert "bob/mailboxes/Sent/" in sums
    assert b.path("bob/subscriptions").read_bytes() == b"Sent\n"
    assert cluster.problems() == []


def test_links_and_special_files_reach_every_node(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(size=2, index_only=True)
    a, b = cluster[0], cluster[1]
    box = a.path("alice/mailboxes/INBOX")
    box.mkdir(parents=True)
    os.symlink("../shared/dovecot.index", box / "dovecot.index")
    os.mkfifo(box / "fifo", 0o600)
    os.mknod(box / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    cluster.wait_converged()
    peer = b.path("alice/mailboxes/INBOX")
    assert os.readlink(peer / "dovecot.index") == "../shared/dovecot.index"
    assert stat.S_ISFIFO(os.lstat(peer / "fifo").st_mode)
    assert os.lstat(peer / "null").st_rdev == os.makedev(1, 3)
    os.rename(box / "dovecot.index", box / "moved")
    os.unlink(box / "fifo")
    cluster.wait_converged()
    assert os.readlink(peer / "moved") == "../shared/dovecot.index"
    assert sorted(os.listdir(peer)) == ["moved", "null"]
    assert cluster.problems() == []
