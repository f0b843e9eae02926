"""fsx-style random operations on an index file of one node; its peer must end up with the
same bytes after every fsync (tests/rigs/fsx.py).

The exerciser's writes, mapped writes, truncates, appends, O_DIRECT writes and in-kernel
copies each become replication records; a record applied wrong, out of order or not at all
shows up on the peer as a wrong byte or a wrong size.
"""

from __future__ import annotations

import os

import pytest

from tests.cluster.conftest import MakeCluster
from tests.rigs.cluster import wait_for
from tests.rigs.fsx import Exerciser

ROUNDS = 3
OPERATIONS_PER_ROUND = 500


@pytest.mark.parametrize("index_only", [False, True], ids=["full-overlay", "index-only"])
def test_a_peer_reads_what_random_operations_left_after_each_fsync(
        make_cluster: MakeCluster, index_only: bool) -> None:
    cluster = make_cluster(2, index_only=index_only)
    a, b = cluster.nodes
    a.path("INBOX").mkdir()
    exerciser = Exerciser(a.path("INBOX") / "dovecot.index.cache", seed=11)
    replica = b.path("INBOX") / "dovecot.index.cache"

    def replica_is(expected: bytes) -> bool:
        try:
            return replica.read_bytes() == expected
        except FileNotFoundError:
            return False

    try:
        for round_number in range(ROUNDS):
            exerciser.run(OPERATIONS_PER_ROUND)
            os.fsync(exerciser.fd)
            expected = bytes(exerciser.model)
            wait_for(lambda: replica_is(expected),  # noqa: B023 - waited for right here
                     what=f"b to hold a's file after round {round_number} "
                          f"({len(expected)} bytes)")
    finally:
        exerciser.close()
    assert cluster.problems() == []
