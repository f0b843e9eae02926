"""Who may change a user's replicated files: owners, epochs, takeovers (no I/O here).

Every user directory (the first `depth` path components, e.g. `alice` or
`example.com/alice`) has one owner node at a time, with an epoch. A node's first change
to a user it does not own is a *takeover*: a journaled OWN record with the next epoch and
a manifest of the user's whole state on the taking node (every name, file id, version,
attributes and an xxh3 of the content), followed by OWN_DATA records with the content.
Every node applies it the same way: the user's files become exactly the manifest's, so
nodes that diverged (two writers from one base) converge on the taker's bytes.

Ordering between competing takeovers is (epoch, node id), the same on every node, so the
winner does not depend on which stream arrives first. A change from a node that does not
own the user is *fenced*: refused everywhere, counted and logged, unless the current
owner's takeover says it already covers that change (`covered`: the seq of each origin
the taker had applied when it took over).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import xxhash

from mailfs.cachemgr.records import ATTRS, Attrs, Op, Record, key_problem, name_problem

U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
# A manifest entry: fid, version, content xxh3, attrs, then dirpath and name (u32-prefixed).
ENTRY_HEAD = struct.Struct("<QQQ")
OWNER_HEAD = struct.Struct("<QQB")  # epoch, time_ns, lost here
MAX_MANIFEST_ENTRIES = 1 << 22
# OWN_DATA records carry content in pieces no larger than this, so that each fits a frame.
DATA_PIECE = 4 << 20
# Changes that no owner decides about: markers, forgetting unused files, seq jumps.
UNOWNED_OPS = frozenset({Op.MARK_IMPORTED, Op.REMOVE_DIR, Op.DROP, Op.SKIP})
FID_OPS = frozenset({Op.WRITE, Op.TRUNCATE, Op.SETATTR, Op.LINK})


def user_of(dirpath: bytes, depth: int) -> bytes | None:
    """The user directory a directory path lies in, or None above the user level."""
    if depth <= 0 or not dirpath:
        return None
    parts = dirpath.split(b"/", depth)
    if len(parts) < depth:
        return None
    return b"/".join(parts[:depth])


def in_user(dirpath: bytes, user: bytes) -> bool:
    return dirpath == user or dirpath.startswith(user + b"/")


def record_dirpaths(op: Op, fields: tuple[object, ...]) -> list[bytes]:
    """The directories whose names a change touches (not the file a fid names)."""
    match op:
        case Op.CREATE | Op.PUT | Op.LINK:
            return [fields[1]]  # type: ignore[list-item]
        case Op.UNLINK:
            return [fields[0]]  # type: ignore[list-item]
        case Op.RENAME:
            return [fields[0], fields[2]]  # type: ignore[list-item]
        case Op.RENAME_DIR:
            return [fields[0], fields[1]]  # type: ignore[list-item]
    return []


@dataclass(slots=True)
class Owner:
    node: str
    epoch: int
    time_ns: int
    # Seq of each origin the taker had applied: those origins' changes up to there are in
    # the takeover's manifest already.
    covered: dict[str, int] = field(default_factory=dict)
    # This node owned the user once and another took it over: writes here are refused
    # until an explicit `mailfs takeover` (local only, never replicated).
    lost: bool = False

    def rank(self) -> tuple[int, str]:
        return (self.epoch, self.node)

    def pack(self) -> bytes:
        node = self.node.encode()
        return (OWNER_HEAD.pack(self.epoch, self.time_ns, int(self.lost))
                + U32.pack(len(node)) + node + pack_seq_map(self.covered))

    @classmethod
    def unpack(cls, raw: bytes) -> Owner:
        """Raises ValueError on a damaged value."""
        try:
            epoch, time_ns, lost = OWNER_HEAD.unpack_from(raw, 0)
            pos = OWNER_HEAD.size
            (length,) = U32.unpack_from(raw, pos)
            pos += U32.size
            node = raw[pos:pos + length].decode()
            return cls(node, epoch, time_ns, unpack_seq_map(raw[pos + length:]), bool(lost))
        except struct.error as exc:
            raise ValueError(f"damaged owner record: {exc}") from exc


def pack_seq_map(seqs: dict[str, int]) -> bytes:
    parts = [U32.pack(len(seqs))]
    for origin, seq in sorted(seqs.items()):
        raw = origin.encode()
        parts += [U32.pack(len(raw)), raw, U64.pack(seq)]
    return b"".join(parts)


def unpack_seq_map(raw: bytes) -> dict[str, int]:
    try:
        return _unpack_seq_map(raw)
    except struct.error as exc:
        raise ValueError(f"damaged seq map: {exc}") from exc


def _unpack_seq_map(raw: bytes) -> dict[str, int]:
    view = memoryview(raw)
    (count,) = U32.unpack_from(view, 0)
    pos = U32.size
    seqs: dict[str, int] = {}
    for _ in range(count):
        (length,) = U32.unpack_from(view, pos)
        pos += U32.size
        if pos + length + U64.size > len(view):
            raise ValueError("seq map runs past its field")
        origin = bytes(view[pos:pos + length]).decode()
        pos += length
        seqs[origin] = U64.unpack_from(view, pos)[0]
        pos += U64.size
    if pos != len(view):
        raise ValueError("stray bytes after a seq map")
    return seqs


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    """One name under the user; fid 0 with an empty name is a directory's import marker.
    A file with several names has one entry per name, all with the same fid."""

    dirpath: bytes
    name: bytes
    fid: int
    version: int
    digest: int
    attrs: Attrs


def data_pieces(entries: list[ManifestEntry]) -> int:
    """How many OWN_DATA records follow a takeover with this manifest."""
    sizes = {entry.fid: entry.attrs.size for entry in entries if entry.fid}
    return sum(-(-size // DATA_PIECE) for size in sizes.values())


def content_digest(content: bytes | bytearray) -> int:
    return int(xxhash.xxh3_64_intdigest(content))


def pack_manifest(entries: list[ManifestEntry]) -> bytes:
    parts = [U32.pack(len(entries))]
    for entry in entries:
        parts += [ENTRY_HEAD.pack(entry.fid, entry.version, entry.digest), entry.attrs.pack(),
                  U32.pack(len(entry.dirpath)), entry.dirpath,
                  U32.pack(len(entry.name)), entry.name]
    return b"".join(parts)


def unpack_manifest(raw: bytes) -> list[ManifestEntry]:
    """Raises ValueError on anything a node could not have written."""
    view = memoryview(raw)
    try:
        (count,) = U32.unpack_from(view, 0)
        if count > MAX_MANIFEST_ENTRIES:
            raise ValueError(f"a manifest of {count} entries")
        pos = U32.size
        entries = []
        for _ in range(count):
            fid, version, digest = ENTRY_HEAD.unpack_from(view, pos)
            pos += ENTRY_HEAD.size
            attrs = Attrs.unpack(view[pos:pos + ATTRS.size])
            texts, pos = read_blobs(view, pos + ATTRS.size, 2)
            entries.append(ManifestEntry(texts[0], texts[1], fid, version, digest, attrs))
    except struct.error as exc:
        raise ValueError(f"truncated manifest: {exc}") from exc
    if pos != len(view):
        raise ValueError("stray bytes after the manifest")
    return entries


def read_blobs(view: memoryview, pos: int, count: int) -> tuple[list[bytes], int]:
    """`count` u32-length-prefixed byte strings from `pos`; and the position after them."""
    blobs = []
    for _ in range(count):
        (length,) = U32.unpack_from(view, pos)
        pos += U32.size
        if pos + length > len(view):
            raise ValueError("a byte string runs past its field")
        blobs.append(bytes(view[pos:pos + length]))
        pos += length
    return blobs, pos


def own_problem(record: Record, depth: int) -> str | None:
    """Why a peer's OWN record could not come from a mailfs node, or None."""
    user, node, _epoch, _time, covered, manifest = record.fields
    assert isinstance(user, bytes) and isinstance(node, bytes)
    assert isinstance(covered, bytes) and isinstance(manifest, bytes)
    if user_of(user, depth) != user:
        return f"OWN of {user!r}, which is not a user directory at depth {depth}"
    try:
        node.decode()
        unpack_seq_map(covered)
        entries = unpack_manifest(manifest)
    except (ValueError, UnicodeDecodeError, struct.error) as exc:
        return f"OWN with a damaged field: {exc}"
    for entry in entries:
        if not in_user(entry.dirpath, user):
            return f"OWN of {user!r} lists a name outside it"
        for part in entry.dirpath.split(b"/"):
            if name_problem(part) is not None:
                return f"OWN lists a directory path with {name_problem(part)}"
        if (entry.name or entry.fid) and name_problem(entry.name) is not None:
            return f"OWN lists {name_problem(entry.name)}"
        if key_problem(entry.dirpath, entry.name) is not None:
            return f"OWN lists {key_problem(entry.dirpath, entry.name)}"
        if entry.fid and entry.attrs.size > 1 << 30:
            return "OWN lists a file larger than 1 GiB"
    return None


BE64 = struct.Struct(">Q")
LOSER_HEAD = struct.Struct("<QQQQ")  # fid, version, epoch, time_ns


@dataclass(slots=True)
class LosingVersion:
    """A file's content on this node that a takeover replaced (or removed): kept in the
    `conflicts` DB so that an admin can look at it (`mailfs conflicts`)."""

    user: bytes
    path: bytes
    fid: int
    version: int
    winner: str
    epoch: int
    time_ns: int
    attrs: Attrs
    content: bytes

    def key(self) -> bytes:
        # The takeover's own time: replaying the same takeover keeps the same key.
        return BE64.pack(self.time_ns) + BE64.pack(self.fid) + self.user

    def pack(self) -> bytes:
        texts = b"".join(U32.pack(len(t)) + t
                         for t in (self.user, self.path, self.winner.encode(), self.content))
        return (LOSER_HEAD.pack(self.fid, self.version, self.epoch, self.time_ns)
                + self.attrs.pack() + texts)

    @classmethod
    def unpack(cls, raw: bytes) -> LosingVersion:
        fid, version, epoch, time_ns = LOSER_HEAD.unpack_from(raw, 0)
        pos = LOSER_HEAD.size
        attrs = Attrs.unpack(raw[pos:pos + ATTRS.size])
        texts, _ = read_blobs(memoryview(raw), pos + ATTRS.size, 4)
        return cls(texts[0], texts[1], fid, version, texts[2].decode(), epoch, time_ns,
                   attrs, texts[3])


@dataclass
class OwnershipStats:
    takeovers: int = 0            # takeovers applied here (own and peers')
    last_takeover: str = ""
    stale_takeovers: int = 0      # a peer's takeover that lost to one applied before
    fenced_changes: int = 0       # peers' changes refused: their origin did not own the user
    last_fenced: str = ""
    covered_changes: int = 0      # old owners' changes that a takeover already carried
    refused_writes: int = 0       # local writes refused (user lost here, or no majority)
    last_refused: str = ""
