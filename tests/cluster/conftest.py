"""Fixtures for cluster tests: real mailfs mounts replicating to each other over TLS."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.rigs.cluster import Cluster

MakeCluster = Callable[..., Cluster]
LOG_TAIL = 15_000


@pytest.fixture
def make_cluster() -> Iterator[MakeCluster]:
    """Start clusters; every one is killed, unmounted and removed at the end, pass or fail.

    Each node's log tail is printed, which pytest shows only when the test fails.
    """
    made: list[Cluster] = []

    def make(size: int = 3, options: dict[str, str] | None = None,
             start: bool = True, index_only: bool = False,
             partitionable: bool = False) -> Cluster:
        cluster = Cluster(size, options, index_only=index_only, partitionable=partitionable)
        made.append(cluster)
        if start:
            # From a steady state: nobody writes before every stream is up.
            cluster.start().wait_connected()
        return cluster

    try:
        yield make
    finally:
        for cluster in made:
            try:
                for node in cluster.nodes:
                    print(f"--- mailfs log of node {node.node_id}\n{node.log()[-LOG_TAIL:]}")
            finally:
                cluster.close()


@pytest.fixture
def cluster(make_cluster: MakeCluster) -> Cluster:
    """Three async nodes, a, b and c, all running."""
    return make_cluster()
