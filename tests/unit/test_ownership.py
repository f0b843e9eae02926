"""Ownership records and the store's takeover rules, without mounts (cachemgr/ownership.py)."""

from __future__ import annotations

import errno
from functools import partial
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailfs.cachemgr.metastore import MetaStore
from mailfs.cachemgr.ownership import (
    ManifestEntry,
    Owner,
    own_problem,
    pack_manifest,
    pack_seq_map,
    unpack_manifest,
    unpack_seq_map,
    user_of,
)
from mailfs.cachemgr.records import Attrs, Op, Record, decode_one
from mailfs.cachemgr.snapshot import install_snapshot, write_snapshot
from mailfs.replication.identity import node_namespace

ATTRS = Attrs(0o100600, 1, 1, 1, 3, 1, 2, 3)


def test_user_of_takes_the_first_components_of_a_directory() -> None:
    assert user_of(b"alice/Maildir/cur", 1) == b"alice"
    assert user_of(b"example.com/alice/INBOX", 2) == b"example.com/alice"
    assert user_of(b"example.com", 2) is None  # above the user level
    assert user_of(b"", 1) is None
    assert user_of(b"alice", 0) is None  # ownership off


@given(st.dictionaries(st.text(min_size=1, max_size=20), st.integers(0, 2**64 - 1)))
def test_seq_maps_round_trip(seqs: dict[str, int]) -> None:
    assert unpack_seq_map(pack_seq_map(seqs)) == seqs


def test_owner_and_manifest_round_trip_and_damage_is_refused() -> None:
    owner = Owner("b", 7, 123, {"a": 5, "c": 9}, lost=True)
    assert Owner.unpack(owner.pack()) == owner
    entries = [ManifestEntry(b"alice", b"dovecot.index", 42, 9, 1234, ATTRS),
               ManifestEntry(b"alice/INBOX", b"", 0, 0, 0, Attrs(0, 0, 0, 0, 0, 0, 0, 0))]
    packed = pack_manifest(entries)
    assert unpack_manifest(packed) == entries
    for damaged in (packed[:-1], packed + b"x", b"\xff\xff\xff\xff" + packed[4:]):
        with pytest.raises(ValueError):
            unpack_manifest(damaged)
    with pytest.raises(ValueError):
        Owner.unpack(owner.pack()[:5])


def own_record(user: bytes, entries: list[ManifestEntry]) -> Record:
    return Record(1, Op.OWN, (user, b"b", 1, 1, pack_seq_map({}), pack_manifest(entries)))


def test_a_peers_takeover_may_not_reach_outside_its_user() -> None:
    good = ManifestEntry(b"alice", b"dovecot.index", 42, 9, 1, ATTRS)
    assert own_problem(own_record(b"alice", [good]), 1) is None
    outside = ManifestEntry(b"bob", b"dovecot.index", 42, 9, 1, ATTRS)
    assert own_problem(own_record(b"alice", [outside]), 1) is not None
    dotdot = ManifestEntry(b"alice/..", b"x", 42, 9, 1, ATTRS)
    assert own_problem(own_record(b"alice", [dotdot]), 1) is not None
    slash = ManifestEntry(b"alice", b"a/b", 42, 9, 1, ATTRS)
    assert own_problem(own_record(b"alice", [slash]), 1) is not None
    # Not a user directory at this node's depth (a cluster configured two ways).
    assert own_problem(own_record(b"alice/Maildir", [good]), 1) is not None
    assert own_problem(own_record(b"alice", [good]), 2) is not None


def make_store(path: Path, node: str) -> MetaStore:
    store = MetaStore(path / node, 64 << 20, 1 << 30, 1.0, 1 << 20, node_id=node,
                      namespace=node_namespace(node), replicating=True, ownership_depth=1)
    store.recover()
    return store


def ship(source: MetaStore, target: MetaStore, after: int = 0) -> int:
    """Apply source's own changes after `after` on target, as the receiver does."""
    last = after
    for entry in source.replog_tail:
        if entry.seq <= after:
            continue
        target.apply_remote(source.node_id, source.namespace, entry.seq, entry.base_version,
                            decode_one(entry.record), entry.record)
        last = entry.seq
    return last


def content(store: MetaStore, dirpath: bytes, name: bytes) -> bytes | None:
    fid = store.lookup(dirpath, name)
    return None if fid is None else bytes(store.get(fid).content)


def test_two_stores_that_diverged_converge_on_the_takeover(tmp_path: Path) -> None:
    a, b = make_store(tmp_path, "a"), make_store(tmp_path, "b")
    try:
        index = a.create(b"alice", b"dovecot.index", 0o100600, 0, 0)
        a.write(index, 0, b"base content")
        shipped_a = ship(a, b)
        assert a.owners[b"alice"].node == "a" and b.owners[b"alice"].node == "a"

        # Both change the file from the same base (a partition).
        a.write(index, 0, b"A")
        a.create(b"alice", b"dovecot.index.log", 0o100600, 0, 0)
        b.write(b.get(index.fid), 0, b"B" * 20)  # a takeover by b, then its write
        assert b.owners[b"alice"].rank() == (2, "b")

        ship(b, a)
        ship(a, b, shipped_a)
        assert content(a, b"alice", b"dovecot.index") == b"B" * 20
        assert content(b, b"alice", b"dovecot.index") == b"B" * 20
        assert a.lookup(b"alice", b"dovecot.index.log") is None
        assert b.lookup(b"alice", b"dovecot.index.log") is None
        assert b.ownership.fenced_changes == 2
        lost = {v.path: v.content for v in a.losing_versions()}
        assert lost[b"alice/dovecot.index"] == b"Aase content"
        assert b"alice/dovecot.index.log" in lost
        assert a.owners[b"alice"].lost

        with pytest.raises(OSError) as refused:
            a.write(a.get(index.fid), 0, b"again")
        assert refused.value.errno == errno.EROFS
        assert content(a, b"alice", b"dovecot.index") == b"B" * 20
    finally:
        a.close()
        b.close()


async def test_a_snapshot_carries_owners_and_what_the_receiver_lost(tmp_path: Path) -> None:
    a, b = make_store(tmp_path, "a"), make_store(tmp_path, "b")
    try:
        mine = b.create(b"alice", b"dovecot.index", 0o100600, 0, 0)
        b.write(mine, 0, b"b's")
        ship(b, a)
        a.write(a.get(mine.fid), 0, b"a took it over")
        assert a.owners[b"alice"].rank() == (2, "a")
        a.commit_now()
        b.commit_now()
        path = tmp_path / "snapshot"
        with open(path, "wb") as out:
            origin_seqs = write_snapshot(a, out)
        await b.replace_state(partial(install_snapshot, b, path, origin_seqs), origin_seqs)
        owner = b.owners[b"alice"]
        assert (owner.node, owner.epoch, owner.lost) == ("a", 2, True)
        assert content(b, b"alice", b"dovecot.index") == b"a took it over"
        with pytest.raises(OSError) as refused:
            b.write(b.get(mine.fid), 0, b"x")
        assert refused.value.errno == errno.EROFS
    finally:
        a.close()
        b.close()


def test_a_user_waits_for_its_takeovers_content_and_bystanders_lose_nothing(
        tmp_path: Path) -> None:
    a, b, c = (make_store(tmp_path, node) for node in "abc")
    try:
        index = a.create(b"alice", b"dovecot.index", 0o100600, 0, 0)
        a.write(index, 0, b"version one")
        shipped = ship(a, b)
        ship(a, c)
        a.write(index, 0, b"version two")  # c is behind: it never gets this one from a
        ship(a, b, shipped)
        b.write(b.get(index.fid), 0, b"V")  # b takes over with "version two"
        own = [entry for entry in b.replog_tail if decode_one(entry.record).op is Op.OWN]
        first = own[0].seq
        # c gets the takeover but not yet its content (a connection cut in between).
        shipped_c = 0
        for entry in b.replog_tail:
            if entry.seq <= first:
                c.apply_remote("b", b.namespace, entry.seq, entry.base_version,
                               decode_one(entry.record), entry.record)
                shipped_c = entry.seq
        with pytest.raises(OSError) as waiting:
            c.write(c.get(index.fid), 0, b"would build on zeros")
        assert waiting.value.errno == errno.EAGAIN
        ship(b, c, shipped_c)
        assert content(c, b"alice", b"dovecot.index") == b"Version two"
        # c was only behind: the version it had is in b's takeover, so nothing was lost.
        assert c.losing_versions() == []
        assert c.ownership.fenced_changes == 0
    finally:
        for store in (a, b, c):
            store.close()


def test_a_directory_above_the_users_is_not_renamed_past_their_owners(tmp_path: Path) -> None:
    store = MetaStore(tmp_path / "a", 64 << 20, 1 << 30, 1.0, 1 << 20, node_id="a",
                      namespace=node_namespace("a"), replicating=True, ownership_depth=2)
    store.recover()
    try:
        store.create(b"example.com/alice", b"dovecot.index", 0o100600, 0, 0)
        with pytest.raises(OSError) as refused:
            store.check_rename_dir(b"example.com", b"example.org")
        assert refused.value.errno == errno.EXDEV
        store.check_rename_dir(b"example.com/alice", b"example.com/alice2")  # a user: fine
    finally:
        store.close()
