"""A peer's change to a user's index files drops this node's listings of that user.

See `mailfs/fs/listings.py`: a listing answers lookups of missing names on network stores.
"""

from __future__ import annotations

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
