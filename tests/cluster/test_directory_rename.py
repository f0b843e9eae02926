"""Directory renames carry their index files to the new path on every node."""

from __future__ import annotations

import os

from tests.cluster.conftest import MakeCluster
from tests.rigs.cluster import wait_for, write_synced


def test_renamed_mailbox_keeps_its_index_files_on_every_node(
        make_cluster: MakeCluster) -> None:
    cluster = make_cluster()
    a, b, c = cluster.nodes
    folder = a.path("alice/Maildir/.Drafts")
    folder.mkdir(parents=True)
    write_synced(folder / "dovecot.index", b"index " * 100)
    write_synced(folder / "dovecot.index.log", b"log " * 100)
    write_synced(folder / "dovecot-uidlist", b"3 V1 N2\n")
    # b and c look at the folder first, so their kernels cache its old entries.
    wait_for(lambda: b.path("alice/Maildir/.Drafts/dovecot-uidlist").exists(), what="b")
    wait_for(lambda: c.path("alice/Maildir/.Drafts/dovecot-uidlist").exists(), what="c")
    before = cluster.wait_converged()
    assert set(before) == {f"alice/Maildir/.Drafts/{n}" for n in
                           ("dovecot.index", "dovecot.index.log", "dovecot-uidlist")}

    os.rename(folder, a.path("alice/Maildir/.Archive"))

    def moved(node_path: os.PathLike[str] | str) -> bool:
        return os.path.exists(os.path.join(node_path, "dovecot-uidlist"))

    for node in (b, c):
        wait_for(lambda node=node: moved(node.path("alice/Maildir/.Archive")),  # type: ignore[misc]
                 what=f"{node.node_id} sees the renamed folder's index files")
        assert node.path("alice/Maildir/.Archive/dovecot-uidlist").read_bytes() == b"3 V1 N2\n"
        # The old name goes once the kernel's cached entry is invalidated (worker thread),
        # well before its 10 s passthrough timeout.
        wait_for(lambda node=node: not node.path("alice/Maildir/.Drafts").exists(),  # type: ignore[misc]
                 5, f"{node.node_id} to forget the old folder name")
    after = cluster.wait_converged()
    assert after == {key.replace(".Drafts", ".Archive"): value for key, value in before.items()}
    assert cluster.problems() == []
