"""Journal records: the changes made to replicated files, and their byte encoding.

No I/O here. A record is encoded as
    u32 length | u64 xxh3 of the body | body
and the body is
    u64 seq | u8 op | fields...
Byte strings inside the body are u32-length-prefixed. The same change records are what
replication streams to peers, so they name files by file id and paths by directory + name.
"""

from __future__ import annotations

import enum
import itertools
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import xxhash

HEADER = struct.Struct("<IQ")
SEQ_OP = struct.Struct("<QB")
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
ATTRS = struct.Struct("<IIIIQqqq")
MAX_RECORD = 1 << 30


class Op(enum.IntEnum):
    CREATE = 1
    WRITE = 2
    TRUNCATE = 3
    SETATTR = 4
    LINK = 5
    UNLINK = 6
    RENAME = 7
    RENAME_DIR = 8
    DROP = 9
    PUT = 10
    MARK_IMPORTED = 11
    REMOVE_DIR = 12
    # Snapshot entries only (never journaled): a whole file with its version, and a name.
    SNAP_FILE = 13
    SNAP_NAME = 14
    # Journal only: a peer's change, journaled here so that replay keeps its place among
    # this node's own changes (it does not take a seq of this node).
    REMOTE = 15
    # Own seqs after this record's continue after field 0: nothing was ever made in
    # between (seqs a machine crash may have lost, or that a peer has from before it).
    SKIP = 16
    # A node takes over a user directory (see ownership.py): its manifest, then the
    # content of its files in OWN_DATA pieces.
    OWN = 17
    OWN_DATA = 18
    # Snapshot entries only: a user directory's owner.
    SNAP_OWNER = 19


@dataclass(slots=True)
class Attrs:
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int

    def pack(self) -> bytes:
        return ATTRS.pack(
            self.mode, self.uid, self.gid, self.nlink, self.size,
            self.atime_ns, self.mtime_ns, self.ctime_ns,
        )

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> Attrs:
        return cls(*ATTRS.unpack(raw))

    def copy(self) -> Attrs:
        return Attrs(
            self.mode, self.uid, self.gid, self.nlink, self.size,
            self.atime_ns, self.mtime_ns, self.ctime_ns,
        )


# Field layouts per op: "q" = u64, "b" = bytes, "a" = Attrs.
LAYOUT: dict[Op, str] = {
    Op.CREATE: "qbba",      # fid, dirpath, name, attrs
    Op.WRITE: "qqqb",       # fid, offset, mtime_ns, data
    Op.TRUNCATE: "qqq",     # fid, size, mtime_ns
    Op.SETATTR: "qa",       # fid, attrs
    Op.LINK: "qbbq",        # fid, dirpath, name, ctime_ns
    Op.UNLINK: "bbq",       # dirpath, name, ctime_ns
    Op.RENAME: "bbbbq",     # src dir, src name, dst dir, dst name, ctime_ns
    Op.RENAME_DIR: "bb",    # old dirpath, new dirpath
    Op.DROP: "q",           # fid
    Op.PUT: "qbbab",        # fid, dirpath, name, attrs, content
    Op.MARK_IMPORTED: "b",  # dirpath
    Op.REMOVE_DIR: "b",     # dirpath
    Op.SNAP_FILE: "qqab",   # fid, version, attrs, content
    Op.SNAP_NAME: "bbq",    # dirpath, name, fid (0: the directory's import marker)
    Op.REMOTE: "bqqb",      # origin node id, its seq, base version, the encoded record
    Op.SKIP: "q",           # the last seq skipped
    Op.OWN: "bbqqbb",       # user dirpath, node id, epoch, time_ns, covered seqs, manifest
    Op.OWN_DATA: "qqqb",    # fid, version, offset, data
    Op.SNAP_OWNER: "bb",    # user dirpath, packed owner
}

# Which fields of each op are directory paths ("d") and file names ("n").
PATH_FIELDS: dict[Op, tuple[tuple[int, str], ...]] = {
    Op.CREATE: ((1, "d"), (2, "n")),
    Op.PUT: ((1, "d"), (2, "n")),
    Op.LINK: ((1, "d"), (2, "n")),
    Op.UNLINK: ((0, "d"), (1, "n")),
    Op.RENAME: ((0, "d"), (1, "n"), (2, "d"), (3, "n")),
    Op.RENAME_DIR: ((0, "D"), (1, "D")),
    Op.MARK_IMPORTED: ((0, "d"),),
    Op.REMOVE_DIR: ((0, "d"),),
    Op.SNAP_NAME: ((0, "d"),),
}
MAX_NAME = 255
# LMDB's limit on a key as py-lmdb builds it; a name is keyed by its dirpath, NUL and name.
MAX_KEY = 511


def key_problem(dirpath: bytes, name: bytes) -> str | None:
    """Why a name cannot be kept in the store (too deep for a key), or None."""
    length = len(dirpath) + 1 + len(name)
    if length > MAX_KEY:
        return f"a path of {length} bytes (the store keeps paths up to {MAX_KEY})"
    return None


def name_problem(name: bytes) -> str | None:
    if not name:
        return "an empty name"
    if b"/" in name or b"\0" in name:
        return f"name {name!r} contains '/' or NUL"
    if name in (b".", b".."):
        return f"name {name!r}"
    if len(name) > MAX_NAME:
        return f"a name of {len(name)} bytes"
    return None


def path_problem(record: Record) -> str | None:
    """Why a record's names could not come from a kernel (a lying or broken peer), or None.

    Names are applied to this node's tree and written to disk by `mailfs export`, so one
    with '..' or '/' would reach outside the mount.
    """
    for index, kind in PATH_FIELDS.get(record.op, ()):
        value = record.fields[index]
        assert isinstance(value, bytes)
        if kind == "n":
            problem = name_problem(value)
        elif not value:
            problem = None if kind == "d" else "an empty directory path"
        else:
            problem = next(filter(None, map(name_problem, value.split(b"/"))), None)
        if problem is not None:
            return f"{record.op.name} with {problem}"
    fields = PATH_FIELDS.get(record.op, ())
    for (dir_index, dir_kind), (name_index, name_kind) in itertools.pairwise(fields):
        if dir_kind == "d" and name_kind == "n":
            problem = key_problem(record.fields[dir_index], record.fields[name_index])  # type: ignore[arg-type]
            if problem is not None:
                return f"{record.op.name} with {problem}"
    if record.op is Op.SNAP_NAME:
        name, fid = record.fields[1], record.fields[2]
        assert isinstance(name, bytes)
        if name or fid:  # the empty name with fid 0 is a directory's import marker
            problem = name_problem(name)
            if problem is not None:
                return f"SNAP_NAME with {problem}"
        dirpath = record.fields[0]
        assert isinstance(dirpath, bytes)
        problem = key_problem(dirpath, name)
        if problem is not None:
            return f"SNAP_NAME with {problem}"
    return None

Field = int | bytes | Attrs


class CorruptRecord(ValueError):
    """A record whose checksum or structure is wrong; nothing in it may be applied."""


@dataclass(slots=True)
class Record:
    seq: int
    op: Op
    fields: tuple[Field, ...]


def encode(record: Record) -> bytes:
    parts = [SEQ_OP.pack(record.seq, record.op)]
    for kind, value in zip(LAYOUT[record.op], record.fields, strict=True):
        if kind == "q":
            assert isinstance(value, int)
            parts.append(U64.pack(value))
        elif kind == "b":
            assert isinstance(value, bytes | bytearray | memoryview)
            parts.append(U32.pack(len(value)))
            parts.append(bytes(value))
        else:
            assert isinstance(value, Attrs)
            parts.append(value.pack())
    body = b"".join(parts)
    return HEADER.pack(len(body), xxhash.xxh3_64_intdigest(body)) + body


def decode_body(body: bytes | memoryview) -> Record:
    view = memoryview(body)
    try:
        seq, op_value = SEQ_OP.unpack_from(view, 0)
        op = Op(op_value)
    except (struct.error, ValueError) as exc:
        raise CorruptRecord(f"bad record head: {exc}") from exc
    pos = SEQ_OP.size
    fields: list[Field] = []
    try:
        for kind in LAYOUT[op]:
            if kind == "q":
                fields.append(U64.unpack_from(view, pos)[0])
                pos += 8
            elif kind == "b":
                (length,) = U32.unpack_from(view, pos)
                pos += 4
                if pos + length > len(view):
                    raise CorruptRecord("byte field runs past the record")
                fields.append(bytes(view[pos:pos + length]))
                pos += length
            else:
                fields.append(Attrs.unpack(view[pos:pos + ATTRS.size]))
                pos += ATTRS.size
    except struct.error as exc:
        raise CorruptRecord(f"truncated {op.name} record") from exc
    if pos != len(view):
        raise CorruptRecord(f"{len(view) - pos} stray bytes after {op.name} record")
    return Record(seq, op, tuple(fields))


def decode_stream(data: bytes) -> Iterator[Record]:
    """Decode records until the data ends or a record is torn or corrupt.

    A torn tail is normal after a machine crash (the journal is not fsync'd): records are
    yielded in order and iteration ends quietly at an incomplete last record. A complete
    record whose checksum or structure is wrong raises CorruptRecord.
    """
    view = memoryview(data)
    pos = 0
    while pos + HEADER.size <= len(view):
        length, checksum = HEADER.unpack_from(view, pos)
        if length > MAX_RECORD:
            raise CorruptRecord(f"record length {length} exceeds the limit")
        end = pos + HEADER.size + length
        if end > len(view):
            return  # torn tail
        body = view[pos + HEADER.size:end]
        if xxhash.xxh3_64_intdigest(body) != checksum:
            raise CorruptRecord(f"checksum mismatch at byte {pos}")
        yield decode_body(body)
        pos = end


def decode_one(data: bytes | memoryview) -> Record:
    """Exactly one complete record (as journaled, with its header); anything else raises."""
    view = memoryview(data)
    if len(view) < HEADER.size:
        raise CorruptRecord("record shorter than its header")
    length, checksum = HEADER.unpack_from(view, 0)
    if length != len(view) - HEADER.size:
        raise CorruptRecord(f"record length {length} does not match its {len(view)} bytes")
    body = view[HEADER.size:]
    if xxhash.xxh3_64_intdigest(body) != checksum:
        raise CorruptRecord("record checksum mismatch")
    return decode_body(body)


SKIP_OP_OFFSET = HEADER.size + U64.size  # where the op byte sits in an encoded record


def skipped_through(encoded: bytes) -> int | None:
    """For an encoded SKIP record, the last seq it skips; None for any other record."""
    if len(encoded) > SKIP_OP_OFFSET and encoded[SKIP_OP_OFFSET] == Op.SKIP:
        return int(decode_one(encoded).fields[0])  # type: ignore[arg-type]
    return None
