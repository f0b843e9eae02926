"""Store-level tests for bugs found in the final review of replay, snapshot re-apply and
seq jumps (each fails before its fix)."""

from __future__ import annotations

import stat
from functools import partial
from pathlib import Path

from mailfs.cachemgr.metastore import U64, MetaStore
from mailfs.cachemgr.records import Op, Record, decode_one
from mailfs.cachemgr.snapshot import install_snapshot, write_snapshot
from mailfs.replication.identity import node_namespace
from tests.rigs.stores import crash, open_node

MODE = stat.S_IFREG | 0o600


def content_of(store: MetaStore, dirpath: bytes, name: bytes) -> bytes | None:
    fid = store.lookup(dirpath, name)
    return None if fid is None else bytes(store.get(fid).content)


def simulate_machine_crash(path: Path, node_id: str) -> MetaStore:
    """The mount was running when the machine went down; it is mounted after the reboot."""
    store = open_node(path, node_id)  # marks it running
    store._set(b"meta", b"boot_id", b"a boot before the crash")
    store.commit_now()
    crash(store)
    return open_node(path, node_id)


def test_own_write_to_an_open_file_a_peer_unlinked_survives_replay(tmp_path: Path) -> None:
    """Live, a peer's change that takes the last name of a file still open here does not
    drop it (`_drop_if_unused`: in_use), so the local writer keeps writing to it and those
    WRITEs are journaled. At replay nothing is open, so the REMOTE record drops the file,
    and the next own WRITE raises FileNotFoundError out of recover(): daemon.run turns that
    into "cannot recover the state" at every later mount attempt."""
    store = open_node(tmp_path, "b")
    try:
        stored = store.create(b"box", b"dovecot.index.log", MODE, 0, 0)
        fid = stored.fid
        store.write(stored, 0, b"before")
        store.commit_now()
        store.in_use = lambda f: f == fid  # a Dovecot process has it open
        unlink = Record(1, Op.UNLINK, (b"box", b"dovecot.index.log", 1))
        assert store.apply_remote("a", node_namespace("a"), 1, 0, unlink) is None
        store.write(store.get(fid), 6, b" and after")  # still open here: allowed
        crash(store)
        store = open_node(tmp_path, "b")  # raises FileNotFoundError today
        assert store.lookup(b"box", b"dovecot.index.log") is None
    finally:
        store.close()


async def test_snapshot_after_a_machine_crash_keeps_own_changes_past_the_seq_jump(
        tmp_path: Path) -> None:
    """After a machine crash own seqs jump by SEQ_JUMP_AFTER_CRASH, so the replication log
    has a gap. A snapshot from a peer that has only some of the pre-crash changes passes
    can_reapply_after (it looks at the first entry only), but _reapply_logged stops at the
    gap ("own change N is missing"), and replace_state then commits seq = journal.seq: the
    changes made after the reboot are gone here, and from the log's point of view done."""
    b = open_node(tmp_path / "b", "b")
    a = open_node(tmp_path / "a", "a")
    try:
        x = b.create(b"box", b"dovecot.index", MODE, 0, 0)  # b's seq 1
        b.write(x, 0, b"written before the crash")            # b's seq 2
        b.commit_now()
        first = b.records_after(0, 1 << 20)[0]
        crash(b)
        b = simulate_machine_crash(tmp_path / "b", "b")
        assert b.journal.seq > 1 << 24  # the jump happened
        y = b.create(b"box", b"dovecot.index.log", MODE, 0, 0)
        b.write(y, 0, b"written after the reboot")
        b.commit_now()
        # a has applied b's first change only, then sends b a snapshot.
        assert a.apply_remote("b", node_namespace("b"), 1, first.base_version,
                              decode_one(first.record)) is None
        a.commit_now()
        path = tmp_path / "snapshot"
        with open(path, "wb") as out:
            origin_seqs = write_snapshot(a, out)
        assert origin_seqs["b"] == 1
        await b.replace_state(partial(install_snapshot, b, path, origin_seqs), origin_seqs)
        assert content_of(b, b"box", b"dovecot.index") == b"written before the crash"
        assert content_of(b, b"box", b"dovecot.index.log") == b"written after the reboot"
    finally:
        a.close()
        b.close()


def test_a_daemon_crash_after_skip_to_keeps_the_writes_after_it(tmp_path: Path) -> None:
    """The sender's diverged path calls skip_to(position) and then awaits a commit; a local
    change made meanwhile is journaled with seq position+1. If the daemon dies before that
    commit, replay expects committed_seq+1, finds position+1, logs "journal gap ... replay
    stops", and the write is lost although no machine crashed."""
    store = open_node(tmp_path, "b")
    try:
        stored = store.create(b"box", b"dovecot.index", MODE, 0, 0)
        store.commit_now()
        store.skip_to(100)  # a peer has applied 100 of ours
        store.write(store.get(stored.fid), 0, b"written after the skip")
        crash(store)
        store = open_node(tmp_path, "b")
        assert content_of(store, b"box", b"dovecot.index") == b"written after the skip"
    finally:
        store.close()


def test_machine_crash_flag_is_cleared_by_a_clean_stop(tmp_path: Path) -> None:
    """Sanity (expected to pass): running is 1 while mounted, 0 after mark_stopped + commit,
    and a clean stop followed by a reboot causes no seq jump."""
    store = open_node(tmp_path, "b")
    try:
        with store.env.begin(db=store.db_meta) as txn:
            assert U64.unpack(txn.get(b"running"))[0] == 1
        store.create(b"box", b"f", MODE, 0, 0)
        store.mark_stopped()
        store._set(b"meta", b"boot_id", b"a boot before the reboot")
        store.commit_now()
        seq = store.journal.seq
        store.close()
        store = open_node(tmp_path, "b")
        assert store.journal.seq == seq
    finally:
        store.close()
