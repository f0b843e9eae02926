"""File ids and versions of different nodes can never collide."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailfs.replication.identity import (
    FID_COUNTER_MAX,
    NAMESPACE_MAX,
    VERSION_SEQ_MAX,
    fid_namespace,
    make_fid,
    make_version,
    node_namespace,
    version_parts,
)

namespaces = st.integers(0, NAMESPACE_MAX)


@given(namespaces, st.integers(0, FID_COUNTER_MAX), namespaces, st.integers(0, FID_COUNTER_MAX))
def test_fids_of_different_namespaces_differ(ns1: int, c1: int, ns2: int, c2: int) -> None:
    assert fid_namespace(make_fid(ns1, c1)) == ns1
    if ns1 != ns2:
        assert make_fid(ns1, c1) != make_fid(ns2, c2)


@given(namespaces, st.integers(0, VERSION_SEQ_MAX))
def test_versions_round_trip(namespace: int, seq: int) -> None:
    assert version_parts(make_version(namespace, seq)) == (namespace, seq)


@given(st.text(min_size=1, max_size=64))
def test_node_namespaces_are_never_the_legacy_zero(node_id: str) -> None:
    assert 1 <= node_namespace(node_id) <= NAMESPACE_MAX


def test_a_counter_never_spills_into_the_namespace() -> None:
    with pytest.raises(ValueError):
        make_fid(1, FID_COUNTER_MAX + 1)
    with pytest.raises(ValueError):
        make_version(1, VERSION_SEQ_MAX + 1)


def test_replicated_inode_numbers_stay_within_64_bits() -> None:
    from mailfs.fs.nodes import REPLICATED_BASE

    assert REPLICATED_BASE + make_fid(NAMESPACE_MAX, FID_COUNTER_MAX) < 1 << 64
