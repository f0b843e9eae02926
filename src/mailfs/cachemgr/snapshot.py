"""Snapshots of the replicated store: for a peer that is new, or too far behind the log.

A snapshot is a stream of records (see records.py): one SNAP_FILE per live file, with
its version and content, one SNAP_NAME per name and import marker, and one SNAP_OWNER per
owned user directory. It is written from
one LMDB read transaction, so it is a consistent picture of the last commit, and writers
are never stopped: LMDB readers do not block the writer.

Installing replaces the store's files, names and applied seqs in one write transaction,
so a crash during the install leaves the old state, never a mixture.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import lmdb
import xxhash

from mailfs.cachemgr.metastore import (
    APPLIED_PREFIX,
    AWAITING_PREFIX,
    CHUNK,
    CHUNK_KEY,
    FID,
    SEP,
    U64,
    MetaStore,
    lmdb_errno,
    pack_file,
    unpack_file,
)
from mailfs.cachemgr.ownership import Owner
from mailfs.cachemgr.records import (
    HEADER,
    MAX_RECORD,
    Attrs,
    CorruptRecord,
    Op,
    Record,
    decode_body,
    encode,
    path_problem,
)
from mailfs.replication.identity import fid_namespace

log = logging.getLogger(__name__)


def write_snapshot(store: MetaStore, out: BinaryIO) -> dict[str, int]:
    """Write the committed state to `out`; returns each origin's seq it includes.

    Runs in a worker thread: it only reads LMDB.
    """
    with store.env.begin() as txn:
        origin_seqs = store._read_applied(txn)
        origin_seqs[store.node_id] = store._meta_int(txn, b"seq")
        files = txn.cursor(db=store.db_files)
        chunks = txn.cursor(db=store.db_chunks)
        for key, raw in files:
            attrs, version = unpack_file(raw)
            if attrs.nlink == 0:
                continue  # open somewhere, unlinked everywhere: not part of the tree
            fid = int(FID.unpack(key)[0])
            content = bytearray()
            if chunks.set_range(bytes(key)):
                for chunk_key, chunk in chunks:
                    if chunk_key[:8] != key:
                        break
                    content += chunk
            del content[attrs.size:]
            content.extend(bytes(attrs.size - len(content)))
            out.write(encode(Record(0, Op.SNAP_FILE, (fid, version, attrs, bytes(content)))))
        for key, value in txn.cursor(db=store.db_names):
            dirpath, _, name = bytes(key).partition(SEP)
            fid = int(FID.unpack(value)[0]) if value else 0
            out.write(encode(Record(0, Op.SNAP_NAME, (dirpath, name, fid))))
        for key, value in txn.cursor(db=store.db_owners):
            owner = Owner.unpack(bytes(value))
            owner.lost = False  # the receiver's own business
            out.write(encode(Record(0, Op.SNAP_OWNER, (bytes(key), owner.pack()))))
    return origin_seqs


def read_records(source: BinaryIO) -> Iterator[Record]:
    """The records of a snapshot file; any damage raises CorruptRecord."""
    while True:
        head = source.read(HEADER.size)
        if not head:
            return
        if len(head) < HEADER.size:
            raise CorruptRecord("snapshot ends inside a record header")
        length, checksum = HEADER.unpack(head)
        if length > MAX_RECORD:
            raise CorruptRecord(f"snapshot record length {length} exceeds the limit")
        body = source.read(length)
        if len(body) != length:
            raise CorruptRecord("snapshot ends inside a record")
        if xxhash.xxh3_64_intdigest(body) != checksum:
            raise CorruptRecord("snapshot record checksum mismatch")
        yield decode_body(body)


def install_snapshot(store: MetaStore, path: Path, origin_seqs: dict[str, int]) -> int:
    """Replace files, names and applied seqs with the snapshot's, in one transaction.

    Runs in a worker thread while the store refuses changes (`store.installing`).
    Returns the next free file id in this node's namespace.
    """
    next_fid = store.next_fid
    try:
        with store.env.begin(write=True) as txn, open(path, "rb") as source:
            lost_before = {bytes(user) for user, value in txn.cursor(db=store.db_owners)
                           if _lost_here(store, Owner.unpack(bytes(value)))}
            for db in (store.db_files, store.db_chunks, store.db_names, store.db_orphans,
                       store.db_owners):
                txn.drop(db, delete=False)
            cursor = txn.cursor(db=store.db_meta)
            for prefix in (APPLIED_PREFIX, AWAITING_PREFIX):
                if cursor.set_range(prefix):
                    while cursor.key().startswith(prefix) and cursor.delete():
                        pass
            for record in read_records(source):
                next_fid = _install_record(store, txn, record, next_fid, lost_before)
            for origin, seq in origin_seqs.items():
                if origin != store.node_id:
                    txn.put(APPLIED_PREFIX + origin.encode(), U64.pack(seq), db=store.db_meta)
            txn.put(b"next_fid", U64.pack(next_fid), db=store.db_meta)
            # Own changes after this seq are re-applied from the replication log.
            txn.put(b"seq", U64.pack(origin_seqs.get(store.node_id, 0)), db=store.db_meta)
    except lmdb.Error as exc:
        raise OSError(lmdb_errno(exc), f"installing the snapshot failed: {exc}") from exc
    return next_fid


def _lost_here(store: MetaStore, owner: Owner) -> bool:
    return owner.lost or owner.node == store.node_id


def _install_record(store: MetaStore, txn: lmdb.Transaction, record: Record,
                    next_fid: int, lost_before: set[bytes]) -> int:
    f = record.fields
    if record.op is Op.SNAP_FILE:
        fid, version, attrs, content = f
        assert isinstance(fid, int) and isinstance(version, int)
        assert isinstance(attrs, Attrs) and isinstance(content, bytes)
        if len(content) != attrs.size:
            raise CorruptRecord(f"snapshot file {fid:#x} has {len(content)} bytes, "
                                f"its attributes say {attrs.size}")
        txn.put(FID.pack(fid), pack_file(attrs, version), db=store.db_files)
        for index in range(0, len(content), CHUNK):
            txn.put(CHUNK_KEY.pack(fid, index // CHUNK), content[index:index + CHUNK],
                    db=store.db_chunks)
        if fid_namespace(fid) == store.namespace:
            next_fid = max(next_fid, fid + 1)
    elif record.op is Op.SNAP_NAME:
        dirpath, name, fid = f
        assert isinstance(dirpath, bytes) and isinstance(name, bytes) and isinstance(fid, int)
        problem = path_problem(record)
        if problem is not None:
            raise CorruptRecord(f"impossible name in the snapshot: {problem}")
        txn.put(dirpath + SEP + name, FID.pack(fid) if fid else b"", db=store.db_names)
    elif record.op is Op.SNAP_OWNER:
        user, packed = f
        assert isinstance(user, bytes) and isinstance(packed, bytes)
        try:
            owner = Owner.unpack(packed)
        except (ValueError, UnicodeDecodeError, IndexError) as exc:
            raise CorruptRecord(f"damaged owner of {user!r} in the snapshot: {exc}") from exc
        # A user this node owned, and that the sender says another node owns now, is lost
        # here, as if the takeover had arrived as a change.
        owner.lost = user in lost_before and owner.node != store.node_id
        txn.put(user, owner.pack(), db=store.db_owners)
    else:
        raise CorruptRecord(f"{record.op.name} record inside a snapshot")
    return next_fid


def snapshot_path(store: MetaStore, direction: str, ident: int) -> Path:
    return store.state_dir / f"snapshot-{direction}-{ident}.tmp"


def remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc.strerror)
