"""A peer's change to a user's index files drops what this node keeps about that user's
mail files: its listings (`mailfs/fs/listings.py`: they answer lookups of missing names on
network stores) and the attributes read-only opens are answered from
(`mailfs/fs/freshness.py`).
"""

from __future__ import annotations

import os

import pytest

from tests.mount.test_listings import counters, listing_ready
from tests.rigs.cluster import Cluster, wait_for


def test_a_peers_change_to_a_users_index_drops_that_users_listings() -> None:
    """sdbox: a peer saves u.N on the shared store, then its index names u.N. Dovecot here
    reads the replicated index and opens u.N at once: a listing from before must not answer
    "missing" (Dovecot would take the message for lost)."""
    cluster = Cluster(2, {"backing_calls": "threads", "passthrough_timeout": "60"})
    try:
        cluster.start()
        cluster.wait_connected()
        a, b = cluster.nodes
        assert a.mount is not None and b.mount is not None
        box_a, box_b = a.mountpoint / "alice" / "box", b.mountpoint / "alice" / "box"
        box_a.mkdir(parents=True)
        (box_a / "dovecot.index.log").write_bytes(b"index 1")
        wait_for(lambda: (box_b / "dovecot.index.log").exists(), what="replication")
        listing_ready(b.mount, box_b)
        answered = counters(b.mount)["listing_missing_answered"]
        # (Not u.1 itself: the kernel would keep that name as missing, listing or not.)
        assert not (box_b / "u.0").exists()
        assert counters(b.mount)["listing_missing_answered"] == answered + 1
        (box_a / "u.1").write_bytes(b"message")
        with open(box_a / "dovecot.index.log", "ab") as log:
            log.write(b" names u.1")
        wait_for(lambda: (box_b / "dovecot.index.log").read_bytes().endswith(b"u.1"),
                 what="the index change")
        assert (box_b / "u.1").read_bytes() == b"message"
    finally:
        cluster.close()


def test_a_peers_change_to_a_users_index_makes_opens_of_that_users_files_ask_the_store(
        ) -> None:
    """An expunge on a peer: it unlinks u.1 on the shared store and its index says so.
    Here the kernel still holds the name, and a read-only open would be answered from the
    attributes read a moment ago; after the index change it must ask the store."""
    cluster = Cluster(2, {"backing_calls": "threads", "passthrough_timeout": "60"})
    try:
        cluster.start()
        cluster.wait_connected()
        a, b = cluster.nodes
        box_a, box_b = a.mountpoint / "alice" / "box", b.mountpoint / "alice" / "box"
        box_a.mkdir(parents=True)
        (box_a / "dovecot.index.log").write_bytes(b"index 1")
        (box_a / "u.1").write_bytes(b"message")
        wait_for(lambda: (box_b / "dovecot.index.log").exists(), what="replication")
        assert (box_b / "u.1").stat().st_size == len(b"message")
        os.unlink(box_a / "u.1")
        with open(box_a / "dovecot.index.log", "ab") as log:
            log.write(b" expunged u.1")
        wait_for(lambda: (box_b / "dovecot.index.log").read_bytes().endswith(b"u.1"),
                 what="the index change")
        with pytest.raises(FileNotFoundError):
            os.close(os.open(box_b / "u.1", os.O_RDONLY))
    finally:
        cluster.close()
