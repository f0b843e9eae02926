"""The replicated-file store: RAM over LMDB, with a write-ahead journal and group commit.

Every mutation is one journal record (see records.py). The public methods append the
record first and then apply it, and replay after a crash applies the same records through
the same `_apply_*` methods, so the running state and the recovered state cannot differ.

LMDB layout (named databases):
    files    fid(u64 BE)                  -> packed Attrs + u64 version
    chunks   fid(u64 BE) + index(u32 BE)  -> up to CHUNK bytes of content
    names    dirpath + b"\\0" + name       -> fid(u64 BE); the empty name is the
                                             "this directory was imported" marker
    orphans  fid(u64 BE)                  -> b"" for files with nlink 0 still open
    replog   seq(u64 BE)                  -> u64 base version + encoded record: this
                                             node's own changes, kept for peers until
                                             every peer has acknowledged them
    owners   user dirpath                 -> packed ownership.Owner (its node and epoch)
    conflicts u64 BE time + fid + user     -> a losing version kept for the admin
                                             (ownership.LosingVersion), local to this node
    meta     b"seq", b"next_fid", b"epoch", b"replog_bytes", b"running" -> u64;
             b"boot_id" -> the machine's boot id at mount (machine-crash detection);
             b"applied:" + origin node id -> u64, the last seq of that origin applied here

Peers' changes are applied through `apply_remote`, journaled here as REMOTE records (they
take no seq of this node), so replay keeps their order among local changes.

Files carry a version: the (origin namespace, seq) of the change that last produced their
content or attributes (see replication/identity.py). A change streamed to a peer names
the version it was made against, so a peer whose copy moved on meanwhile notices.

Atomicity note: everything from a journal append to the end of its `_apply_*` runs on
the trio thread without an await, so no other request can observe a half-applied
change. Placing an `await` inside any public mutator breaks that; don't.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import logging
import mmap
import os
import stat
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import lmdb
import trio

from mailfs.cachemgr.journal import Journal
from mailfs.cachemgr.ownership import (
    DATA_PIECE,
    FID_OPS,
    UNOWNED_OPS,
    LosingVersion,
    ManifestEntry,
    Owner,
    OwnershipStats,
    content_digest,
    pack_manifest,
    pack_seq_map,
    record_dirpaths,
    unpack_manifest,
    unpack_seq_map,
    user_of,
)
from mailfs.cachemgr.records import (
    ATTRS,
    MAX_KEY,
    Attrs,
    Field,
    Op,
    Record,
    decode_one,
    encode,
    key_problem,
    skipped_through,
)
from mailfs.replication.identity import (
    fid_namespace,
    make_fid,
    make_version,
    node_namespace,
    version_parts,
)

log = logging.getLogger(__name__)

# One LMDB overflow page holds 4096 - 16 bytes: a commit rewrites only the pages that changed,
# so an append to a transaction log costs one page, not a large chunk.
CHUNK = 4096 - 16
FID = struct.Struct(">Q")
CHUNK_KEY = struct.Struct(">QI")
U64 = struct.Struct("<Q")
SEP = b"\0"
IMPORTED = b""
APPLIED_PREFIX = b"applied:"
AWAITING_PREFIX = b"awaiting:"  # + fid: bytes a takeover still owes that file
# Index files are megabytes; a write or truncate beyond this is refused (EFBIG locally, a
# refused connection for a peer), so nobody can make the daemon allocate without bound.
MAX_FILE_SIZE = 1 << 30
# Below this much free space (beyond the batch's data) an LMDB commit is not tried.
COMMIT_HEADROOM = 1 << 20
# A file's blocks on a real disk: a write or truncate within them needs no new space.
DISK_BLOCK = 4096
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
# Larger than any journal tail a machine crash can take with it.
SEQ_JUMP_AFTER_CRASH = 1 << 24
REPLOG_ENTRY = struct.Struct("<Q")  # base version, before the encoded record
# A takeover's manifest travels in one record, which must fit a replication frame (16 MiB).
MAX_MANIFEST_BYTES = 12 << 20
DROPPED_USERS_KEPT = 100_000
MAX_LOSING_VERSIONS = 10_000  # the oldest go beyond this (logged)
# Ops whose first field is the file they change: these carry and produce versions.
VERSIONED_OPS = frozenset({Op.WRITE, Op.TRUNCATE, Op.SETATTR, Op.LINK})
CREATING_OPS = frozenset({Op.CREATE, Op.PUT})

Overlay = dict[tuple[bytes, bytes], bytes | None]


def _blocks_end(size: int) -> int:
    return -(-size // DISK_BLOCK) * DISK_BLOCK


def name_key(dirpath: bytes, name: bytes) -> bytes:
    return dirpath + SEP + name


def next_seq(entry: LogEntry) -> int:
    """The seq of the change that follows `entry` in the log."""
    return max(entry.seq, skipped_through(entry.record) or 0) + 1


def boot_id() -> bytes:
    try:
        with open(BOOT_ID_PATH, "rb") as source:
            return source.read().strip()
    except OSError:
        return b""


def size_problem(record: Record) -> str | None:
    """Why a peer's change would grow a file beyond MAX_FILE_SIZE, or None."""
    f = record.fields
    if record.op is Op.WRITE:
        end = f[1] + len(f[3])  # type: ignore[operator,arg-type]
    elif record.op is Op.TRUNCATE:
        end = f[1]  # type: ignore[assignment]
    elif record.op is Op.PUT:
        end = len(f[4])  # type: ignore[arg-type]
    elif record.op is Op.OWN_DATA:
        end = f[2] + len(f[3])  # type: ignore[operator,arg-type]
    else:
        return None
    if end > MAX_FILE_SIZE:
        return f"{record.op.name} to {end} bytes exceeds the {MAX_FILE_SIZE}-byte limit"
    return None


def pack_file(attrs: Attrs, version: int) -> bytes:
    return attrs.pack() + U64.pack(version)


def unpack_file(raw: bytes | memoryview) -> tuple[Attrs, int]:
    """Attributes and version of a stored file (stores from before versions have none)."""
    attrs = Attrs.unpack(raw[:ATTRS.size])
    version = int(U64.unpack(raw[ATTRS.size:])[0]) if len(raw) > ATTRS.size else 0
    return attrs, version


FID_MARK = "fid-mark"


class FidMark:
    """The next fid this node may hand out, in a shared memory map of a state file.

    Why: fids reserved for lock files are not journaled, yet the kernel may still know the
    inode numbers derived from them when a restarted daemon adopts the crashed one's FUSE
    connection; reusing one would show the kernel two files as one. A store to the map
    costs no system call, and the page cache keeps it across a daemon crash (a machine
    crash ends every connection anyway).
    """

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < U64.size:
                os.ftruncate(fd, U64.size)
            self._map = mmap.mmap(fd, U64.size)
        finally:
            os.close(fd)

    @property
    def value(self) -> int:
        return int(U64.unpack_from(self._map)[0])

    def raise_to(self, value: int) -> None:
        U64.pack_into(self._map, 0, value)

    def close(self) -> None:
        self._map.close()


def nchunks(size: int) -> int:
    return (size + CHUNK - 1) // CHUNK


@dataclass(eq=False)
class StoredFile:
    fid: int
    attrs: Attrs
    content: bytearray
    committed_size: int = 0
    dirty_chunks: set[int] = field(default_factory=set)
    attrs_dirty: bool = False
    opens: int = 0
    version: int = 0

    @property
    def size(self) -> int:
        return len(self.content)


@dataclass
class StoreStats:
    commits: int = 0
    commit_seconds: float = 0.0
    commit_errors: int = 0
    last_commit_error: str = ""
    replayed_records: int = 0
    ram_hits: int = 0
    ram_misses: int = 0
    evictions: int = 0
    journal_errors: int = 0
    journal_fsyncs: int = 0  # fsyncs made durable by the journal while LMDB had no room
    remote_applied: int = 0
    conflicts: int = 0
    last_conflict: str = ""


@dataclass(slots=True)
class LogEntry:
    """One of this node's changes as peers receive it."""

    seq: int
    base_version: int
    record: bytes


class NeedSnapshot(Exception):
    """The changes a peer needs are no longer in the replication log."""


class SnapshotStale(Exception):
    """A snapshot lacking own changes that the log no longer has: installing it loses them."""


class SeqGap(Exception):
    """A peer's change does not follow the last one applied from its origin."""


def lmdb_errno(exc: lmdb.Error) -> int:
    if isinstance(exc, lmdb.MapFullError):
        return errno.ENOSPC
    text = str(exc).lower()
    if "no space" in text or "disk full" in text or "quota" in text:
        return errno.ENOSPC
    return errno.EIO


class MetaStore:
    def __init__(
        self,
        state_dir: Path,
        ram_budget: int,
        map_size: int,
        commit_interval: float,
        commit_bytes: int,
        node_id: str = "",
        namespace: int = 0,
        replicating: bool = False,
        log_limit: int = 256 << 20,
        dirs_stored: bool = False,
        ownership_depth: int = 0,
    ) -> None:
        self.state_dir = state_dir
        # Index-only mounts keep directories here too; their times follow their entries.
        self.dirs_stored = dirs_stored
        self.node_id = node_id
        self.namespace = namespace
        # Without peers there is nobody to keep a replication log for.
        self.replicating = replicating
        self.log_limit = log_limit
        self.ram_budget = ram_budget
        self.commit_interval = commit_interval
        self.commit_bytes = commit_bytes
        (state_dir / "lmdb").mkdir(parents=True, exist_ok=True)
        # sync=True on every commit: LMDB must never be left corrupt by a machine crash,
        # and group commit already keeps the number of fsyncs low.
        self.env = lmdb.open(
            str(state_dir / "lmdb"), map_size=map_size, max_dbs=16, sync=True,
            metasync=True, readahead=False, lock=True,
        )
        self.db_files = self.env.open_db(b"files")
        self.db_chunks = self.env.open_db(b"chunks")
        self.db_names = self.env.open_db(b"names")
        self.db_orphans = self.env.open_db(b"orphans")
        self.db_meta = self.env.open_db(b"meta")
        self.db_replog = self.env.open_db(b"replog")
        self.db_owners = self.env.open_db(b"owners")
        self.db_conflicts = self.env.open_db(b"conflicts")
        self.dbs = {
            b"names": self.db_names, b"orphans": self.db_orphans, b"meta": self.db_meta,
            b"owners": self.db_owners, b"conflicts": self.db_conflicts,
        }
        # Ownership of user directories (ownership.py); 0: off (no peers, or configured).
        self.ownership_depth = ownership_depth if replicating else 0
        self.owners: dict[bytes, Owner] = {}
        self.fid_users: dict[int, bytes] = {}  # which user directory each file is in
        # ...and each recently dropped one: a peer's late write to a file the owner has
        # deleted meanwhile must still be fenced, not taken for a conflict.
        self.dropped_users: OrderedDict[int, bytes] = OrderedDict()
        # Files a takeover replaced whose content has not all arrived yet: bytes missing.
        # (Only after a crash or a refused connection in the middle of one.)
        self.awaiting: dict[int, int] = {}
        self.ownership = OwnershipStats()
        # Set by replication: why this node may not write now (the consistency policy
        # without a majority), or None.
        self.write_refusal: Callable[[], str | None] = lambda: None
        self._refusal_logged = -1e9
        self._fence_logged = -1e9
        self.reapplying = False  # own changes re-applied over a snapshot (_reapply_logged)
        self.losing_count = 0
        self.pending: Overlay = {}
        self.committing: Overlay = {}
        self.files: OrderedDict[int, StoredFile] = OrderedDict()
        self.ram_bytes = 0
        self.dirty_fids: set[int] = set()
        self.committing_fids: set[int] = set()
        self.drops: set[int] = set()  # files whose record and chunks go at the next commit
        self.committing_drops: set[int] = set()
        self.newly_orphaned: list[int] = []  # files that lost their last name (peers' changes)
        self.stats = StoreStats()
        self.journal = Journal(state_dir)
        self._commit_lock = trio.Lock()
        self._journal_error_logged = -1e9
        self._commit_error_logged = -1e9
        self._wake = trio.Event()
        # Replication log entries not yet in LMDB (pending or being committed), in order.
        self.replog_tail: list[LogEntry] = []
        self.replog_trim_through = 0
        self.installing = False
        self.install_done = trio.Event()  # replaced at each install, set when it ends
        self.install_done.set()
        self.committed = trio.Event()  # set and replaced after every commit
        # Whether the file system still refers to a file (a peer's DROP must wait then).
        self.in_use: Callable[[int], bool] = lambda fid: False
        # Called with the seq of each own change, after it is applied.
        self.on_local_change: Callable[[int], None] = lambda seq: None
        with self.env.begin() as txn:
            self.committed_seq = self._meta_int(txn, b"seq")
            next_fid = self._meta_int(txn, b"next_fid")
            self.epoch = self._meta_int(txn, b"epoch") + 1
            self.replog_bytes = self._meta_int(txn, b"replog_bytes")
            self.replog_first = self._first_logged(txn)
            self.committed_applied = self._read_applied(txn)
        self._load_ownership()
        if next_fid == 0 or fid_namespace(next_fid) != namespace:
            # A new namespace (first start, or replication turned on): count from 1 in it.
            next_fid = make_fid(namespace, 1)
        self.fid_mark = FidMark(state_dir / FID_MARK)
        self.next_fid = self._past_reserved(next_fid)
        self.applied = dict(self.committed_applied)

    # ---------------------------------------------------------------- startup / shutdown

    def recover(self, keep_orphans: bool = False) -> int:
        """Replay the journal over LMDB, drop orphans, commit. Returns records replayed.

        `keep_orphans`: a daemon that adopts its predecessor's FUSE connection keeps them,
        for the processes that still have them open (they are dropped at the next mount
        that starts afresh)."""
        for leftover in self.state_dir.glob("snapshot-*.tmp"):
            leftover.unlink(missing_ok=True)  # a transfer cut off by a crash
        machine_crashed = self._machine_crashed()
        start = self._reapply_logged(self.committed_seq)
        replayed = start - self.committed_seq
        for record in self.journal.replay(start):
            if record.op is Op.REMOTE:
                self._replay_remote(record)
            else:
                try:
                    self._apply_own(record, encode(record))
                except FileNotFoundError as exc:
                    # Live, a peer's change left this file alone because it was open here;
                    # at replay nothing is open and it is gone.
                    self.stats.conflicts += 1
                    self.stats.last_conflict = f"own change {record.seq} not replayed: {exc}"
                    log.error("CONFLICT: own change %d not replayed: %s", record.seq, exc)
            replayed += 1
        self.stats.replayed_records = replayed
        if not keep_orphans:
            for fid in self._orphans():
                self._apply_drop(fid)
        own_seq = max(self.journal.seq, start)
        self.journal.start(own_seq)
        if machine_crashed and self.replicating:
            # The journal is not fsync'd: its tail may be gone, while peers may have
            # received it. New changes must never reuse those seqs; a peer that has some
            # of them gets a snapshot.
            log.warning("this machine crashed while mailfs was mounted: own change seqs "
                        "continue after %d instead of %d", own_seq + SEQ_JUMP_AFTER_CRASH,
                        own_seq)
            self.skip_to(own_seq + SEQ_JUMP_AFTER_CRASH)
        self._set(b"meta", b"epoch", U64.pack(self.epoch))
        self._set(b"meta", b"running", U64.pack(1))
        self._set(b"meta", b"boot_id", boot_id())
        self.commit_now()
        # LMDB now holds everything replay could trust. Older journal files go, including
        # one that replay stopped in: left there, it would stop every later replay early.
        self.journal.remove_through(self.journal.generation - 1)
        self.journal.ensure_reserve()
        if replayed:
            log.info("recovered %d journal records after an unclean stop", replayed)
        return replayed

    def _machine_crashed(self) -> bool:
        """Whether the last mount ended with this machine going down (another boot id
        while the mount was still marked running), not just with the daemon dying."""
        with self.env.begin(db=self.db_meta) as txn:
            running = txn.get(b"running")
            booted = txn.get(b"boot_id")
        if running is None or booted is None or not U64.unpack(running)[0]:
            return False
        return bytes(booted) != boot_id()

    def mark_stopped(self) -> None:
        """Record a clean stop (goes into the final commit)."""
        self._set(b"meta", b"running", U64.pack(0))

    def _reapply_logged(self, after: int) -> int:
        """Apply own changes from the replication log beyond `after`; returns the last seq.

        Only a snapshot install leaves any (see replace_state): every other commit writes
        a change to the log and the seq that covers it in one transaction.
        """
        last = after
        if not self.replicating:
            return last
        self.reapplying = True
        try:
            return self._reapply_entries(after)
        finally:
            self.reapplying = False

    def _reapply_entries(self, after: int) -> int:
        last = after
        with self.env.begin(db=self.db_replog) as txn:
            cursor = txn.cursor()
            entries = [(int(FID.unpack(key)[0]), bytes(value[REPLOG_ENTRY.size:]))
                       for key, value in cursor.iternext()] if cursor.set_range(
                           FID.pack(after + 1)) else []
        for seq, data in entries:
            if seq != last + 1:
                log.error("own change %d is missing from the replication log; changes "
                          "from %d on are not re-applied", last + 1, seq)
                break
            record = decode_one(data)
            if record.op is Op.SKIP:
                last = max(seq, record.fields[0])  # type: ignore[type-var,assignment]
                continue
            if self._fenced(self.node_id, seq, record) is not None:
                # The snapshot says another node took the user over meanwhile: peers
                # fenced this change, and it must not land here either.
                last = seq
                continue
            try:
                self._apply(record)
            except FileNotFoundError as exc:
                # The snapshot's copy differs from the one this change was made on.
                self.stats.conflicts += 1
                self.stats.last_conflict = f"own change {seq} not re-applied: {exc}"
                log.error("CONFLICT: own change %d not re-applied after a snapshot: %s",
                          seq, exc)
            else:
                self._set_version(record, make_version(self.namespace, seq))
            last = seq
        return last

    def close(self) -> None:
        self.journal.close()
        self.env.close()
        self.fid_mark.close()

    def _meta_int(self, txn: lmdb.Transaction, key: bytes) -> int:
        raw = txn.get(key, db=self.db_meta)
        return 0 if raw is None else int(U64.unpack(raw)[0])

    def _read_applied(self, txn: lmdb.Transaction) -> dict[str, int]:
        applied: dict[str, int] = {}
        cursor = txn.cursor(db=self.db_meta)
        if cursor.set_range(APPLIED_PREFIX):
            for key, value in cursor:
                if not bytes(key).startswith(APPLIED_PREFIX):
                    break
                applied[bytes(key[len(APPLIED_PREFIX):]).decode()] = int(U64.unpack(value)[0])
        return applied

    def _first_logged(self, txn: lmdb.Transaction) -> int:
        """The oldest seq still in the replication log, or 0 if it is empty."""
        cursor = txn.cursor(db=self.db_replog)
        return int(FID.unpack(cursor.key())[0]) if cursor.first() else 0

    # ---------------------------------------------------------------- overlay reads

    def _get(self, db: bytes, key: bytes) -> bytes | None:
        slot = (db, key)
        if slot in self.pending:
            return self.pending[slot]
        if slot in self.committing:
            return self.committing[slot]
        with self.env.begin(db=self.dbs[db]) as txn:
            raw = txn.get(key)
        return None if raw is None else bytes(raw)

    def _scan(self, db: bytes, prefix: bytes) -> dict[bytes, bytes]:
        """All live keys starting with prefix, LMDB merged with the uncommitted overlay."""
        found: dict[bytes, bytes] = {}
        with self.env.begin(db=self.dbs[db]) as txn:
            cursor = txn.cursor()
            if cursor.set_range(prefix):
                for raw_key, raw_value in cursor:
                    if not raw_key.startswith(prefix):
                        break
                    found[bytes(raw_key)] = bytes(raw_value)
        for layer in (self.committing, self.pending):
            for (layer_db, layer_key), value in layer.items():
                if layer_db == db and layer_key.startswith(prefix):
                    if value is None:
                        found.pop(layer_key, None)
                    else:
                        found[layer_key] = value
        return found

    def _set(self, db: bytes, key: bytes, value: bytes | None) -> None:
        if len(key) > MAX_KEY:
            # Refused where names are made; this is what a journal or a peer from before
            # that check may still carry. LMDB would fail the whole commit, and every later
            # one, so the name is left out, alike on every node.
            if value is not None:
                log.error("leaving out a name too deep for the store: %r", key[:80])
            return
        self.pending[(db, key)] = value

    def lookup(self, dirpath: bytes, name: bytes) -> int | None:
        raw = self._get(b"names", name_key(dirpath, name))
        if not raw:
            return None
        return int(FID.unpack(raw)[0])

    def names_in(self, dirpath: bytes) -> dict[bytes, int]:
        prefix = dirpath + SEP
        return {
            key[len(prefix):]: int(FID.unpack(value)[0])
            for key, value in self._scan(b"names", prefix).items()
            if value and SEP not in key[len(prefix):]
        }

    def is_imported(self, dirpath: bytes) -> bool:
        return self._get(b"names", name_key(dirpath, IMPORTED)) is not None

    def _names_under(self, dirpath: bytes) -> dict[bytes, bytes]:
        """Name keys in dirpath and every directory below it (for directory renames)."""
        return {
            key: value
            for key, value in self._scan(b"names", dirpath).items()
            if key[len(dirpath):len(dirpath) + 1] in (SEP, b"/")
        }

    def directory_paths(self) -> dict[int, bytes]:
        """Every stored directory's path, by fid (index-only mounts store directories)."""
        found: dict[int, bytes] = {}
        for key, value in self._scan(b"names", b"").items():
            dirpath, _, name = key.partition(SEP)
            if not value or not name:
                continue
            fid = int(FID.unpack(value)[0])
            stored = self.files.get(fid)
            if fid in self.drops or fid in self.committing_drops:
                continue
            if stored is None:
                with self.env.begin(db=self.db_files) as txn:
                    raw = txn.get(FID.pack(fid))
                if raw is None:
                    continue
                mode = unpack_file(raw)[0].mode
            else:
                mode = stored.attrs.mode
            if stat.S_ISDIR(mode):
                found[fid] = dirpath + b"/" + name if dirpath else name
        return found

    def _orphans(self) -> list[int]:
        return [int(FID.unpack(key)[0]) for key in self._scan(b"orphans", b"")]

    # ---------------------------------------------------------------- file cache

    def get(self, fid: int) -> StoredFile:
        """The file with its content in RAM; raises FileNotFoundError if it is gone."""
        cached = self.files.get(fid)
        if cached is not None:
            self.files.move_to_end(fid)
            self.stats.ram_hits += 1
            return cached
        self.stats.ram_misses += 1
        if fid in self.drops or fid in self.committing_drops:
            # Dropped, but LMDB still has it until the commit: never read it back.
            raise FileNotFoundError(errno.ENOENT, f"replicated file {fid} is gone")
        key = FID.pack(fid)
        with self.env.begin() as txn:
            raw = txn.get(key, db=self.db_files)
            if raw is None:
                raise FileNotFoundError(errno.ENOENT, f"replicated file {fid} is gone")
            attrs, version = unpack_file(raw)
            content = bytearray()
            cursor = txn.cursor(db=self.db_chunks)
            if cursor.set_range(key):
                for chunk_key, chunk in cursor:
                    if not chunk_key.startswith(key):
                        break
                    content += chunk
        del content[attrs.size:]
        if len(content) < attrs.size:
            content.extend(bytes(attrs.size - len(content)))
        stored = StoredFile(fid, attrs, content, committed_size=attrs.size, version=version)
        self._cache(stored)
        return stored

    def cached(self, fid: int) -> StoredFile | None:
        return self.files.get(fid)

    def _cache(self, stored: StoredFile) -> None:
        self.files[stored.fid] = stored
        self.ram_bytes += stored.size

    def _resize(self, stored: StoredFile, old_size: int) -> None:
        self.ram_bytes += stored.size - old_size

    def evict(self) -> None:
        """Drop clean, closed files from RAM, oldest first, until within the budget."""
        if self.ram_bytes <= self.ram_budget:
            return
        for fid in list(self.files):
            if self.ram_bytes <= self.ram_budget:
                break
            stored = self.files[fid]
            if stored.opens or fid in self.dirty_fids or fid in self.committing_fids:
                continue
            del self.files[fid]
            self.ram_bytes -= stored.size
            self.stats.evictions += 1

    # ---------------------------------------------------------------- public mutators

    def _log(self, op: Op, *fields: Field, space_neutral: bool = False) -> None:
        if self.installing:
            raise OSError(errno.EAGAIN, "a snapshot from a peer is being installed")
        if self.ownership_depth and op not in UNOWNED_OPS:
            self._claim(self._users_touched(op, fields))
        self._append(op, *fields, space_neutral=space_neutral)

    def _append(self, op: Op, *fields: Field, space_neutral: bool = False) -> None:
        try:
            record, data = self.journal.append(op, fields, space_neutral)
        except OSError as exc:
            self.stats.journal_errors += 1
            if time.monotonic() - self._journal_error_logged > 10:
                self._journal_error_logged = time.monotonic()
                log.error("cannot journal a change to an index file (%s): nothing is changed; "
                          "the writer gets %s (on a full state disk, after waiting "
                          "full_disk_wait for room)", exc, errno.errorcode.get(exc.errno or 0))
            raise
        self._apply_own(record, data)
        if self.journal.bytes_since_rotate >= self.commit_bytes:
            self._wake.set()
        self.on_local_change(record.seq)

    def _apply_own(self, record: Record, data: bytes) -> None:
        self.newly_orphaned.clear()  # only peers' changes use it
        base = self._version_of(record)
        if record.op is Op.SKIP:
            self.journal.seq = max(self.journal.seq, record.fields[0])  # type: ignore[type-var,assignment]
        self._apply(record)
        self._set_version(record, make_version(self.namespace, record.seq))
        if self.replicating:
            self.replog_tail.append(LogEntry(record.seq, base, data))

    def _version_of(self, record: Record) -> int:
        """The version of the file a change is made against (0: none)."""
        if record.op not in VERSIONED_OPS:
            return 0
        try:
            return self.get(record.fields[0]).version  # type: ignore[arg-type]
        except FileNotFoundError:
            return 0

    def _set_version(self, record: Record, version: int) -> None:
        """After `_apply`, which already marked the file dirty for the next commit."""
        if record.op in VERSIONED_OPS or record.op in CREATING_OPS:
            stored = self.files.get(record.fields[0])  # type: ignore[arg-type]
            if stored is not None:
                stored.version = version

    # ---------------------------------------------------------------- peers' changes

    def apply_remote(self, origin: str, origin_namespace: int, seq: int, base_version: int,
                     record: Record, data: bytes | None = None) -> str | None:
        """Apply one change of a peer (`data`: its encoding), exactly once and in order.

        Returns None when applied (or already applied before), or a description of the
        conflict when this copy of the file moved on since the change was made: such a
        change is counted and skipped, never applied over local content. Either way the
        origin's applied seq advances, in the same LMDB commit as the change itself.

        The change is journaled here first, like a local one: a local change made on top
        of it before the next commit must find it again when the journal is replayed.
        """
        last = self.applied.get(origin, 0)
        if seq <= last:
            return None  # resent after a reconnect; already here
        if seq != last + 1:
            raise SeqGap(f"change {seq} of {origin!r} does not follow {last}")
        if record.op is Op.OWN and record.fields[1] != origin.encode():
            raise ValueError(f"{origin!r} sent a takeover in the name of {record.fields[1]!r}")
        if self.installing:
            raise SeqGap("a snapshot is being installed")
        problem = size_problem(record)
        if problem is not None:
            raise ValueError(problem)
        self.journal.append_remote((origin.encode(), seq, base_version,
                                    encode(record) if data is None else data))
        return self._apply_remote(origin, origin_namespace, seq, base_version, record)

    def _replay_remote(self, wrapper: Record) -> None:
        origin_raw, seq, base_version, data = wrapper.fields
        assert isinstance(origin_raw, bytes) and isinstance(data, bytes)
        assert isinstance(seq, int) and isinstance(base_version, int)
        origin = origin_raw.decode()
        if seq <= self.applied.get(origin, 0):
            return  # LMDB has it
        try:
            self._apply_remote(origin, node_namespace(origin), seq, base_version,
                               decode_one(data))
        except (ValueError, MemoryError, OverflowError) as exc:
            # Never let one record stop every later mount; it was refused live, or should
            # have been.
            self.stats.conflicts += 1
            self.stats.last_conflict = f"{origin} seq {seq} not replayed: {exc!r}"
            log.error("CONFLICT: change %d of %s not replayed: %r", seq, origin, exc)

    def _apply_remote(self, origin: str, origin_namespace: int, seq: int, base_version: int,
                      record: Record) -> str | None:
        conflict = None
        if self._fenced(origin, seq, record) is None:
            conflict = self._conflict(record, base_version)
            if conflict is None and record.op is Op.DROP:
                self._drop_if_unused(record.fields[0])  # type: ignore[arg-type]
            elif conflict is None:
                self.newly_orphaned = []
                self._apply(record, origin)
                self._set_version(record, make_version(origin_namespace, seq))
                for fid in self.newly_orphaned:
                    self._drop_if_unused(fid)
            else:
                self.stats.conflicts += 1
                self.stats.last_conflict = f"{origin} seq {seq}: {conflict}"
        # A fenced change is refused, counted and logged; the origin's seq advances anyway.
        if record.op is Op.SKIP:
            seq = max(seq, record.fields[0])  # type: ignore[type-var,assignment]
        self.applied[origin] = seq
        self._set(b"meta", APPLIED_PREFIX + origin.encode(), U64.pack(seq))
        self.stats.remote_applied += 1
        return conflict

    def _drop_if_unused(self, fid: int) -> None:
        """Forget a file that has no names here and that nothing here has open.

        A peer drops a file once its own names and opens are gone; here the file may still
        have names (the change that removes them comes from another origin, on another
        connection, and has not arrived yet) or be open (the local release drops it then).
        So a peer's DROP only drops what is unused here, and a peer's change that takes a
        file's last name drops it here too if nothing here uses it.
        """
        try:
            stored = self.get(fid)
        except FileNotFoundError:
            return
        if stored.attrs.nlink == 0 and not self.in_use(fid):
            self._apply_drop(fid)

    def _conflict(self, record: Record, base_version: int) -> str | None:
        f = record.fields
        if record.op not in VERSIONED_OPS and record.op not in CREATING_OPS:
            return None
        fid = f[0]
        assert isinstance(fid, int)
        what = f"{record.op.name} of file {fid:#x}"
        try:
            version = self.get(fid).version
        except FileNotFoundError:
            version = None
        if record.op in VERSIONED_OPS:
            if version is None:
                return f"{what}, which does not exist here"
            if version != base_version:
                return (f"{what} made against version {base_version:#x}, but the copy "
                        f"here is at {version:#x}")
            return None
        if version is not None:
            return f"{what}, which already exists here"
        dirpath, name = f[1], f[2]
        assert isinstance(dirpath, bytes) and isinstance(name, bytes)
        existing = self.lookup(dirpath, name)
        if record.op is Op.CREATE and existing is not None:
            path = (dirpath + b"/" + name).decode(errors="replace")
            return f"CREATE of {path}, which names file {existing:#x} here"
        return None

    # ---------------------------------------------------------------- ownership

    def _load_ownership(self) -> None:
        """The owners table, and which user directory each file is in (for fencing a
        change that names only a file id), from LMDB: at start, and after a snapshot."""
        self.owners = {}
        self.fid_users = {}
        self.awaiting = {}
        self.losing_count = 0
        if not self.ownership_depth:
            return
        with self.env.begin() as txn:
            self.losing_count = int(txn.stat(self.db_conflicts)["entries"])
            for key, value in txn.cursor(db=self.db_owners):
                self.owners[bytes(key)] = Owner.unpack(bytes(value))
            for key, value in txn.cursor(db=self.db_names):
                if value:
                    user = user_of(bytes(key).partition(SEP)[0], self.ownership_depth)
                    if user is not None:
                        self.fid_users[int(FID.unpack(value)[0])] = user
            cursor = txn.cursor(db=self.db_meta)
            if cursor.set_range(AWAITING_PREFIX):
                for key, value in cursor:
                    if not bytes(key).startswith(AWAITING_PREFIX):
                        break
                    fid = int(FID.unpack(bytes(key)[len(AWAITING_PREFIX):])[0])
                    self.awaiting[fid] = int(U64.unpack(value)[0])

    def users_of_change(self, record: Record) -> set[bytes] | None:
        """The user directories a change touches; None where that is unknown (no
        ownership, or a change above the user level)."""
        users = self._users_touched(record.op, record.fields)
        if record.op is Op.OWN:
            users.add(record.fields[0])  # type: ignore[arg-type]
        return users or None

    def _users_touched(self, op: Op, fields: tuple[Field, ...]) -> set[bytes]:
        users = set()
        for dirpath in record_dirpaths(op, fields):
            user = user_of(dirpath, self.ownership_depth)
            if user is not None:
                users.add(user)
        if op in FID_OPS:
            fid = fields[0]
            user = self.fid_users.get(fid) or self.dropped_users.get(fid)  # type: ignore[arg-type]
            if user is not None:
                users.add(user)
        return users

    def _claim(self, users: set[bytes]) -> None:
        """Before a local change to these users' files: take over each one this node does
        not own, or refuse (EROFS) where it may not."""
        if not users:
            return
        refusal = self.write_refusal()
        for user in sorted(users):
            self._check_complete(user)
            owner = self.owners.get(user)
            if owner is not None and owner.lost:
                self._refuse(user, f"node {owner.node} took it over (epoch {owner.epoch}); "
                                   "'mailfs takeover' moves it back here")
            if refusal is not None:
                self._refuse(user, refusal)
            if owner is None or owner.node != self.node_id:
                self._take_over(user)

    def _await_content(self, fid: int, missing: int) -> None:
        """Note how many bytes of a file a takeover still owes (0: none). Kept in LMDB
        too: a commit can come between a takeover and the rest of its content when the
        connection broke in the middle, and a restart must not forget the gap."""
        key = AWAITING_PREFIX + FID.pack(fid)
        if missing:
            self.awaiting[fid] = missing
            self._set(b"meta", key, U64.pack(missing))
        elif self.awaiting.pop(fid, None) is not None:
            self._set(b"meta", key, None)

    def _check_complete(self, user: bytes) -> None:
        """EAGAIN while a takeover of this user still lacks content: a write now would
        build on zeros, and a takeover from here would hand the zeros to every node."""
        if self.awaiting and any(self.fid_users.get(fid) == user for fid in self.awaiting):
            raise OSError(errno.EAGAIN, f"the content of a takeover of "
                                        f"{user.decode(errors='replace')} is still arriving")

    def _refuse(self, user: bytes, reason: str) -> None:
        self.ownership.refused_writes += 1
        text = f"write to user {user.decode(errors='replace')} refused: {reason}"
        self.ownership.last_refused = text
        if time.monotonic() - self._refusal_logged > 10:
            self._refusal_logged = time.monotonic()
            log.error("%s (%d refused so far)", text, self.ownership.refused_writes)
        raise OSError(errno.EROFS, text)

    def take_over(self, user: bytes) -> Owner:
        """An admin's takeover (`mailfs takeover`), also of a user this node lost."""
        if not self.ownership_depth:
            raise OSError(errno.EINVAL, "ownership is off (no peers, or ownership.depth = 0)")
        if user_of(user, self.ownership_depth) != user:
            raise OSError(errno.EINVAL, f"{user!r} is not a user directory at depth "
                                        f"{self.ownership_depth}")
        if self.installing:
            raise OSError(errno.EAGAIN, "a snapshot from a peer is being installed")
        owner = self.owners.get(user)
        if owner is not None and owner.node == self.node_id and not owner.lost:
            return owner
        self._check_complete(user)
        refusal = self.write_refusal()
        if refusal is not None:
            raise OSError(errno.EROFS, refusal)
        return self._take_over(user)

    def _take_over(self, user: bytes) -> Owner:
        """Journal a takeover: the user's whole state here, which every node adopts."""
        entries, files = self._manifest(user)
        manifest = pack_manifest(entries)
        if len(manifest) > MAX_MANIFEST_BYTES:
            raise OSError(errno.EFBIG, f"user {user!r} has too many index files to take over "
                                       f"({len(entries)} names)")
        current = self.owners.get(user)
        epoch = (current.epoch if current is not None else 0) + 1
        changes: list[tuple[Op, tuple[Field, ...]]] = [(Op.OWN, (
            user, self.node_id.encode(), epoch, time.time_ns(),
            pack_seq_map(dict(self.applied)), manifest))]
        for fid, stored in files.items():
            for offset in range(0, stored.size, DATA_PIECE):
                changes.append((Op.OWN_DATA, (fid, stored.version, offset,
                                              bytes(stored.content[offset:offset + DATA_PIECE]))))
        # One write: peers must never get the manifest without all of its content.
        try:
            written = self.journal.append_group(changes)
        except OSError as exc:
            self.stats.journal_errors += 1
            log.error("cannot journal a takeover of %s (%s): the write that needed it gets "
                      "%s", user.decode(errors="replace"), exc,
                      errno.errorcode.get(exc.errno or 0))
            raise
        for record, data in written:
            self._apply_own(record, data)
            self.on_local_change(record.seq)
        self._wake.set()
        return self.owners[user]

    def _manifest(self, user: bytes) -> tuple[list[ManifestEntry], dict[int, StoredFile]]:
        entries: list[ManifestEntry] = []
        files: dict[int, StoredFile] = {}
        digests: dict[int, int] = {}
        for key, value in sorted(self._names_under(user).items()):
            dirpath, _, name = key.partition(SEP)
            if not value:
                continue  # an import marker: not the owner's business
            fid = int(FID.unpack(value)[0])
            try:
                stored = files.get(fid) or self.get(fid)
            except FileNotFoundError:
                continue
            files[fid] = stored
            if fid not in digests:
                digests[fid] = content_digest(stored.content)
            entries.append(ManifestEntry(dirpath, name, fid, stored.version, digests[fid],
                                         stored.attrs.copy()))
        return entries, files

    def _apply_takeover(self, record: Record, origin: str) -> None:
        user, node_raw, epoch, time_ns, covered, manifest = record.fields
        assert isinstance(user, bytes) and isinstance(node_raw, bytes)
        assert isinstance(epoch, int) and isinstance(time_ns, int)
        assert isinstance(covered, bytes) and isinstance(manifest, bytes)
        new = Owner(node_raw.decode(), epoch, time_ns, unpack_seq_map(covered))
        current = self.owners.get(user)
        shown = user.decode(errors="replace")
        if current is not None and new.rank() <= current.rank():
            # Two takeovers of one user: (epoch, node) decides, alike on every node.
            self.ownership.stale_takeovers += 1
            log.warning("takeover of %s by %s (epoch %d) ignored: %s took it at epoch %d",
                        shown, new.node, epoch, current.node, current.epoch)
            return
        if new.node != self.node_id:
            new.lost = current is not None and (current.lost or current.node == self.node_id)
            self._adopt(user, unpack_manifest(manifest), new)
        elif self.reapplying:
            # Re-applied over a peer's snapshot: the state here is not the one this node
            # took over with, and peers adopted the manifest.
            self._adopt(user, unpack_manifest(manifest), new)
        self.owners[user] = new
        self._set(b"owners", user, new.pack())
        self.ownership.takeovers += 1
        self.ownership.last_takeover = (
            f"{shown}: {current.node if current else 'nobody'} -> {new.node}, epoch {epoch}")
        if current is not None and current.node != new.node:
            log.warning("user %s taken over by %s (epoch %d) from %s", shown, new.node,
                        epoch, current.node)

    def _adopt(self, user: bytes, entries: list[ManifestEntry], owner: Owner) -> None:
        """Make the user's files here exactly the manifest's; their content follows in
        OWN_DATA records. What differs here is kept as a losing version."""
        wanted: dict[bytes, bytes] = {}
        by_fid: dict[int, list[ManifestEntry]] = {}
        for entry in entries:
            key = name_key(entry.dirpath, entry.name)
            if entry.fid:
                wanted[key] = FID.pack(entry.fid)
                by_fid.setdefault(entry.fid, []).append(entry)
        # Import markers have no owner (MARK_IMPORTED is never fenced): left as they are,
        # or nodes would differ by whether a marker came before or after the takeover.
        current = {key: value for key, value in self._names_under(user).items()
                   if not key.endswith(SEP + IMPORTED)}
        unbound: dict[int, list[bytes]] = {}
        for key, value in current.items():
            if wanted.get(key) != value:
                self._set(b"names", key, None)
                if value:
                    unbound.setdefault(int(FID.unpack(value)[0]), []).append(key)
        for fid, names in by_fid.items():
            self._adopt_file(user, fid, names, owner, unbound.get(fid, []))
        for key, value in wanted.items():
            if current.get(key) != value:
                self._set(b"names", key, value)
        for fid, keys in unbound.items():
            if fid in by_fid:
                continue
            try:
                stored = self.get(fid)
            except FileNotFoundError:
                continue
            self._keep_losing(user, keys[0], stored, owner)
            stored.attrs.nlink = max(0, stored.attrs.nlink - len(keys))
            self._touch(stored)
            if stored.attrs.nlink == 0:
                self._set(b"orphans", FID.pack(fid), b"")
                self.newly_orphaned.append(fid)

    def _adopt_file(self, user: bytes, fid: int, names: list[ManifestEntry], owner: Owner,
                    old_keys: list[bytes]) -> None:
        entry = names[0]
        attrs = entry.attrs.copy()
        attrs.nlink = len(names)
        try:
            stored: StoredFile | None = self.get(fid)
        except FileNotFoundError:
            stored = None
        self._set(b"orphans", FID.pack(fid), None)
        self.fid_users[fid] = user
        self._await_content(fid, 0)
        if (stored is not None and stored.version == entry.version
                and stored.size == attrs.size and content_digest(stored.content) == entry.digest):
            if stored.attrs != attrs:
                stored.attrs = attrs
                self._touch(stored)
            return
        if attrs.size:
            self._await_content(fid, attrs.size)  # the owner's OWN_DATA records fill it
        if stored is None:
            self.drops.discard(fid)
            stored = StoredFile(fid, attrs, bytearray(attrs.size), version=entry.version)
            self._cache(stored)
            self._dirty_range(stored, 0, attrs.size)
            if fid_namespace(fid) == self.namespace:
                self.next_fid = max(self.next_fid, fid + 1)
            return
        self._keep_losing(user, old_keys[0] if old_keys else
                          name_key(entry.dirpath, entry.name), stored, owner, entry.digest)
        old_size = stored.size
        stored.content[:] = bytes(attrs.size)
        stored.attrs = attrs
        stored.version = entry.version
        self._resize(stored, old_size)
        self._dirty_range(stored, 0, max(old_size, attrs.size))

    def _keep_losing(self, user: bytes, key: bytes, stored: StoredFile, owner: Owner,
                     winning_digest: int | None = None) -> None:
        if winning_digest is not None and content_digest(stored.content) == winning_digest:
            return  # only attributes differ: no content is lost
        namespace, seq = version_parts(stored.version)
        covered = {node_namespace(node): through for node, through in owner.covered.items()}
        if namespace == node_namespace(owner.node) or seq <= covered.get(namespace, 0):
            return  # the taker had this version: this node was only behind, nothing lost
        dirpath, _, name = key.partition(SEP)
        losing = LosingVersion(user, dirpath + b"/" + name, stored.fid, stored.version,
                               owner.node, owner.epoch, owner.time_ns, stored.attrs.copy(),
                               bytes(stored.content))
        self._set(b"conflicts", losing.key(), losing.pack())
        self.losing_count += 1
        if self.losing_count > MAX_LOSING_VERSIONS + 100:
            self._forget_oldest_losing(self.losing_count - MAX_LOSING_VERSIONS)
        log.warning("user %s: this node's version of %s (%d bytes) lost to %s's takeover "
                    "(epoch %d); kept, see 'mailfs conflicts'", user.decode(errors="replace"),
                    losing.path.decode(errors="replace"), stored.size, owner.node, owner.epoch)

    def _apply_own_data(self, record: Record, origin: str) -> None:
        fid, version, offset, data = record.fields
        assert isinstance(fid, int) and isinstance(version, int)
        assert isinstance(offset, int) and isinstance(data, bytes)
        try:
            stored = self.get(fid)
        except FileNotFoundError:
            return
        owner = self.owners.get(self.fid_users.get(fid, b""))
        if owner is None or owner.node != origin or stored.version != version:
            return  # a takeover that lost to another one, or content already replaced
        end = min(offset + len(data), stored.size)
        if end > offset and stored.content[offset:end] != data[:end - offset]:
            stored.content[offset:end] = data[:end - offset]
            self._dirty_range(stored, offset, end)
        missing = self.awaiting.get(fid)
        if missing is not None:
            self._await_content(fid, max(0, missing - len(data)))

    def _fenced(self, origin: str, seq: int, record: Record) -> str | None:
        """Why a peer's change must not be applied: its origin does not own the user
        (or the owner's takeover already carries it: then the empty string)."""
        if (not self.ownership_depth or record.op in UNOWNED_OPS
                or record.op in (Op.OWN, Op.OWN_DATA)):
            return None
        for user in sorted(self._users_touched(record.op, record.fields)):
            owner = self.owners.get(user)
            if owner is None or owner.node == origin:
                continue
            if record.op in CREATING_OPS:
                # Its later writes name only the file: they belong to this user as well.
                self.fid_users[record.fields[0]] = user  # type: ignore[index]
            if seq <= owner.covered.get(origin, 0):
                self.ownership.covered_changes += 1
                return ""
            reason = (f"{record.op.name} of user {user.decode(errors='replace')}, which "
                      f"{owner.node} owns since epoch {owner.epoch}")
            self.ownership.fenced_changes += 1
            self.ownership.last_fenced = f"{origin} seq {seq}: {reason}"
            if time.monotonic() - self._fence_logged > 10:
                self._fence_logged = time.monotonic()
                log.error("FENCED: change %d of %s not applied: %s (%d fenced so far)", seq,
                          origin, reason, self.ownership.fenced_changes)
            return reason
        return None

    def user_names(self, user: bytes) -> set[tuple[bytes, bytes]]:
        """(dirpath, name) of every name under a user directory (for invalidation)."""
        return {(key.partition(SEP)[0], key.partition(SEP)[2])
                for key, value in self._names_under(user).items() if value}

    def owner_list(self) -> list[dict[str, object]]:
        return [{"user": user.decode(errors="replace"), "node": owner.node,
                 "epoch": owner.epoch, "since": owner.time_ns / 1e9,
                 "here": owner.node == self.node_id, "lost_here": owner.lost}
                for user, owner in sorted(self.owners.items())]

    def losing_versions(self) -> list[LosingVersion]:
        return [LosingVersion.unpack(value) for _, value in sorted(
            self._scan(b"conflicts", b"").items())]

    def purge_losing_versions(self) -> int:
        keys = self._losing_keys()
        for key in keys:
            self._set(b"conflicts", key, None)
        self.losing_count = 0
        self._wake.set()
        return len(keys)

    def _losing_keys(self) -> list[bytes]:
        """Keys of the conflicts DB, oldest first, without reading the versions."""
        with self.env.begin(db=self.db_conflicts) as txn:
            keys = {bytes(key) for key in txn.cursor().iternext(keys=True, values=False)}
        for layer in (self.committing, self.pending):
            for (db, key), value in layer.items():
                if db == b"conflicts":
                    (keys.add if value is not None else keys.discard)(key)
        return sorted(keys)

    def _forget_oldest_losing(self, count: int) -> None:
        oldest = self._losing_keys()[:count]
        for key in oldest:
            self._set(b"conflicts", key, None)
        self.losing_count -= len(oldest)
        log.warning("forgot the %d oldest losing versions (more than %d kept)", len(oldest),
                    MAX_LOSING_VERSIONS)

    def ownership_status(self) -> dict[str, object]:
        stats = self.ownership
        return {
            "depth": self.ownership_depth,
            "users": len(self.owners),
            "owned_here": sum(o.node == self.node_id for o in self.owners.values()),
            "lost_here": sum(o.lost for o in self.owners.values()),
            "max_epoch": max((o.epoch for o in self.owners.values()), default=0),
            "takeovers": stats.takeovers,
            "last_takeover": stats.last_takeover,
            "stale_takeovers": stats.stale_takeovers,
            "fenced_changes": stats.fenced_changes,
            "last_fenced": stats.last_fenced,
            "covered_changes": stats.covered_changes,
            "refused_writes": stats.refused_writes,
            "last_refused": stats.last_refused,
            "conflict_versions": self.losing_count,
        }

    def request_commit(self) -> None:
        self._wake.set()

    def skip_to(self, seq: int) -> None:
        """Continue own seqs after `seq` (a peer has changes this node lost, or a machine
        crash may have taken some). A journaled SKIP record says so, so that replay, the
        replication log and peers all see one contiguous history."""
        if seq > self.journal.seq:
            self._append(Op.SKIP, seq)
            self._wake.set()

    @staticmethod
    def _check_key(dirpath: bytes, name: bytes) -> None:
        """A key LMDB cannot hold would fail every commit from then on: refuse the name."""
        problem = key_problem(dirpath, name)
        if problem is not None:
            raise OSError(errno.ENAMETOOLONG, f"{problem} for an index file")

    def create(self, dirpath: bytes, name: bytes, mode: int, uid: int, gid: int) -> StoredFile:
        self._check_key(dirpath, name)
        now = time.time_ns()
        fid = self.next_fid
        self._log(Op.CREATE, fid, dirpath, name, Attrs(mode, uid, gid, 1, 0, now, now, now))
        return self.files[fid]

    def _past_reserved(self, next_fid: int) -> int:
        """`next_fid`, or past the last fid reserved for a lock file in this namespace."""
        marked = self.fid_mark.value
        try:
            if marked and fid_namespace(marked) == fid_namespace(next_fid):
                return max(next_fid, marked)
        except ValueError:
            log.warning("ignoring a damaged %s in %s", FID_MARK, self.state_dir)
        return next_fid

    def reserve_fid(self) -> int:
        """A fid for a lock file, which lives in RAM only: its inode number is derived from
        it, and an index file it is renamed over keeps it (`put`). Never journaled, so the
        fid mark keeps it from being handed out again after a daemon crash."""
        fid = self.next_fid
        self.next_fid += 1
        self.fid_mark.raise_to(self.next_fid)
        return fid

    def put(self, dirpath: bytes, name: bytes, attrs: Attrs, content: bytes,
            space_neutral: bool = False, fid: int | None = None) -> StoredFile:
        """Install a whole file under a name, replacing what was there (promotion, import).

        `space_neutral`: the content already counts as written (a lock file renamed over
        an index file: on a real disk its blocks are allocated, and the rename needs none).
        `fid`: one from `reserve_fid` (that lock file's), instead of a new one.
        """
        self._check_key(dirpath, name)
        fid = self.next_fid if fid is None else fid
        self._log(Op.PUT, fid, dirpath, name, attrs, content, space_neutral=space_neutral)
        return self.files[fid]

    def write(self, stored: StoredFile, offset: int, data: bytes) -> None:
        if offset + len(data) > MAX_FILE_SIZE:
            raise OSError(errno.EFBIG, "index files are limited to 1 GiB")
        self._log(Op.WRITE, stored.fid, offset, time.time_ns(), data,
                  space_neutral=offset + len(data) <= _blocks_end(stored.attrs.size))

    def truncate(self, stored: StoredFile, size: int) -> None:
        if size > MAX_FILE_SIZE:
            raise OSError(errno.EFBIG, "index files are limited to 1 GiB")
        self._log(Op.TRUNCATE, stored.fid, size, time.time_ns(),
                  space_neutral=size <= _blocks_end(stored.attrs.size))

    def set_attrs(self, stored: StoredFile, attrs: Attrs) -> None:
        self._log(Op.SETATTR, stored.fid, attrs, space_neutral=True)

    def link(self, fid: int, dirpath: bytes, name: bytes) -> None:
        self._check_key(dirpath, name)
        # A new name takes no blocks on a real disk (Dovecot links dovecot.index to make
        # its backup, also when the disk is full).
        self._log(Op.LINK, fid, dirpath, name, time.time_ns(), space_neutral=True)

    def unlink(self, dirpath: bytes, name: bytes) -> None:
        self._log(Op.UNLINK, dirpath, name, time.time_ns(), space_neutral=True)

    def rename(self, src_dir: bytes, src_name: bytes, dst_dir: bytes, dst_name: bytes) -> None:
        self._check_key(dst_dir, dst_name)
        # Dovecot renames dovecot.index.tmp over dovecot.index; on a real disk that frees.
        self._log(Op.RENAME, src_dir, src_name, dst_dir, dst_name, time.time_ns(),
                  space_neutral=True)

    def rename_dir(self, old: bytes, new: bytes) -> None:
        """Move the names under a renamed directory, and its import state, to the new path.

        Logged even when nothing is under `old`: whatever was recorded under `new` (the
        import marker of an empty directory renamed over) must go.
        """
        if self._names_under(old) or self._names_under(new):
            # Space-neutral like any rename: it follows a rename (of the directory's own
            # entry, or on the backing store) that has happened already.
            self._log(Op.RENAME_DIR, old, new, space_neutral=True)

    def check_rename_dir(self, old: bytes, new: bytes) -> None:
        """Refuse, before anything moves, a directory rename that would leave an index file
        below it with a path longer than the store keeps. (Import markers do not count: a
        directory too deep to keep one is simply scanned again.)"""
        if (self.ownership_depth and user_of(old, self.ownership_depth) is None
                and (self._names_under(old) or self._names_under(new))):
            # It would move the index files of users it does not name, past their owners;
            # EXDEV makes mv copy them, file by file, each write claiming its user.
            raise OSError(errno.EXDEV, "a directory above user directories moves users; "
                                       "ownership needs each user moved on its own")
        grows = len(new) - len(old)
        if grows <= 0:
            return
        longest = max((len(key) for key in self._names_under(old)
                       if not key.endswith(SEP + IMPORTED)), default=0)
        if longest and longest + grows > MAX_KEY:
            raise OSError(errno.ENAMETOOLONG,
                          "index files below would have paths longer than the store keeps")

    def remove_dir(self, dirpath: bytes) -> None:
        if self.is_imported(dirpath):
            self._log(Op.REMOVE_DIR, dirpath, space_neutral=True)  # after the rmdir itself

    def mark_imported(self, dirpath: bytes) -> None:
        if key_problem(dirpath, IMPORTED) is None:  # deeper: no index file can be kept there
            self._log(Op.MARK_IMPORTED, dirpath)

    def drop(self, fid: int) -> None:
        """Forget a file with no names left once nobody has it open."""
        self._log(Op.DROP, fid, space_neutral=True)

    # ---------------------------------------------------------------- apply

    def _apply(self, record: Record, origin: str = "") -> None:
        """`origin`: the peer whose change this is; empty for this node's own."""
        f = record.fields
        match record.op:
            case Op.OWN:
                self._apply_takeover(record, origin or self.node_id)
            case Op.OWN_DATA:
                self._apply_own_data(record, origin or self.node_id)
            case Op.CREATE:
                self._apply_put(f[0], f[1], f[2], f[3], b"")  # type: ignore[arg-type]
            case Op.PUT:
                self._apply_put(f[0], f[1], f[2], f[3], f[4])  # type: ignore[arg-type]
            case Op.WRITE:
                self._apply_write(f[0], f[1], f[2], f[3])  # type: ignore[arg-type]
            case Op.TRUNCATE:
                self._apply_truncate(f[0], f[1], f[2])  # type: ignore[arg-type]
            case Op.SETATTR:
                self._apply_setattr(f[0], f[1])  # type: ignore[arg-type]
            case Op.LINK:
                self._apply_link(f[0], f[1], f[2], f[3])  # type: ignore[arg-type]
            case Op.UNLINK:
                self._apply_unlink(f[0], f[1], f[2])  # type: ignore[arg-type]
            case Op.RENAME:
                self._apply_rename(f[0], f[1], f[2], f[3], f[4])  # type: ignore[arg-type]
            case Op.RENAME_DIR:
                self._apply_rename_dir(f[0], f[1])  # type: ignore[arg-type]
            case Op.DROP:
                self._apply_drop(f[0])  # type: ignore[arg-type]
            case Op.MARK_IMPORTED:
                self._set(b"names", name_key(f[0], IMPORTED), IMPORTED)  # type: ignore[arg-type]
            case Op.REMOVE_DIR:
                self._set(b"names", name_key(f[0], IMPORTED), None)  # type: ignore[arg-type]

    def _touch(self, stored: StoredFile) -> None:
        stored.attrs_dirty = True
        self.dirty_fids.add(stored.fid)

    def _dirty_range(self, stored: StoredFile, start: int, end: int) -> None:
        if end > start:
            stored.dirty_chunks.update(range(start // CHUNK, (end - 1) // CHUNK + 1))
        self._touch(stored)

    def _apply_put(self, fid: int, dirpath: bytes, name: bytes, attrs: Attrs,
                   content: bytes) -> None:
        if fid_namespace(fid) == self.namespace:  # other nodes' ids are not ours to count
            self.next_fid = max(self.next_fid, fid + 1)
        attrs = attrs.copy()
        attrs.nlink = 1
        attrs.size = len(content)
        stored = StoredFile(fid, attrs, bytearray(content))
        self._cache(stored)
        self._dirty_range(stored, 0, len(content))
        self._bind(dirpath, name, fid, attrs.ctime_ns)

    def _bind(self, dirpath: bytes, name: bytes, fid: int, ctime_ns: int) -> None:
        """Point a name at fid; whatever it named before loses a link."""
        key = name_key(dirpath, name)
        old = self._get(b"names", key)
        self._set(b"names", key, FID.pack(fid))
        if self.ownership_depth:
            user = user_of(dirpath, self.ownership_depth)
            if user is not None:
                self.fid_users[fid] = user
        if old:
            self._lose_link(int(FID.unpack(old)[0]), ctime_ns)
        self._dir_changed(dirpath, ctime_ns)

    def _dir_changed(self, dirpath: bytes, when_ns: int) -> None:
        """A name in a stored directory came or went: its mtime and ctime move, as on ext4.
        The time is the change's own, so every node that applies it ends up the same."""
        if not self.dirs_stored or not dirpath:
            return  # the root shows the mountpoint directory, which is not ours
        parent, _, name = dirpath.rpartition(b"/")
        raw = self._get(b"names", name_key(parent, name))
        if not raw:
            return
        try:
            directory = self.get(int(FID.unpack(raw)[0]))
        except FileNotFoundError:
            return
        if stat.S_ISDIR(directory.attrs.mode) and when_ns > directory.attrs.mtime_ns:
            # Only forward: an import puts files with their old times.
            directory.attrs.mtime_ns = directory.attrs.ctime_ns = when_ns
            self._touch(directory)

    def _lose_link(self, fid: int, ctime_ns: int) -> None:
        try:
            stored = self.get(fid)
        except FileNotFoundError:
            return
        stored.attrs.nlink = max(0, stored.attrs.nlink - 1)
        stored.attrs.ctime_ns = ctime_ns
        self._touch(stored)
        if stored.attrs.nlink == 0:
            self._set(b"orphans", FID.pack(fid), b"")
            self.newly_orphaned.append(fid)

    def _apply_write(self, fid: int, offset: int, mtime_ns: int, data: bytes) -> None:
        stored = self.get(fid)
        old_size = stored.size
        end = offset + len(data)
        if offset > old_size:
            stored.content.extend(bytes(offset - old_size))
        stored.content[offset:end] = data
        stored.attrs.size = stored.size
        stored.attrs.mtime_ns = stored.attrs.ctime_ns = mtime_ns
        self._resize(stored, old_size)
        self._dirty_range(stored, min(offset, old_size), end)

    def _apply_truncate(self, fid: int, size: int, mtime_ns: int) -> None:
        stored = self.get(fid)
        old_size = stored.size
        if size < old_size:
            del stored.content[size:]
            self.journal.note_freed(_blocks_end(old_size) - _blocks_end(size))
        else:
            stored.content.extend(bytes(size - old_size))
        stored.attrs.size = size
        stored.attrs.mtime_ns = stored.attrs.ctime_ns = mtime_ns
        self._resize(stored, old_size)
        self._dirty_range(stored, min(size, old_size), max(size, old_size))

    def _apply_setattr(self, fid: int, attrs: Attrs) -> None:
        stored = self.get(fid)
        size, nlink = stored.attrs.size, stored.attrs.nlink
        stored.attrs = attrs.copy()
        stored.attrs.size, stored.attrs.nlink = size, nlink
        self._touch(stored)

    def _apply_link(self, fid: int, dirpath: bytes, name: bytes, ctime_ns: int) -> None:
        stored = self.get(fid)
        if stored.attrs.nlink == 0:
            self._set(b"orphans", FID.pack(fid), None)
        stored.attrs.nlink += 1
        stored.attrs.ctime_ns = ctime_ns
        self._touch(stored)
        self._bind(dirpath, name, fid, ctime_ns)

    def _apply_unlink(self, dirpath: bytes, name: bytes, ctime_ns: int) -> None:
        key = name_key(dirpath, name)
        old = self._get(b"names", key)
        if not old:
            return
        self._set(b"names", key, None)
        self._lose_link(int(FID.unpack(old)[0]), ctime_ns)
        self._dir_changed(dirpath, ctime_ns)

    def _apply_rename(self, src_dir: bytes, src_name: bytes, dst_dir: bytes, dst_name: bytes,
                      ctime_ns: int) -> None:
        src_key = name_key(src_dir, src_name)
        moving = self._get(b"names", src_key)
        if not moving:
            return
        if self._get(b"names", name_key(dst_dir, dst_name)) == moving:
            return  # both names are links to one file: POSIX says do nothing
        self._set(b"names", src_key, None)
        if src_dir != dst_dir:
            self._dir_changed(src_dir, ctime_ns)
        fid = int(FID.unpack(moving)[0])
        self._bind(dst_dir, dst_name, fid, ctime_ns)
        with contextlib.suppress(FileNotFoundError):  # a rename changes its file, as on ext4
            renamed = self.get(fid)
            renamed.attrs.ctime_ns = ctime_ns
            self._touch(renamed)

    def _apply_rename_dir(self, old: bytes, new: bytes) -> None:
        for key in self._names_under(new):
            self._set(b"names", key, None)
        for key, value in self._names_under(old).items():
            moved = new + key[len(old):]
            if len(moved) <= MAX_KEY:
                self._set(b"names", moved, value)
                if self.ownership_depth and value and value != IMPORTED:
                    user = user_of(moved.partition(SEP)[0], self.ownership_depth)
                    if user is not None:
                        self.fid_users[int(FID.unpack(value)[0])] = user
            elif value and value != IMPORTED:
                # Refused where it was made (check_rename_dir); from a peer of an older
                # version, the name is dropped, and its file with it once unused.
                log.error("a directory rename left %r too deep to keep", moved[:80])
                self._lose_link(int(FID.unpack(value)[0]), time.time_ns())
            self._set(b"names", key, None)

    def _apply_drop(self, fid: int) -> None:
        stored = self.files.pop(fid, None)
        if stored is not None:
            self.ram_bytes -= stored.size
            self.journal.note_freed(_blocks_end(stored.size))
        self.dirty_fids.discard(fid)
        self.drops.add(fid)
        if fid in self.awaiting:
            self._await_content(fid, 0)
        user = self.fid_users.pop(fid, None)
        if user is not None:
            self.dropped_users[fid] = user
            if len(self.dropped_users) > DROPPED_USERS_KEPT:
                self.dropped_users.popitem(last=False)
        self._set(b"orphans", FID.pack(fid), None)

    # ---------------------------------------------------------------- commit

    async def run_committer(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                            ) -> None:
        task_status.started()
        while True:
            with trio.move_on_after(self.commit_interval):
                await self._wake.wait()
            self._wake = trio.Event()
            with contextlib.suppress(OSError):  # logged and counted; retried next round
                await self.commit()
            self.evict()

    async def sync(self) -> None:
        """Return once everything written so far is durable (fsync semantics): committed
        to LMDB, or, while a full disk leaves LMDB no room, in fsync'd journal files,
        which replay after a crash. An fsync that fails makes Dovecot give up a save whose
        mail file it already wrote, and the next save trips over that file."""
        target = self.journal.seq
        async with self._commit_lock:
            if self.committed_seq >= target:
                return
            try:
                await self._commit_locked()
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                await trio.to_thread.run_sync(self.journal.sync_files)
                self.stats.journal_fsyncs += 1

    async def commit(self) -> None:
        async with self._commit_lock:
            await self._commit_locked()

    def commit_now(self) -> None:
        """Commit synchronously; only for startup and shutdown, when nothing else runs."""
        batch = self._prepare_batch()
        if batch is None:
            return
        try:
            self._write_txn(batch)
        except OSError:
            self._batch_failed(batch)
            raise
        self._batch_done(batch)

    async def _commit_locked(self) -> None:
        batch = self._prepare_batch()
        if batch is None:
            return
        started = time.monotonic()
        if self._disk_nearly_full(batch, COMMIT_HEADROOM):
            # An attempt would grow LMDB's file into whatever the journal reserve just
            # gave up, and fail anyway: leave that space to the journal.
            self._batch_failed(batch)
            raise OSError(errno.ENOSPC, "no room on the state disk for an LMDB commit")
        try:
            # A prepared batch must end written or put back: cancelled half way, its changes
            # would be in neither LMDB nor (after the next commit) the journal.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._write_txn, batch)
        except BaseException:
            self._batch_failed(batch)
            raise
        self._batch_done(batch)
        self.stats.commit_seconds += time.monotonic() - started

    def _prepare_batch(self) -> Batch | None:
        trim = self.replog_trim_through if self.replog_trim_through >= self.replog_first > 0 \
            else 0
        if (self.journal.seq == self.committed_seq and not self.pending
                and not self.dirty_fids and not self.drops and not trim):
            return None
        generation = self.journal.rotate()
        batch = Batch(seq=self.journal.seq, generation=generation, overlay=self.pending,
                      drops=self.drops, next_fid=self.next_fid, log=list(self.replog_tail),
                      trim_through=trim)
        self.pending, self.drops = {}, set()
        self.committing = batch.overlay
        self.committing_drops = batch.drops
        for fid in self.dirty_fids:
            stored = self.files[fid]
            batch.files.append(FileImage.capture(stored))
            stored.dirty_chunks = set()
            stored.attrs_dirty = False
        self.committing_fids = set(self.dirty_fids)
        self.dirty_fids = set()
        return batch

    def _write_txn(self, batch: Batch) -> None:
        try:
            with self.env.begin(write=True) as txn:
                for (db, key), value in batch.overlay.items():
                    if value is None:
                        txn.delete(key, db=self.dbs[db])
                    else:
                        txn.put(key, value, db=self.dbs[db])
                for fid in batch.drops:
                    self._delete_file(txn, fid)
                for image in batch.files:
                    image.write(txn, self.db_files, self.db_chunks)
                txn.put(b"seq", U64.pack(batch.seq), db=self.db_meta)
                txn.put(b"next_fid", U64.pack(batch.next_fid), db=self.db_meta)
                if batch.log or batch.trim_through:
                    batch.replog = self._write_replog(txn, batch)
        except lmdb.Error as exc:
            code = lmdb_errno(exc)
            if code == errno.EIO and self._disk_nearly_full(batch):
                # LMDB reports a short write as EIO; on a full disk that means ENOSPC.
                code = errno.ENOSPC
            raise OSError(code, f"LMDB commit failed: {exc}") from exc

    def _write_replog(self, txn: lmdb.Transaction, batch: Batch) -> tuple[int, int]:
        """Append the batch's own changes to the log, then drop what every peer has, and
        the oldest entries beyond the size limit (a peer that needed them gets a snapshot).
        Returns the log's new size and first seq."""
        size = self.replog_bytes
        for entry in batch.log:
            value = REPLOG_ENTRY.pack(entry.base_version) + entry.record
            if txn.put(FID.pack(entry.seq), value, db=self.db_replog, overwrite=False):
                size += len(value)
        cursor = txn.cursor(db=self.db_replog)
        first = 0
        while cursor.first():
            seq = int(FID.unpack(cursor.key())[0])
            if seq > batch.trim_through and size <= self.log_limit:
                first = seq
                break
            size -= len(cursor.value())
            cursor.delete()
        size = max(size, 0) if first else 0
        txn.put(b"replog_bytes", U64.pack(size), db=self.db_meta)
        return size, first

    def _disk_nearly_full(self, batch: Batch, headroom: int = 4 << 20) -> bool:
        try:
            vfs = os.statvfs(self.state_dir)
        except OSError:
            return False
        needed = sum(len(c) for image in batch.files for c in image.chunks.values())
        free = (vfs.f_bavail * vfs.f_frsize - self.journal.reserve_loose
                - self.journal.overwrite_loose)  # kept for undos and overwrites
        return free < needed + headroom

    def _delete_file(self, txn: lmdb.Transaction, fid: int) -> None:
        key = FID.pack(fid)
        txn.delete(key, db=self.db_files)
        cursor = txn.cursor(db=self.db_chunks)
        # delete() moves the cursor to the next item, so loop on the current key.
        if cursor.set_range(key):
            while cursor.key()[:8] == key and cursor.delete():
                pass

    def _batch_done(self, batch: Batch) -> None:
        for (db, key), value in batch.overlay.items():
            if db == b"meta" and key.startswith(APPLIED_PREFIX) and value is not None:
                self.committed_applied[key[len(APPLIED_PREFIX):].decode()] = int(
                    U64.unpack(value)[0])
        if batch.replog is not None:
            self.replog_bytes, self.replog_first = batch.replog
            done = len(batch.log)
            if done:
                del self.replog_tail[:done]
        self.committing = {}
        self.committing_fids = set()
        self.committing_drops = set()
        self.committed_seq = batch.seq
        for image in batch.files:
            stored = self.files.get(image.fid)
            if stored is not None:
                stored.committed_size = image.size
        self.journal.remove_through(batch.generation)
        if not self.journal.reserve_whole:
            self.journal.ensure_reserve()
        self.stats.commits += 1
        self.committed.set()
        self.committed = trio.Event()
        if self.stats.last_commit_error:
            log.warning("LMDB commits work again")
            self.stats.last_commit_error = ""

    def _batch_failed(self, batch: Batch) -> None:
        batch.overlay.update(self.pending)
        self.pending = batch.overlay
        self.committing = {}
        self.committing_drops = set()
        self.drops |= batch.drops
        for image in batch.files:
            stored = self.files.get(image.fid)
            if stored is not None:
                stored.dirty_chunks |= image.chunk_indexes
                stored.attrs_dirty = True
                self.dirty_fids.add(image.fid)
        self.committing_fids = set()
        self.stats.commit_errors += 1
        self.stats.last_commit_error = "commit failed (see log)"
        # On a full disk every fsync and every committer round fails: say so every 10 s,
        # not 1,500 times a minute (the count is in status).
        if time.monotonic() - self._commit_error_logged > 10:
            self._commit_error_logged = time.monotonic()
            log.error("LMDB commit of %d changes failed; they stay in RAM and the journal "
                      "(%d failed commits so far)", batch.seq - self.committed_seq,
                      self.stats.commit_errors)

    # ---------------------------------------------------------------- replication log

    def records_after(self, seq: int, max_bytes: int) -> list[LogEntry]:
        """This node's changes after `seq`, in order, about `max_bytes` of them.

        A SKIP record stands for the seqs it skips. Raises NeedSnapshot when the next
        change is no longer in the log (trimmed beyond the size limit), or `seq` lies in a
        skipped range (the peer has changes this node lost).
        """
        wanted = seq + 1
        found: list[LogEntry] = []
        size = 0
        tail = self.replog_tail
        tail_first = tail[0].seq if tail else self.journal.seq + 1
        if wanted < tail_first:
            if not self.replog_first or wanted < self.replog_first:
                raise NeedSnapshot(f"change {wanted} is no longer in the replication log")
            with self.env.begin(db=self.db_replog) as txn:
                cursor = txn.cursor()
                if cursor.set_range(FID.pack(wanted)):
                    for key, value in cursor:
                        logged = int(FID.unpack(key)[0])
                        if logged != wanted:
                            break
                        entry = LogEntry(logged, REPLOG_ENTRY.unpack_from(value)[0],
                                         bytes(value[REPLOG_ENTRY.size:]))
                        found.append(entry)
                        wanted = next_seq(entry)
                        size += len(value)
                        if size >= max_bytes or wanted >= tail_first:
                            break
            if size >= max_bytes:
                return found
            if wanted < tail_first and wanted <= self.journal.seq:
                if found:
                    return found
                raise NeedSnapshot(f"change {wanted} is missing from the replication log")
        index = bisect.bisect_left(tail, wanted, key=lambda entry: entry.seq)
        if index == len(tail) or tail[index].seq != wanted:
            if found or wanted > self.journal.seq:
                return found
            raise NeedSnapshot(f"change {wanted} was skipped or is missing")
        for entry in tail[index:]:
            if entry.seq != wanted:
                break
            found.append(entry)
            wanted = next_seq(entry)
            size += len(entry.record)
            if size >= max_bytes:
                break
        return found

    async def replace_state(self, install: Callable[[], int], origin_seqs: dict[str, int]
                            ) -> None:
        """Swap in a peer's snapshot: `install` (run in a thread) writes it into LMDB and
        returns the next free file id.

        Own changes the snapshot lacks (made here while it travelled) are re-applied on top
        from the replication log, which keeps them until every peer has them; the install
        transaction records the snapshot's own seq, so a crash before the re-applied
        changes are committed re-applies them at the next mount. Local changes wait
        (`wait_installed`) until that commit, and are refused (EAGAIN) if one comes anyway.
        If the log no longer has them: SnapshotStale, and nothing changes.
        """
        async with self._commit_lock:
            self.installing = True
            self.install_done = trio.Event()
            try:
                await self._commit_locked()
                known = origin_seqs.get(self.node_id, 0)
                if not self.can_reapply_after(known):
                    raise SnapshotStale(f"the snapshot has this node's changes only up to "
                                        f"{known}, and the log no longer reaches back there")
                next_fid = await trio.to_thread.run_sync(install)
                self.files.clear()
                self.ram_bytes = 0
                self.dirty_fids.clear()
                self.drops.clear()
                self.pending.clear()
                # Never below the fids of lock files alive here (`reserve_fid`).
                self.next_fid = self._past_reserved(next_fid)
                self._load_ownership()
                self.committed_applied = {
                    origin: seq for origin, seq in origin_seqs.items()
                    if origin != self.node_id
                }
                self.applied = dict(self.committed_applied)
                own = self.journal.seq
                self.committed_seq = known
                reapplied = self._reapply_logged(known)
                self.skip_to(max(known, own))
                if reapplied > known:
                    log.info("re-applied %d own changes the snapshot did not have yet",
                             reapplied - known)
                await self._commit_locked()
            finally:
                self.installing = False
                self.install_done.set()
            self.committed.set()  # the installed applied seqs are committed: ack them
            self.committed = trio.Event()

    async def wait_installed(self, timeout: float) -> None:
        """Let a local change wait out a snapshot install instead of failing.

        Called before a request checks anything: no await may come between its check and
        its change. After `timeout` the change is tried anyway and gets EAGAIN.
        """
        with trio.move_on_after(timeout):
            while self.installing:
                await self.install_done.wait()

    def can_reapply_after(self, seq: int) -> bool:
        """Whether every own change after `seq` is still in the replication log."""
        if self.journal.seq <= seq:
            return True
        try:
            self.records_after(seq, 1)
        except NeedSnapshot:
            return False
        return True

    def acknowledged_by_all(self, seq: int) -> None:
        """Every peer has `seq`: the log up to it can go at the next commit."""
        if seq > self.replog_trim_through:
            self.replog_trim_through = seq

    def all_names(self) -> set[tuple[bytes, bytes]]:
        return {
            (key.partition(SEP)[0], key.partition(SEP)[2])
            for key, value in self._scan(b"names", b"").items() if value
        }

    # ---------------------------------------------------------------- status

    def counts(self) -> dict[str, int]:
        with self.env.begin() as txn:
            files = txn.stat(self.db_files)["entries"]
            names = txn.stat(self.db_names)["entries"]
        info = self.env.info()
        stat = self.env.stat()
        used = (info["last_pgno"] + 1) * stat["psize"]
        return {
            "replicated_files": int(files),
            "replicated_names": int(names),
            "lmdb_bytes": int(used),
            "lmdb_map_bytes": int(info["map_size"]),
            "ram_cache_files": len(self.files),
            "ram_cache_bytes": self.ram_bytes,
            "ram_budget_bytes": self.ram_budget,
            "dirty_files": len(self.dirty_fids),
            "journal_bytes": self.journal.size(),
            "journal_seq": self.journal.seq,
            "committed_seq": self.committed_seq,
            "replog_bytes": self.replog_bytes + sum(len(e.record) for e in self.replog_tail),
            "replog_first_seq": self.replog_first or (
                self.replog_tail[0].seq if self.replog_tail else 0),
        }

    def all_files(self) -> Iterator[tuple[bytes, bytes, int]]:
        """(dirpath, name, fid) for every replicated name (for export)."""
        for key, value in self._scan(b"names", b"").items():
            if not value:
                continue
            dirpath, _, name = key.rpartition(SEP)
            yield dirpath, name, int(FID.unpack(value)[0])


@dataclass
class FileImage:
    """The bytes of one dirty file as they were when its commit began."""

    fid: int
    attrs: bytes
    size: int
    chunks: dict[int, bytes]
    stale_chunks: range
    chunk_indexes: set[int]

    @classmethod
    def capture(cls, stored: StoredFile) -> FileImage:
        size = stored.size
        live = nchunks(size)
        chunks = {
            index: bytes(stored.content[index * CHUNK:(index + 1) * CHUNK])
            for index in stored.dirty_chunks if index < live
        }
        stale = range(live, max(live, nchunks(stored.committed_size)))
        return cls(stored.fid, pack_file(stored.attrs, stored.version), size, chunks, stale,
                   set(stored.dirty_chunks))

    def write(self, txn: lmdb.Transaction, db_files: lmdb._Database,
              db_chunks: lmdb._Database) -> None:
        txn.put(FID.pack(self.fid), self.attrs, db=db_files)
        for index, data in self.chunks.items():
            txn.put(CHUNK_KEY.pack(self.fid, index), data, db=db_chunks)
        for index in self.stale_chunks:
            txn.delete(CHUNK_KEY.pack(self.fid, index), db=db_chunks)


@dataclass
class Batch:
    seq: int
    generation: int
    overlay: Overlay
    drops: set[int]
    next_fid: int
    log: list[LogEntry] = field(default_factory=list)
    trim_through: int = 0
    files: list[FileImage] = field(default_factory=list)
    replog: tuple[int, int] | None = None  # the log's size and first seq after the commit
