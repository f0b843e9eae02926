"""The MetaStore without the kernel: replay equals the live state, commits group, RAM bounds."""

from __future__ import annotations

import stat
from pathlib import Path

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailfs.cachemgr.metastore import CHUNK, MetaStore

MODE = stat.S_IFREG | 0o600


def open_store(path: Path, ram_budget: int = 64 << 20) -> MetaStore:
    store = MetaStore(path, ram_budget=ram_budget, map_size=256 << 20, commit_interval=1.0,
                      commit_bytes=1 << 30)
    store.recover()
    return store


def snapshot(store: MetaStore) -> dict[tuple[bytes, bytes], tuple[bytes, int, int]]:
    result = {}
    for dirpath, name, fid in store.all_files():
        stored = store.get(fid)
        result[(dirpath, name)] = (bytes(stored.content), stored.attrs.nlink, stored.attrs.mode)
    return result


names = st.sampled_from([b"dovecot.index", b"dovecot.index.log", b"dovecot-uidlist",
                         b"dovecot.index.log.2"])
dirs = st.sampled_from([b"", b"INBOX", b"INBOX/sub", b"Other"])
operations = st.lists(st.one_of(
    st.tuples(st.just("create"), dirs, names),
    st.tuples(st.just("write"), dirs, names, st.integers(0, 3 * CHUNK), st.binary(max_size=3000)),
    st.tuples(st.just("truncate"), dirs, names, st.integers(0, 2 * CHUNK)),
    st.tuples(st.just("rename"), dirs, names, dirs, names),
    st.tuples(st.just("link"), dirs, names, dirs, names),
    st.tuples(st.just("unlink"), dirs, names),
    st.tuples(st.just("rename_dir"), st.just(b"INBOX"), st.sampled_from([b"Moved", b"Other/x"])),
    st.tuples(st.just("commit")),
), max_size=40)


def run_ops(store: MetaStore, ops: list[tuple[object, ...]]) -> None:
    for op in ops:
        kind = op[0]
        if kind == "create":
            _, dirpath, name = op
            if store.lookup(dirpath, name) is None:  # type: ignore[arg-type]
                store.create(dirpath, name, MODE, 8, 8)  # type: ignore[arg-type]
        elif kind in ("write", "truncate"):
            fid = store.lookup(op[1], op[2])  # type: ignore[arg-type]
            if fid is None:
                continue
            stored = store.get(fid)
            if kind == "write":
                store.write(stored, op[3], op[4])  # type: ignore[arg-type]
            else:
                store.truncate(stored, op[3])  # type: ignore[arg-type]
        elif kind == "rename":
            if store.lookup(op[1], op[2]) is not None:  # type: ignore[arg-type]
                store.rename(op[1], op[2], op[3], op[4])  # type: ignore[arg-type]
        elif kind == "link":
            fid = store.lookup(op[1], op[2])  # type: ignore[arg-type]
            if fid is not None and store.lookup(op[3], op[4]) is None:  # type: ignore[arg-type]
                store.link(fid, op[3], op[4])  # type: ignore[arg-type]
        elif kind == "unlink":
            fid = store.lookup(op[1], op[2])  # type: ignore[arg-type]
            if fid is not None:
                store.unlink(op[1], op[2])  # type: ignore[arg-type]
                if store.get(fid).attrs.nlink == 0:
                    store.drop(fid)
        elif kind == "rename_dir":
            store.rename_dir(op[1], op[2])  # type: ignore[arg-type]
        else:
            store.commit_now()


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations)
def test_replay_after_crash_equals_live_state(tmp_path_factory, ops) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("store")
    store = open_store(path)
    run_ops(store, ops)
    live = snapshot(store)
    store.journal.close()
    store.env.close()  # a crash: nothing more is committed
    recovered = open_store(path)
    assert snapshot(recovered) == live
    recovered.commit_now()
    recovered.close()
    reopened = open_store(path)
    assert snapshot(reopened) == live
    assert reopened.journal.size() == 0
    reopened.close()


def test_commit_groups_and_sync(tmp_path: Path) -> None:
    store = open_store(tmp_path)

    async def main() -> None:
        stored = store.create(b"", b"dovecot.index.log", MODE, 0, 0)
        for i in range(500):
            store.write(stored, stored.size, b"%d," % i)
        commits_before = store.stats.commits
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(store.sync)
        assert store.stats.commits - commits_before <= 2
        assert store.committed_seq == store.journal.seq

    trio.run(main)
    store.close()


def test_eviction_keeps_ram_within_budget(tmp_path: Path) -> None:
    store = open_store(tmp_path, ram_budget=1 << 20)
    blobs = {}
    for i in range(40):
        stored = store.create(b"box%d" % i, b"dovecot.index.cache", MODE, 0, 0)
        blobs[stored.fid] = bytes([i]) * (100_000 + i)
        store.write(stored, 0, blobs[stored.fid])
    store.commit_now()
    store.evict()
    assert store.ram_bytes <= 1 << 20
    assert store.stats.evictions > 0
    for fid, blob in blobs.items():
        assert bytes(store.get(fid).content) == blob
    store.close()
