"""MetaStores of replicating nodes, without FUSE: for store-level replication tests."""

from __future__ import annotations

from pathlib import Path

from mailfs.cachemgr.metastore import MetaStore
from mailfs.replication.identity import node_namespace


def open_node(path: Path, node_id: str) -> MetaStore:
    """A node's store as a mount opens it (recovered from its journal)."""
    store = MetaStore(path, ram_budget=64 << 20, map_size=256 << 20, commit_interval=1.0,
                      commit_bytes=1 << 30, node_id=node_id,
                      namespace=node_namespace(node_id), replicating=True)
    store.recover()
    return store


def crash(store: MetaStore) -> None:
    """The process dies: nothing more is committed (the journal file stays)."""
    store.journal.close()
    store.env.close()
