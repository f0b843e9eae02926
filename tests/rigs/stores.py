"""MetaStores of replicating nodes, without FUSE: for store-level replication tests."""

from __future__ import annotations

import struct
from pathlib import Path

import lmdb

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


def pretend_booted_since(state_dir: Path, still_running: bool | None = None) -> None:
    """Rewrite what a mount recorded about the machine, as if it had booted since.

    still_running=True is what a machine crash leaves: the mount never marked a clean stop.
    """
    env = lmdb.open(str(state_dir / "lmdb"), max_dbs=8)
    try:
        meta = env.open_db(b"meta")
        with env.begin(write=True) as txn:
            txn.put(b"boot_id", b"an-earlier-boot", db=meta)
            if still_running is not None:
                txn.put(b"running", struct.pack("<Q", int(still_running)), db=meta)
    finally:
        env.close()
