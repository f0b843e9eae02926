"""Store-level tests for replication bugs found in review (each fails before its fix)."""

from __future__ import annotations

import contextlib
import stat
from pathlib import Path

import trio
import trio.testing

from mailfs.cachemgr.metastore import MetaStore
from mailfs.cachemgr.records import Attrs, Op, Record, encode
from mailfs.cachemgr.snapshot import install_snapshot, write_snapshot
from mailfs.replication.identity import make_fid, make_version, node_namespace
from tests.rigs.stores import crash, open_node

MODE = stat.S_IFREG | 0o600






def content_of(store: MetaStore, dirpath: bytes, name: bytes) -> bytes | None:
    fid = store.lookup(dirpath, name)
    return None if fid is None else bytes(store.get(fid).content)


async def test_a_commit_cancelled_once_it_holds_the_lock_loses_nothing(tmp_path: Path
                                                                        ) -> None:
    """`_commit_locked` takes the batch out of `pending` and then awaits
    `trio.to_thread.run_sync`, whose first step is a cancellation checkpoint. A caller
    cancelled at that moment (the sender's nursery when the peer goes silent during
    `_send_snapshot`'s commit, a receiver's scope replaced by a reconnect inside
    `replace_state`, the daemon's nursery at unmount) drops the batch: it is never written,
    never put back, and the next commit deletes the journal file that held it."""
    store = open_node(tmp_path, "a")
    try:
        stored = store.create(b"box", b"dovecot.index", MODE, 0, 0)
        store.write(stored, 0, b"must survive")
        scope = trio.CancelScope()

        async def commit_then_get_cancelled() -> None:
            with scope:
                await store.commit()

        await store._commit_lock.acquire()  # a commit in progress elsewhere
        async with trio.open_nursery() as nursery:
            nursery.start_soon(commit_then_get_cancelled)
            await trio.testing.wait_all_tasks_blocked()
            store._commit_lock.release()  # hands the lock to the waiting commit ...
            scope.cancel()                # ... whose connection dies right then
        await store.commit()  # the next round of the committer
        crash(store)
        store = open_node(tmp_path, "a")
        assert content_of(store, b"box", b"dovecot.index") == b"must survive"
    finally:
        store.close()


async def test_snapshot_install_cancelled_by_a_reconnect_keeps_own_changes(tmp_path: Path
                                                                            ) -> None:
    """The receiver's `_exclusive` cancels the old stream's scope when the origin
    reconnects. If that happens while `replace_state` runs the install thread (seconds for a
    big snapshot), the commit of the re-applied own changes after the install is dropped
    (see the test above), while LMDB's seq moves past them at the next commit: the node's
    own changes that the snapshot lacked are gone from LMDB for good."""
    origin = open_node(tmp_path / "a", "a")
    receiver = open_node(tmp_path / "b", "b")
    try:
        theirs = origin.create(b"box", b"dovecot.index", MODE, 0, 0)
        origin.write(theirs, 0, b"from a")
        origin.commit_now()
        # b made a change that a does not have yet when a writes the snapshot.
        mine = receiver.create(b"box", b"dovecot.index.log", MODE, 0, 0)
        receiver.write(mine, 0, b"made on b")
        receiver.commit_now()
        path = tmp_path / "snapshot"
        with open(path, "wb") as out:
            origin_seqs = write_snapshot(origin, out)
        assert origin_seqs.get("b", 0) == 0  # b's change must be re-applied from b's log

        scope = trio.CancelScope()
        token = trio.lowlevel.current_trio_token()

        def install() -> int:
            next_fid = install_snapshot(receiver, path, origin_seqs)
            trio.from_thread.run_sync(scope.cancel, trio_token=token)  # a reconnects
            return next_fid

        with scope:
            await receiver.replace_state(install, origin_seqs)
        await receiver.commit()  # the committer's next round
        crash(receiver)
        receiver = open_node(tmp_path / "b", "b")
        assert content_of(receiver, b"box", b"dovecot.index") == b"from a"
        assert content_of(receiver, b"box", b"dovecot.index.log") == b"made on b"
    finally:
        origin.close()
        receiver.close()


def test_a_peers_write_far_beyond_the_end_cannot_break_recovery(tmp_path: Path) -> None:
    """Nothing bounds a WRITE's offset (or a TRUNCATE's size): `_apply_write` allocates
    `offset - size` zero bytes. A peer (or a local pwrite at a huge offset, same path)
    either makes the daemon allocate gigabytes, or, when the allocation fails, leaves the
    change journaled but unapplied: the next start after a crash replays it, fails again,
    and the mount cannot be recovered at all."""
    store = open_node(tmp_path, "b")
    ns = node_namespace("a")
    fid = make_fid(ns, 1)
    create = Record(1, Op.CREATE, (fid, b"box", b"dovecot.index",
                                   Attrs(MODE, 0, 0, 1, 0, 1, 1, 1)))
    huge = Record(2, Op.WRITE, (fid, 1 << 62, 1, b"x"))
    try:
        assert store.apply_remote("a", ns, 1, 0, create, encode(create)) is None
        store.commit_now()
        with contextlib.suppress(Exception):  # MemoryError today; refusing it is fine
            store.apply_remote("a", ns, 2, make_version(ns, 1), huge, encode(huge))
        crash(store)
        store = MetaStore(tmp_path, ram_budget=64 << 20, map_size=256 << 20,
                          commit_interval=1.0, commit_bytes=1 << 30, node_id="b",
                          namespace=node_namespace("b"), replicating=True)
        store.recover()  # raises MemoryError: the mount can never start again
        assert content_of(store, b"box", b"dovecot.index") == b""
    finally:
        store.close()
