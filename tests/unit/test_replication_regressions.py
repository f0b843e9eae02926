"""Regression tests for bugs found in replication (each failed before its fix)."""

from __future__ import annotations

import stat
from pathlib import Path

from mailfs.cachemgr.records import Op, Record, decode_one
from mailfs.replication.identity import node_namespace
from tests.rigs.stores import open_node, pretend_booted_since

MODE = stat.S_IFREG | 0o600




def test_a_peers_drop_of_a_file_dropped_here_is_not_a_conflict(tmp_path: Path) -> None:
    """Both nodes drop a file replaced by rename-over; the peer's DROP arrived while the
    local drop was not committed yet, and `get` read the stale committed copy back."""
    store = open_node(tmp_path, "a")
    try:
        stored = store.create(b"u", b"dovecot-uidlist", MODE, 0, 0)
        store.write(stored, 0, b"hello")
        store.commit_now()
        fid = stored.fid
        store.unlink(b"u", b"dovecot-uidlist")
        store.drop(fid)
        peer_drop = Record(1, Op.DROP, (fid,))
        assert store.apply_remote("b", node_namespace("b"), 1, 0, peer_drop) is None
        assert store.stats.conflicts == 0
        store.commit_now()
        assert store.cached(fid) is None
    finally:
        store.close()


def test_a_drop_that_overtakes_the_rename_it_follows_is_not_a_conflict(
        tmp_path: Path) -> None:
    """c dropped a's old index after a's rename-over reached c; b got c's DROP before a's
    RENAME (two origins, two connections), saw the file still named, and counted a
    conflict. The file must go once the rename takes its last name."""
    a = open_node(tmp_path / "a", "a")
    b = open_node(tmp_path / "b", "b")
    try:
        old = a.create(b"u", b"dovecot.index", MODE, 0, 0)
        new = a.create(b"u", b"dovecot.index.tmp", MODE, 0, 0)
        a.rename(b"u", b"dovecot.index.tmp", b"u", b"dovecot.index")
        entries = a.records_after(0, 1 << 30)
        records = [(entry, decode_one(entry.record)) for entry in entries]
        *creates, rename = records
        for entry, record in creates:
            assert b.apply_remote("a", node_namespace("a"), entry.seq, entry.base_version,
                                  record) is None
        c_drop = Record(1, Op.DROP, (old.fid,))
        assert b.apply_remote("c", node_namespace("c"), 1, 0, c_drop) is None
        assert b.get(old.fid).attrs.nlink == 1  # still named here: kept for now
        entry, record = rename
        assert b.apply_remote("a", node_namespace("a"), entry.seq, entry.base_version,
                              record) is None
        assert b.stats.conflicts == 0
        assert b.lookup(b"u", b"dovecot.index") == new.fid
        b.commit_now()
        assert b.cached(old.fid) is None
        assert old.fid not in {fid for _, _, fid in b.all_files()}
        assert b._orphans() == []
    finally:
        a.close()
        b.close()




def test_only_a_machine_crash_makes_own_seqs_jump(tmp_path: Path) -> None:
    from mailfs.cachemgr.metastore import SEQ_JUMP_AFTER_CRASH

    store = open_node(tmp_path, "a")
    store.create(b"u", b"dovecot.index", MODE, 0, 0)
    store.mark_stopped()
    store.commit_now()
    seq = store.journal.seq
    store.close()
    pretend_booted_since(tmp_path)  # a clean stop, then a reboot: nothing was lost
    store = open_node(tmp_path, "a")
    assert store.journal.seq == seq
    store.close()  # still marked running: the daemon died, the machine did not
    store = open_node(tmp_path, "a")
    assert store.journal.seq == seq
    store.close()
    pretend_booted_since(tmp_path)  # died while mounted, and the machine went down
    store = open_node(tmp_path, "a")
    try:
        assert store.journal.seq == seq + SEQ_JUMP_AFTER_CRASH
    finally:
        store.close()
