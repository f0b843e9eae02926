"""Applying a peer's change stream, without FUSE or sockets: MetaStores in temp dirs.

The origin ("a") makes random local changes; its change stream (`records_after`) reaches
the receiver ("b") through a simulated transport that disconnects, resends, reorders, and
whose receiver crashes without committing. However that goes, the receiver ends up with
the origin's replicated state and no conflicts. A receiver that changed a file itself
keeps its own content and reports the origin's later changes to that file as conflicts.
Snapshots install the origin's state exactly, and a damaged one changes nothing.
"""

from __future__ import annotations

import os
import random
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailfs.cachemgr.metastore import CHUNK, MetaStore, NeedSnapshot, SeqGap
from mailfs.cachemgr.records import Attrs, CorruptRecord, Op, Record, decode_one, encode
from mailfs.cachemgr.snapshot import install_snapshot, write_snapshot
from mailfs.replication.identity import node_namespace
from tests.rigs.stores import crash, open_node

MODE = stat.S_IFREG | 0o600
ORIGIN, RECEIVER = "a", "b"

State = dict[str, Any]


# --- stores ----------------------------------------------------------------------------------






@contextmanager
def temp_dir(base: Path) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(dir=base) as name:
        yield Path(name)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where the property tests' stores go: RAM if there is a tmpfs (every commit fsyncs,
    and these tests make thousands of them), else the usual temp dir."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        with tempfile.TemporaryDirectory(dir=shm, prefix="mailfs-apply-") as name:
            yield Path(name)
    else:
        yield tmp_path_factory.mktemp("apply")


def replicated_state(store: MetaStore) -> State:
    """Every name (and import marker), every orphan, and each file's content, attributes
    and version: everything replication is meant to make equal."""
    names = store._scan(b"names", b"")
    orphans = set(store._scan(b"orphans", b""))
    fids = {int.from_bytes(value, "big") for value in names.values() if value}
    fids |= {int.from_bytes(key, "big") for key in orphans}
    files = {}
    for fid in sorted(fids):
        stored = store.get(fid)
        files[fid] = (bytes(stored.content), stored.attrs.pack(), stored.version)
    return {"names": names, "orphans": orphans, "files": files}


def file_state(store: MetaStore, dirpath: bytes, name: bytes) -> tuple[bytes, int, int] | None:
    fid = store.lookup(dirpath, name)
    if fid is None:
        return None
    stored = store.get(fid)
    return bytes(stored.content), stored.attrs.size, stored.attrs.mode


# --- the origin's local operations --------------------------------------------------------------

names = st.sampled_from([b"dovecot.index", b"dovecot.index.log", b"dovecot-uidlist"])
dirs = st.sampled_from([b"", b"INBOX", b"INBOX/sub"])
local_ops = st.one_of(
    st.tuples(st.just("create"), dirs, names),
    st.tuples(st.just("put"), dirs, names, st.binary(max_size=2 * CHUNK + 10)),
    st.tuples(st.just("write"), dirs, names, st.integers(0, 3 * CHUNK),
              st.binary(max_size=3000)),
    st.tuples(st.just("truncate"), dirs, names, st.integers(0, 2 * CHUNK)),
    st.tuples(st.just("setattr"), dirs, names, st.sampled_from([0o600, 0o640, 0o644])),
    st.tuples(st.just("link"), dirs, names, dirs, names),
    st.tuples(st.just("unlink"), dirs, names),
    st.tuples(st.just("rename"), dirs, names, dirs, names),
    st.tuples(st.just("rename_dir"), st.sampled_from([b"INBOX", b"Moved"]),
              st.sampled_from([b"Moved", b"Other/x", b"INBOX"])),
    st.tuples(st.just("mark_imported"), dirs),
    st.tuples(st.just("commit")),
)


def release_if_orphan(store: MetaStore, fid: int | None) -> None:
    """What the file system does when a file's last name goes and nobody has it open."""
    if fid is None:
        return
    try:
        stored = store.get(fid)
    except FileNotFoundError:
        return
    if stored.attrs.nlink == 0:
        store.drop(fid)


def run_local(store: MetaStore, op: tuple[Any, ...]) -> None:
    kind = op[0]
    if kind == "create":
        _, dirpath, name = op
        if store.lookup(dirpath, name) is None:
            store.create(dirpath, name, MODE, 8, 8)
    elif kind == "put":
        _, dirpath, name, content = op
        replaced = store.lookup(dirpath, name)
        store.put(dirpath, name, Attrs(MODE, 8, 8, 1, len(content), 1, 2, 3), content)
        release_if_orphan(store, replaced)
    elif kind in ("write", "truncate", "setattr"):
        fid = store.lookup(op[1], op[2])
        if fid is None:
            return
        stored = store.get(fid)
        if kind == "write":
            store.write(stored, op[3], op[4])
        elif kind == "truncate":
            store.truncate(stored, op[3])
        else:
            attrs = stored.attrs.copy()
            attrs.mode = stat.S_IFREG | op[3]
            store.set_attrs(stored, attrs)
    elif kind == "link":
        fid = store.lookup(op[1], op[2])
        if fid is not None and store.lookup(op[3], op[4]) is None:
            store.link(fid, op[3], op[4])
    elif kind == "unlink":
        fid = store.lookup(op[1], op[2])
        if fid is not None:
            store.unlink(op[1], op[2])
            release_if_orphan(store, fid)
    elif kind == "rename":
        if store.lookup(op[1], op[2]) is not None:
            replaced = store.lookup(op[3], op[4])
            store.rename(op[1], op[2], op[3], op[4])
            if replaced != store.lookup(op[3], op[4]):
                release_if_orphan(store, replaced)
    elif kind == "rename_dir":
        if op[1] != op[2]:
            store.rename_dir(op[1], op[2])
    elif kind == "mark_imported":
        if not store.is_imported(op[1]):
            store.mark_imported(op[1])
    else:
        store.commit_now()


def random_local_ops(rng: random.Random, count: int) -> list[tuple[Any, ...]]:
    """The same kinds of operations as `local_ops`, from a seeded generator."""
    dir_list = [b"", b"INBOX", b"INBOX/sub", b"Other"]
    name_list = [b"dovecot.index", b"dovecot.index.log", b"dovecot-uidlist"]
    ops: list[tuple[Any, ...]] = []
    for _ in range(count):
        d, n = rng.choice(dir_list), rng.choice(name_list)
        d2, n2 = rng.choice(dir_list), rng.choice(name_list)
        ops.append(rng.choice([
            ("create", d, n), ("create", d, n),
            ("put", d, n, rng.randbytes(rng.randrange(3 * CHUNK))),
            ("write", d, n, rng.randrange(2 * CHUNK), rng.randbytes(rng.randrange(3000))),
            ("write", d, n, rng.randrange(2 * CHUNK), rng.randbytes(rng.randrange(3000))),
            ("truncate", d, n, rng.randrange(2 * CHUNK)),
            ("setattr", d, n, rng.choice([0o600, 0o644])),
            ("link", d, n, d2, n2), ("unlink", d, n), ("rename", d, n, d2, n2),
            ("rename_dir", b"INBOX", b"Moved"), ("mark_imported", d), ("commit",),
        ]))
    return ops


# --- the transport ----------------------------------------------------------------------------


class Link:
    """The origin's stream to the receiver, applied the way receiver.py applies it."""

    def __init__(self, origin: MetaStore, receiver: MetaStore) -> None:
        self.origin = origin
        self.receiver = receiver
        self.position: int | None = None  # None: not connected
        self.conflicts: list[str] = []
        self.connections = 0

    def connect(self) -> int:
        """A new connection resumes after what the receiver has committed (its Welcome)."""
        if self.position is None:
            self.position = self.receiver.committed_applied.get(self.origin.node_id, 0)
            self.connections += 1
        return self.position

    def disconnect(self) -> None:
        self.position = None

    def pending(self, max_bytes: int) -> list[Any]:
        try:
            return self.origin.records_after(self.connect(), max_bytes)
        except NeedSnapshot as exc:  # pragma: no cover - a failure of the test's premise
            raise AssertionError(f"the origin trimmed changes the receiver lacks: {exc}"
                                 ) from exc

    def apply(self, entry: Any) -> str | None:
        record = decode_one(entry.record)
        assert record.seq == entry.seq
        origin = self.origin.node_id
        return self.receiver.apply_remote(origin, node_namespace(origin), entry.seq,
                                          entry.base_version, record)

    def deliver(self, count: int, max_bytes: int) -> None:
        for entry in self.pending(max_bytes)[:count]:
            conflict = self.apply(entry)
            if conflict is not None:
                self.conflicts.append(conflict)
            self.position = entry.seq

    def drain(self) -> None:
        self.disconnect()
        while entries := self.pending(1 << 20):
            self.deliver(len(entries), 1 << 20)

    def reorder(self) -> None:
        """Changes swap places in transit: one from further on arrives before the one the
        receiver expects next. It is refused with SeqGap and changes nothing, and the
        connection is dropped (the receiver closes it)."""
        applied = self.receiver.applied.get(self.origin.node_id, 0)
        ahead = [e for e in self.pending(1 << 20) if e.seq > applied + 1]
        if not ahead:
            return
        before = replicated_state(self.receiver)
        with pytest.raises(SeqGap):
            self.apply(ahead[0])
        assert self.receiver.applied.get(self.origin.node_id, 0) == applied
        assert replicated_state(self.receiver) == before
        self.disconnect()

    def duplicate(self) -> None:
        """An already applied change arrives again: ignored, nothing changes."""
        applied = self.receiver.applied.get(self.origin.node_id, 0)
        if applied == 0:
            return
        try:
            entries = self.origin.records_after(applied - 1, 1)
        except NeedSnapshot:
            return  # trimmed from the origin's log: cannot be resent anyway
        if not entries:
            return
        before = replicated_state(self.receiver)
        assert self.apply(entries[0]) is None
        assert replicated_state(self.receiver) == before
        assert self.receiver.applied.get(self.origin.node_id, 0) == applied


deliveries = st.tuples(st.just("deliver"), st.integers(1, 8),
                       st.sampled_from([1, 500, 1 << 20]))
transport_events = st.one_of(
    deliveries,
    st.tuples(st.just("disconnect")),
    st.tuples(st.just("reorder")),
    st.tuples(st.just("duplicate")),
    st.tuples(st.just("receiver_commit")),
    st.tuples(st.just("receiver_crash")),
    st.tuples(st.just("origin_crash")),
    st.tuples(st.just("ack")),
)


# one_of() flattens nested one_of()s into one list of equally likely branches; mapped, each
# of these counts as one branch: half the steps are local changes, a quarter deliveries.
local_steps = local_ops.map(tuple)
other_events = transport_events.map(tuple)


def run_event(event: tuple[Any, ...], link: Link, origin_dir: Path, receiver_dir: Path
              ) -> None:
    kind = event[0]
    if kind == "deliver":
        link.deliver(event[1], event[2])
    elif kind == "disconnect":
        link.disconnect()
    elif kind == "reorder":
        link.reorder()
    elif kind == "duplicate":
        link.duplicate()
    elif kind == "receiver_commit":
        link.receiver.commit_now()
    elif kind == "receiver_crash":
        crash(link.receiver)
        link.receiver = open_node(receiver_dir, RECEIVER)
        link.disconnect()
    elif kind == "origin_crash":
        crash(link.origin)
        link.origin = open_node(origin_dir, ORIGIN)
        link.disconnect()
    elif kind == "ack":
        # The receiver acknowledges what it has committed; the origin may trim its log.
        link.origin.acknowledged_by_all(link.receiver.committed_applied.get(ORIGIN, 0))


# --- property 1: the receiver converges on the origin's state -----------------------------------


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(st.one_of(local_steps, local_steps, deliveries, other_events),
                min_size=20, max_size=150))
def test_receiver_converges_despite_transport_faults(base: Path, steps: list[tuple[Any, ...]]
                                                     ) -> None:
    with temp_dir(base) as origin_dir, temp_dir(base) as receiver_dir:
        link = Link(open_node(origin_dir, ORIGIN), open_node(receiver_dir, RECEIVER))
        try:
            for step in steps:
                if step[0] in {"deliver", "disconnect", "reorder", "duplicate",
                               "receiver_commit", "receiver_crash", "origin_crash", "ack"}:
                    run_event(step, link, origin_dir, receiver_dir)
                else:
                    run_local(link.origin, step)
            link.drain()
            expected = replicated_state(link.origin)
            assert replicated_state(link.receiver) == expected
            assert link.conflicts == []
            assert link.receiver.stats.conflicts == 0
            assert link.receiver.applied.get(ORIGIN, 0) == link.origin.journal.seq
            # What the receiver acknowledges is what survives its crash.
            link.receiver.commit_now()
            crash(link.receiver)
            link.receiver = open_node(receiver_dir, RECEIVER)
            assert link.receiver.committed_applied.get(ORIGIN, 0) == link.origin.journal.seq
            assert replicated_state(link.receiver) == expected
        finally:
            link.origin.close()
            link.receiver.close()


# --- property 2: a local change on the receiver is never overwritten ----------------------------

origin_changes = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, 2 * CHUNK), st.binary(min_size=1,
                                                                     max_size=2000)),
    st.tuples(st.just("truncate"), st.integers(0, 2 * CHUNK)),
    st.tuples(st.just("setattr"), st.sampled_from([0o600, 0o640, 0o644])),
    st.tuples(st.just("link"), st.sampled_from([b"dovecot.index", b"dovecot-uidlist"])),
), min_size=1, max_size=5)
receiver_change = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 2 * CHUNK), st.binary(min_size=1,
                                                                     max_size=2000)),
    st.tuples(st.just("truncate"), st.integers(0, 2 * CHUNK)),
    st.tuples(st.just("setattr"), st.sampled_from([0o400, 0o660])),
)


def change_file(store: MetaStore, dirpath: bytes, name: bytes, change: tuple[Any, ...]
                ) -> None:
    stored = store.get(store.lookup(dirpath, name))  # type: ignore[arg-type]
    if change[0] == "link":
        if store.lookup(dirpath, change[1]) is None:
            store.link(stored.fid, dirpath, change[1])
        else:  # already linked: change the content instead
            store.write(stored, 0, b"relinked")
    else:
        run_local(store, (change[0], dirpath, name, *change[1:]))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(initial=st.binary(max_size=3000), local=receiver_change, later=origin_changes,
       commit_after_local=st.booleans(), crash_after_local=st.booleans(),
       delivered_at_once=st.booleans())
def test_local_change_on_the_receiver_is_never_overwritten(
        base: Path, initial: bytes, local: tuple[Any, ...], later: list[tuple[Any, ...]],
        commit_after_local: bool, crash_after_local: bool, delivered_at_once: bool) -> None:
    with temp_dir(base) as origin_dir, temp_dir(base) as receiver_dir:
        link = Link(open_node(origin_dir, ORIGIN), open_node(receiver_dir, RECEIVER))
        try:
            dirpath, name = b"INBOX", b"dovecot.index.log"
            stored = link.origin.create(dirpath, name, MODE, 8, 8)
            link.origin.write(stored, 0, initial)
            other = link.origin.create(b"", b"dovecot-uidlist", MODE, 8, 8)
            link.drain()
            assert file_state(link.receiver, dirpath, name) == file_state(
                link.origin, dirpath, name)

            # The receiver changes the file itself (after its copy was committed, so a
            # crash replays the local change onto it).
            link.receiver.commit_now()
            change_file(link.receiver, dirpath, name, local)
            mine = file_state(link.receiver, dirpath, name)
            if commit_after_local:
                link.receiver.commit_now()
            if crash_after_local:
                crash(link.receiver)
                link.receiver = open_node(receiver_dir, RECEIVER)
                link.disconnect()
                assert file_state(link.receiver, dirpath, name) == mine

            # Meanwhile the origin changed the same file, and another one.
            for change in later:
                change_file(link.origin, dirpath, name, change)
            link.origin.write(link.origin.get(other.fid), 0, b"not in conflict")
            if delivered_at_once:
                link.drain()
            else:
                for _ in range(len(later) + 1):
                    link.deliver(1, 1 << 20)
                link.drain()

            # Every change of the origin to that file is a conflict, reported, not applied.
            assert len(link.conflicts) == len(later), link.conflicts
            assert all(isinstance(c, str) and c for c in link.conflicts)
            assert link.receiver.stats.conflicts == len(later)
            assert file_state(link.receiver, dirpath, name) == mine
            # A link the origin made to the file is a change to it too: not made here.
            for change in later:
                if change[0] == "link" and change[1] != name:
                    assert file_state(link.receiver, dirpath, change[1]) is None
            # Changes to other files still apply, and the stream has moved past all of it.
            assert bytes(link.receiver.get(other.fid).content) == b"not in conflict"
            assert link.receiver.applied[ORIGIN] == link.origin.journal.seq
        finally:
            link.origin.close()
            link.receiver.close()


def test_local_write_to_an_uncommitted_remote_file_survives_a_crash(tmp_path: Path) -> None:
    """The receiver writes to a file its peer created moments ago, and crashes before its
    next commit: its own WRITE is in its journal, the peer's CREATE is not (it was never
    committed; the peer resends it after the restart). Recovery must not fail, and the
    local write must not be lost."""
    origin = open_node(tmp_path / "origin", ORIGIN)
    receiver = open_node(tmp_path / "receiver", RECEIVER)
    link = Link(origin, receiver)
    try:
        stored = origin.create(b"INBOX", b"dovecot.index.log", MODE, 8, 8)
        origin.write(stored, 0, b"from the origin")
        link.drain()  # applied on the receiver, not committed there
        receiver.write(receiver.get(stored.fid), 0, b"local")
        crash(receiver)
        try:
            link.receiver = open_node(tmp_path / "receiver", RECEIVER)
        except FileNotFoundError as exc:
            link.receiver = None  # type: ignore[assignment]
            pytest.fail(f"the receiver cannot recover after a crash: {exc!r}")
        link.drain()
        state = file_state(link.receiver, b"INBOX", b"dovecot.index.log")
        assert state is not None and state[0].startswith(b"local"), state
    finally:
        origin.close()
        if link.receiver is not None:
            link.receiver.close()


def test_local_rename_of_an_uncommitted_remote_file_survives_a_crash(tmp_path: Path) -> None:
    """As above with a rename (Dovecot renames index files all the time): after the crash
    both nodes must still agree on the file's name."""
    a = open_node(tmp_path / "a", "a")
    b = open_node(tmp_path / "b", "b")
    a_to_b, b_to_a = Link(a, b), Link(b, a)
    try:
        stored = a.create(b"INBOX", b"dovecot.index.log", MODE, 8, 8)
        a.write(stored, 0, b"log")
        a_to_b.drain()  # applied on b, not committed there
        b.rename(b"INBOX", b"dovecot.index.log", b"INBOX", b"dovecot.index.log.2")
        crash(b)
        a_to_b.receiver = b_to_a.origin = b = open_node(tmp_path / "b", "b")
        a_to_b.drain()
        b_to_a.drain()
        names_a, names_b = a.all_names(), b.all_names()
        assert names_a == names_b, f"a has {sorted(names_a)}, b has {sorted(names_b)}"
        assert replicated_state(a)["files"] == replicated_state(b)["files"]
    finally:
        a.close()
        b.close()


# --- snapshots --------------------------------------------------------------------------------


async def install(receiver: MetaStore, path: Path, origin_seqs: dict[str, int]) -> None:
    await receiver.replace_state(partial(install_snapshot, receiver, path, origin_seqs),
                                 origin_seqs)


def snapshot_of(origin: MetaStore, path: Path) -> dict[str, int]:
    with open(path, "wb") as out:
        return write_snapshot(origin, out)


@pytest.mark.parametrize("seed", range(8))
async def test_snapshot_installs_the_origins_state(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    origin = open_node(tmp_path / "origin", ORIGIN)
    receiver = open_node(tmp_path / "receiver", RECEIVER)
    link = Link(origin, receiver)
    try:
        for op in random_local_ops(rng, 40):
            run_local(origin, op)
        # The receiver has an older part of the stream (some of it committed) ...
        link.deliver(rng.randrange(1, 20), 1 << 20)
        receiver.commit_now()
        link.deliver(rng.randrange(1, 5), 1 << 20)
        # ... when the origin's log no longer has what the receiver lacks, and the
        # origin sends it a snapshot of its last commit instead.
        for op in random_local_ops(rng, 40):
            run_local(origin, op)
        origin.commit_now()
        origin.acknowledged_by_all(origin.committed_seq)
        origin.commit_now()  # trims the log
        if receiver.committed_applied.get(ORIGIN, 0) < origin.committed_seq:
            with pytest.raises(NeedSnapshot):
                origin.records_after(receiver.committed_applied.get(ORIGIN, 0), 1 << 20)
        path = tmp_path / "snapshot"
        origin_seqs = snapshot_of(origin, path)
        assert origin_seqs == {ORIGIN: origin.committed_seq}
        for op in random_local_ops(rng, 10):  # made after the snapshot: streamed after it
            run_local(origin, op)
        await install(receiver, path, origin_seqs)
        assert receiver.committed_applied == {ORIGIN: origin_seqs[ORIGIN]}
        assert receiver.applied == {ORIGIN: origin_seqs[ORIGIN]}
        link.disconnect()
        assert link.connect() == origin_seqs[ORIGIN]
        link.drain()
        assert replicated_state(receiver) == replicated_state(origin)
        assert link.conflicts == []
        # The installed state is what LMDB holds: it survives a crash.
        receiver.commit_now()
        crash(receiver)
        link.receiver = receiver = open_node(tmp_path / "receiver", RECEIVER)
        assert replicated_state(receiver) == replicated_state(origin)
        assert receiver.committed_applied == {ORIGIN: origin.journal.seq}
    finally:
        origin.close()
        link.receiver.close()


def _flip_middle(data: bytes) -> bytes:
    damaged = bytearray(data)
    damaged[len(damaged) // 2] ^= 0x10
    return bytes(damaged)


def _cut(data: bytes) -> bytes:
    return data[:len(data) - 7]


def _wrong_record(data: bytes) -> bytes:
    # A journal record (well formed, valid checksum) where only snapshot records belong.
    return data + encode(Record(1, Op.DROP, (1,)))


@pytest.mark.parametrize("damage", [_flip_middle, _cut, _wrong_record],
                         ids=["flipped-bit", "truncated", "journal-record"])
async def test_damaged_snapshot_changes_nothing(tmp_path: Path, damage: Any) -> None:
    rng = random.Random(5)
    origin = open_node(tmp_path / "origin", ORIGIN)
    receiver = open_node(tmp_path / "receiver", RECEIVER)
    link = Link(origin, receiver)
    try:
        for op in random_local_ops(rng, 30):
            run_local(origin, op)
        origin.write(origin.create(b"", b"dovecot.index", MODE, 8, 8), 0, b"x" * 5000)
        link.deliver(10, 1 << 20)
        receiver.commit_now()
        link.deliver(3, 1 << 20)  # and some not committed yet
        for op in random_local_ops(rng, 30):
            run_local(origin, op)
        origin.commit_now()
        path = tmp_path / "snapshot"
        origin_seqs = snapshot_of(origin, path)
        path.write_bytes(damage(path.read_bytes()))
        before = replicated_state(receiver)
        applied_before = dict(receiver.applied)
        with pytest.raises(CorruptRecord):
            await install(receiver, path, origin_seqs)
        assert replicated_state(receiver) == before
        assert receiver.applied == applied_before
        assert receiver.committed_applied == applied_before  # replace_state committed first
        assert not receiver.installing
        # The old state is in LMDB, too, and the stream continues where it was.
        crash(receiver)
        link.receiver = receiver = open_node(tmp_path / "receiver", RECEIVER)
        assert replicated_state(receiver) == before
        link.drain()
        assert replicated_state(receiver) == replicated_state(origin)
        assert link.conflicts == []
    finally:
        origin.close()
        link.receiver.close()
