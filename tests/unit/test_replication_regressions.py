"""Regression tests for bugs found in replication (each failed before its fix)."""

from __future__ import annotations

import stat
from pathlib import Path

from mailfs.cachemgr.metastore import MetaStore
from mailfs.cachemgr.records import Op, Record
from mailfs.replication.identity import node_namespace

MODE = stat.S_IFREG | 0o600


def open_node(path: Path, node_id: str) -> MetaStore:
    store = MetaStore(path, ram_budget=64 << 20, map_size=256 << 20, commit_interval=1.0,
                      commit_bytes=1 << 30, node_id=node_id,
                      namespace=node_namespace(node_id), replicating=True)
    store.recover()
    return store


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
