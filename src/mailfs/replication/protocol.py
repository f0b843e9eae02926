"""The replication wire protocol: frames, messages and a per-connection state machine.

No I/O here: no sockets, no trio, no files. The transport feeds received bytes into a
`Session` (or a bare `Decoder`) and writes out the bytes that `Session.send` returns.

Frame format (little endian)::

    u32 payload_length | u8 message_type | u64 xxh3_64(type byte + payload) | payload

Why this shape:

- **Bounded memory.** The length comes first so that an oversized frame is refused as soon
  as its first four bytes arrive, before any of it is buffered. The limit is per `Decoder`
  (`MAX_FRAME_DEFAULT` = 16 MiB). Every count inside a payload (map entries, changes in a
  batch) has an absolute limit and must also fit in the bytes that remain, so a garbled
  count can never make us allocate a huge list.
- **Integrity before parse.** The checksum covers the type byte and the payload, and it is
  verified before the payload is looked at. A flipped bit, a torn frame or a frame boundary
  shifted by a corrupt length is therefore a checksum mismatch, never a wrong message.
  Only frames that pass the checksum are parsed, and parsing is strict: every byte must be
  accounted for, strings must be valid UTF-8 and names must be plausible node ids.
- **Any error is final.** A `ProtocolError` leaves the decoder (and the session) unusable;
  the connection is closed and the sender later resumes from what the receiver says it has
  applied, so nothing half-received is ever applied.

Field encodings inside payloads: integers are u64 (u32 for lengths, counts and the
protocol version), byte strings and UTF-8 strings are u32-length-prefixed, and maps of
node id to seq are a u32 count followed by (string, u64) pairs.

Messages:

- `Hello` (client to server, first frame): a magic so a non-mailfs client is refused, the
  protocol version, node identity, cluster name, epoch (for fencing a stale owner later),
  and for each origin node the last seq this node has applied, so the server knows where
  to resume sending from. `Welcome` is the server's reply with the same information.
- `Changes`: a batch of one origin's journal records (opaque bytes, see
  `mailfs.cachemgr.records`), each with its seq and the version of the file it was made
  against (`base_version`, 0 = none/new; for conflict detection later), plus the
  origin's epoch.
- `Ack`: the receiver has applied the origin's changes through seq.
- `SnapshotBegin` / `SnapshotChunk` / `SnapshotEnd`: a streamed snapshot for a peer behind
  the retained log or new and empty. Chunks carry their offset; the end carries the xxh3
  of all snapshot bytes; after the end, the receiver's applied seqs are the snapshot's
  `origin_seqs` and the live stream continues from there.
- `Ping` / `Pong`: liveness. `Goodbye`: an orderly close with a reason for the log.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal, TypeAlias

import xxhash

PROTOCOL_VERSION = 1
MAGIC = b"MAILFS"
MAX_FRAME_DEFAULT = 16 << 20
MIN_FRAME_LIMIT = 4096
SNAPSHOT_CHUNK_DEFAULT = 1 << 20

MAX_NAME_BYTES = 255          # node ids, cluster names, origins
MAX_REASON_BYTES = 4096       # Goodbye reasons
MAX_ORIGINS = 65_536          # entries in an applied / origin_seqs map
MAX_BATCH = 65_536            # changes in one Changes frame
MAX_OUTSTANDING_PINGS = 64
U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1

HEADER = struct.Struct("<IBQ")
LENGTH = struct.Struct("<I")
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
CHANGE_HEAD = struct.Struct("<QQI")   # seq, base_version, record length
MAP_ENTRY_MIN = U32.size + 1 + U64.size


class ProtocolError(ValueError):
    """The peer broke the protocol (or its bytes were damaged); close the connection.

    `reason` is a clear one-line description for the log.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MessageType(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    CHANGES = 3
    ACK = 4
    SNAPSHOT_BEGIN = 5
    SNAPSHOT_CHUNK = 6
    SNAPSHOT_END = 7
    PING = 8
    PONG = 9
    GOODBYE = 10


# --- field validation -------------------------------------------------------------------


def _check_int(what: str, value: object, limit: int = U64_MAX) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an int, not {type(value).__name__}")
    if not 0 <= value <= limit:
        raise ValueError(f"{what} {value} is outside 0..{limit}")


def _check_name(what: str, value: object) -> None:
    """Node ids, cluster names and origins: 1..255 UTF-8 bytes, printable."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a str, not {type(value).__name__}")
    size = len(value.encode("utf-8", "surrogatepass"))
    if not 0 < size <= MAX_NAME_BYTES:
        raise ValueError(f"{what} must be 1..{MAX_NAME_BYTES} bytes of UTF-8, got {size}")
    if not value.isprintable():
        raise ValueError(f"{what} {value!r} contains unprintable characters")
    value.encode("utf-8")  # lone surrogates raise UnicodeEncodeError (a ValueError)


def _check_seq_map(what: str, value: object) -> dict[str, int]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} must be a mapping, not {type(value).__name__}")
    if len(value) > MAX_ORIGINS:
        raise ValueError(f"{what} has {len(value)} entries, more than {MAX_ORIGINS}")
    result: dict[str, int] = {}
    for key, seq in value.items():
        _check_name(f"{what} origin", key)
        _check_int(f"{what}[{key!r}]", seq)
        result[key] = seq
    return result


def _check_bytes(what: str, value: object) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise ValueError(f"{what} must be bytes, not {type(value).__name__}")
    return bytes(value)


# --- messages -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    version: int
    node_id: str
    cluster: str
    epoch: int
    applied: dict[str, int]

    def __post_init__(self) -> None:
        _check_int("version", self.version, U32_MAX)
        _check_name("node id", self.node_id)
        _check_name("cluster", self.cluster)
        _check_int("epoch", self.epoch)
        object.__setattr__(self, "applied", _check_seq_map("applied", self.applied))


@dataclass(frozen=True, slots=True)
class Welcome:
    node_id: str
    epoch: int
    applied: dict[str, int]

    def __post_init__(self) -> None:
        _check_name("node id", self.node_id)
        _check_int("epoch", self.epoch)
        object.__setattr__(self, "applied", _check_seq_map("applied", self.applied))


@dataclass(frozen=True, slots=True)
class Change:
    seq: int
    base_version: int
    record: bytes

    def __post_init__(self) -> None:
        _check_int("seq", self.seq)
        _check_int("base_version", self.base_version)
        object.__setattr__(self, "record", _check_bytes("record", self.record))


@dataclass(frozen=True, slots=True)
class Changes:
    origin: str
    epoch: int
    records: tuple[Change, ...]

    def __post_init__(self) -> None:
        _check_name("origin", self.origin)
        _check_int("epoch", self.epoch)
        records = tuple(self.records)
        if len(records) > MAX_BATCH:
            raise ValueError(f"batch of {len(records)} changes exceeds {MAX_BATCH}")
        for change in records:
            if not isinstance(change, Change):
                raise ValueError(f"records must be Change, not {type(change).__name__}")
        object.__setattr__(self, "records", records)


@dataclass(frozen=True, slots=True)
class Ack:
    origin: str
    seq: int

    def __post_init__(self) -> None:
        _check_name("origin", self.origin)
        _check_int("seq", self.seq)


@dataclass(frozen=True, slots=True)
class SnapshotBegin:
    origin_seqs: dict[str, int]
    total_bytes: int
    snapshot_id: int

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "origin_seqs", _check_seq_map("origin_seqs", self.origin_seqs)
        )
        _check_int("total_bytes", self.total_bytes)
        _check_int("snapshot_id", self.snapshot_id)


@dataclass(frozen=True, slots=True)
class SnapshotChunk:
    snapshot_id: int
    offset: int
    data: bytes

    def __post_init__(self) -> None:
        _check_int("snapshot_id", self.snapshot_id)
        _check_int("offset", self.offset)
        object.__setattr__(self, "data", _check_bytes("data", self.data))


@dataclass(frozen=True, slots=True)
class SnapshotEnd:
    snapshot_id: int
    checksum: int

    def __post_init__(self) -> None:
        _check_int("snapshot_id", self.snapshot_id)
        _check_int("checksum", self.checksum)


@dataclass(frozen=True, slots=True)
class Ping:
    nonce: int

    def __post_init__(self) -> None:
        _check_int("nonce", self.nonce)


@dataclass(frozen=True, slots=True)
class Pong:
    nonce: int

    def __post_init__(self) -> None:
        _check_int("nonce", self.nonce)


@dataclass(frozen=True, slots=True)
class Goodbye:
    reason: str

    def __post_init__(self) -> None:
        if not isinstance(self.reason, str):
            raise ValueError(f"reason must be a str, not {type(self.reason).__name__}")
        size = len(self.reason.encode("utf-8"))
        if size > MAX_REASON_BYTES:
            raise ValueError(f"reason of {size} bytes exceeds {MAX_REASON_BYTES}")


Message: TypeAlias = (
    Hello | Welcome | Changes | Ack | SnapshotBegin | SnapshotChunk | SnapshotEnd
    | Ping | Pong | Goodbye
)


# --- payload codec ------------------------------------------------------------------------


class _Garbled(Exception):
    """Internal: a payload that passed its checksum but does not parse."""


class _Writer:
    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def u32(self, value: int) -> None:
        self.parts.append(U32.pack(value))

    def u64(self, value: int) -> None:
        self.parts.append(U64.pack(value))

    def raw(self, value: bytes) -> None:
        self.parts.append(value)

    def blob(self, value: bytes) -> None:
        self.parts.append(U32.pack(len(value)))
        self.parts.append(value)

    def text(self, value: str) -> None:
        self.blob(value.encode("utf-8"))

    def seq_map(self, value: Mapping[str, int]) -> None:
        self.u32(len(value))
        for key in sorted(value):
            self.text(key)
            self.u64(value[key])

    def payload(self) -> bytes:
        return b"".join(self.parts)


class _Reader:
    __slots__ = ("pos", "view")

    def __init__(self, payload: bytes) -> None:
        self.view = memoryview(payload)
        self.pos = 0

    def remaining(self) -> int:
        return len(self.view) - self.pos

    def _take(self, size: int, what: str) -> memoryview:
        if size > self.remaining():
            raise _Garbled(f"{what} runs past the end of the payload")
        piece = self.view[self.pos:self.pos + size]
        self.pos += size
        return piece

    def u32(self, what: str) -> int:
        value: int = U32.unpack(self._take(U32.size, what))[0]
        return value

    def u64(self, what: str) -> int:
        value: int = U64.unpack(self._take(U64.size, what))[0]
        return value

    def raw(self, size: int, what: str) -> bytes:
        return bytes(self._take(size, what))

    def blob(self, what: str) -> bytes:
        size = self.u32(f"{what} length")
        return bytes(self._take(size, what))

    def text(self, what: str, limit: int) -> str:
        size = self.u32(f"{what} length")
        if size > limit:
            raise _Garbled(f"{what} of {size} bytes exceeds {limit}")
        raw = self._take(size, what)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as exc:
            raise _Garbled(f"{what} is not valid UTF-8") from exc

    def count(self, what: str, limit: int, min_item: int) -> int:
        count = self.u32(f"{what} count")
        if count > limit:
            raise _Garbled(f"{what} count {count} exceeds {limit}")
        if count * min_item > self.remaining():
            raise _Garbled(f"{what} count {count} does not fit in the payload")
        return count

    def seq_map(self, what: str) -> dict[str, int]:
        count = self.count(what, MAX_ORIGINS, MAP_ENTRY_MIN)
        result: dict[str, int] = {}
        for _ in range(count):
            key = self.text(f"{what} origin", MAX_NAME_BYTES)
            if key in result:
                raise _Garbled(f"{what} names origin {key!r} twice")
            result[key] = self.u64(f"{what}[{key!r}]")
        return result

    def finish(self) -> None:
        if self.remaining():
            raise _Garbled(f"{self.remaining()} stray bytes after the message")


def _encode_payload(message: Message) -> tuple[MessageType, bytes]:
    w = _Writer()
    match message:
        case Hello():
            w.raw(MAGIC)
            w.u32(message.version)
            w.text(message.node_id)
            w.text(message.cluster)
            w.u64(message.epoch)
            w.seq_map(message.applied)
            return MessageType.HELLO, w.payload()
        case Welcome():
            w.text(message.node_id)
            w.u64(message.epoch)
            w.seq_map(message.applied)
            return MessageType.WELCOME, w.payload()
        case Changes():
            w.text(message.origin)
            w.u64(message.epoch)
            w.u32(len(message.records))
            for change in message.records:
                w.raw(CHANGE_HEAD.pack(change.seq, change.base_version, len(change.record)))
                w.raw(change.record)
            return MessageType.CHANGES, w.payload()
        case Ack():
            w.text(message.origin)
            w.u64(message.seq)
            return MessageType.ACK, w.payload()
        case SnapshotBegin():
            w.u64(message.snapshot_id)
            w.u64(message.total_bytes)
            w.seq_map(message.origin_seqs)
            return MessageType.SNAPSHOT_BEGIN, w.payload()
        case SnapshotChunk():
            w.u64(message.snapshot_id)
            w.u64(message.offset)
            w.blob(message.data)
            return MessageType.SNAPSHOT_CHUNK, w.payload()
        case SnapshotEnd():
            w.u64(message.snapshot_id)
            w.u64(message.checksum)
            return MessageType.SNAPSHOT_END, w.payload()
        case Ping():
            w.u64(message.nonce)
            return MessageType.PING, w.payload()
        case Pong():
            w.u64(message.nonce)
            return MessageType.PONG, w.payload()
        case Goodbye():
            w.text(message.reason)
            return MessageType.GOODBYE, w.payload()
    raise TypeError(f"not a protocol message: {type(message).__name__}")


def _decode_hello(r: _Reader) -> Hello:
    if r.remaining() < len(MAGIC) or r.raw(len(MAGIC), "magic") != MAGIC:
        raise ProtocolError("not a mailfs peer: Hello has the wrong magic")
    version = r.u32("version")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"peer speaks mailfs protocol version {version}, this node speaks "
            f"version {PROTOCOL_VERSION}"
        )
    node_id = r.text("node id", MAX_NAME_BYTES)
    cluster = r.text("cluster", MAX_NAME_BYTES)
    epoch = r.u64("epoch")
    applied = r.seq_map("applied")
    return Hello(version, node_id, cluster, epoch, applied)


def _decode_welcome(r: _Reader) -> Welcome:
    node_id = r.text("node id", MAX_NAME_BYTES)
    epoch = r.u64("epoch")
    return Welcome(node_id, epoch, r.seq_map("applied"))


def _decode_changes(r: _Reader) -> Changes:
    origin = r.text("origin", MAX_NAME_BYTES)
    epoch = r.u64("epoch")
    count = r.count("change", MAX_BATCH, CHANGE_HEAD.size)
    records = []
    for _ in range(count):
        seq, base_version, size = CHANGE_HEAD.unpack(r._take(CHANGE_HEAD.size, "change head"))
        records.append(Change(seq, base_version, r.raw(size, f"record of seq {seq}")))
    return Changes(origin, epoch, tuple(records))


def _decode_ack(r: _Reader) -> Ack:
    return Ack(r.text("origin", MAX_NAME_BYTES), r.u64("seq"))


def _decode_snapshot_begin(r: _Reader) -> SnapshotBegin:
    snapshot_id = r.u64("snapshot id")
    total_bytes = r.u64("total bytes")
    return SnapshotBegin(r.seq_map("origin_seqs"), total_bytes, snapshot_id)


def _decode_snapshot_chunk(r: _Reader) -> SnapshotChunk:
    snapshot_id = r.u64("snapshot id")
    offset = r.u64("offset")
    return SnapshotChunk(snapshot_id, offset, r.blob("data"))


def _decode_snapshot_end(r: _Reader) -> SnapshotEnd:
    return SnapshotEnd(r.u64("snapshot id"), r.u64("checksum"))


def _decode_ping(r: _Reader) -> Ping:
    return Ping(r.u64("nonce"))


def _decode_pong(r: _Reader) -> Pong:
    return Pong(r.u64("nonce"))


def _decode_goodbye(r: _Reader) -> Goodbye:
    return Goodbye(r.text("reason", MAX_REASON_BYTES))


_DECODERS: dict[int, tuple[str, Callable[[_Reader], Message]]] = {
    MessageType.HELLO: ("Hello", _decode_hello),
    MessageType.WELCOME: ("Welcome", _decode_welcome),
    MessageType.CHANGES: ("Changes", _decode_changes),
    MessageType.ACK: ("Ack", _decode_ack),
    MessageType.SNAPSHOT_BEGIN: ("SnapshotBegin", _decode_snapshot_begin),
    MessageType.SNAPSHOT_CHUNK: ("SnapshotChunk", _decode_snapshot_chunk),
    MessageType.SNAPSHOT_END: ("SnapshotEnd", _decode_snapshot_end),
    MessageType.PING: ("Ping", _decode_ping),
    MessageType.PONG: ("Pong", _decode_pong),
    MessageType.GOODBYE: ("Goodbye", _decode_goodbye),
}


def _frame_checksum(message_type: int, payload: bytes) -> int:
    hasher = xxhash.xxh3_64()
    hasher.update(bytes((message_type,)))
    hasher.update(payload)
    digest: int = hasher.intdigest()
    return digest


def decode_payload(message_type: int, payload: bytes) -> Message:
    """Parse one checksum-verified payload. Raises ProtocolError if it does not parse."""
    entry = _DECODERS.get(message_type)
    if entry is None:
        raise ProtocolError(f"unknown message type {message_type}")
    name, decode = entry
    reader = _Reader(payload)
    try:
        message = decode(reader)
        reader.finish()
    except ProtocolError:
        raise
    except (_Garbled, ValueError, struct.error) as exc:
        raise ProtocolError(f"garbled {name} frame: {exc}") from exc
    return message


def encode(message: Message, *, max_frame: int = MAX_FRAME_DEFAULT) -> bytes:
    """One frame for `message`. ValueError if it would exceed `max_frame` payload bytes."""
    message_type, payload = _encode_payload(message)
    if len(payload) > max_frame:
        raise ValueError(
            f"{type(message).__name__} of {len(payload)} bytes exceeds the "
            f"{max_frame}-byte frame limit"
        )
    checksum = _frame_checksum(message_type, payload)
    return HEADER.pack(len(payload), message_type, checksum) + payload


def changes_payload_size(origin: str, records: Iterable[Change]) -> int:
    """The payload size of a Changes frame (for packing batches under the frame limit)."""
    head = U32.size + len(origin.encode("utf-8")) + U64.size + U32.size
    return head + sum(CHANGE_HEAD.size + len(change.record) for change in records)


def batch_changes(
    origin: str,
    epoch: int,
    changes: Iterable[Change],
    *,
    max_frame: int = MAX_FRAME_DEFAULT,
    max_count: int = MAX_BATCH,
) -> Iterator[Changes]:
    """Pack changes, in order, into as few Changes messages as fit the frame limit."""
    head = changes_payload_size(origin, ())
    batch: list[Change] = []
    size = head
    for change in changes:
        item = CHANGE_HEAD.size + len(change.record)
        if head + item > max_frame:
            raise ValueError(
                f"change seq {change.seq} of {len(change.record)} bytes cannot fit in a "
                f"{max_frame}-byte frame"
            )
        if batch and (size + item > max_frame or len(batch) >= max_count):
            yield Changes(origin, epoch, tuple(batch))
            batch, size = [], head
        batch.append(change)
        size += item
    if batch:
        yield Changes(origin, epoch, tuple(batch))


def snapshot_chunks(
    snapshot_id: int, offset: int, data: bytes, chunk_size: int = SNAPSHOT_CHUNK_DEFAULT
) -> Iterator[SnapshotChunk]:
    """Split `data` (which starts at `offset` in the snapshot) into SnapshotChunks."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    for start in range(0, len(data), chunk_size):
        yield SnapshotChunk(snapshot_id, offset + start, data[start:start + chunk_size])


class Decoder:
    """Turns a byte stream into messages. Handles any split of the stream into pieces.

    A frame whose declared length exceeds `max_frame` is refused as soon as the length is
    seen. Any error is final: the buffer is dropped and every later call raises.
    """

    def __init__(self, max_frame: int = MAX_FRAME_DEFAULT) -> None:
        if not MIN_FRAME_LIMIT <= max_frame <= U32_MAX:
            raise ValueError(f"max_frame must be {MIN_FRAME_LIMIT}..{U32_MAX}")
        self.max_frame = max_frame
        self._buffer = bytearray()
        self._error: str | None = None
        self.frames = 0
        self.bytes_consumed = 0

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held, waiting for the rest."""
        return len(self._buffer)

    @property
    def error(self) -> str | None:
        return self._error

    def _fail(self, reason: str) -> ProtocolError:
        self._error = reason
        self._buffer = bytearray()
        return ProtocolError(reason)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Messages completed by `data`, in order. Raises ProtocolError for a bad stream."""
        if self._error is not None:
            raise ProtocolError(f"decoder already failed: {self._error}")
        buffer = self._buffer
        buffer += data
        messages: list[Message] = []
        pos = 0
        try:
            while len(buffer) - pos >= LENGTH.size:
                (length,) = LENGTH.unpack_from(buffer, pos)
                if length > self.max_frame:
                    raise self._fail(
                        f"frame of {length} bytes exceeds the {self.max_frame}-byte limit"
                    )
                end = pos + HEADER.size + length
                if end > len(buffer):
                    break
                _, message_type, checksum = HEADER.unpack_from(buffer, pos)
                payload = bytes(buffer[pos + HEADER.size:end])
                if _frame_checksum(message_type, payload) != checksum:
                    raise self._fail(
                        f"frame checksum mismatch (type {message_type}, "
                        f"{length}-byte payload)"
                    )
                try:
                    messages.append(decode_payload(message_type, payload))
                except ProtocolError as exc:
                    raise self._fail(exc.reason) from exc
                pos = end
                self.frames += 1
        finally:
            if self._error is None and pos:
                del buffer[:pos]
                self.bytes_consumed += pos
        return messages

    def eof(self) -> None:
        """The stream ended. Raises ProtocolError if it ended in the middle of a frame."""
        if self._error is not None:
            raise ProtocolError(f"decoder already failed: {self._error}")
        if self._buffer:
            raise self._fail(
                f"connection closed mid-frame ({len(self._buffer)} bytes of an "
                "incomplete frame)"
            )


# --- session ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SnapshotProgress:
    """How far one snapshot transfer has got, for status output."""

    snapshot_id: int
    total_bytes: int
    transferred_bytes: int
    complete: bool

    @property
    def fraction(self) -> float:
        if self.total_bytes == 0:
            return 1.0 if self.complete else 0.0
        return self.transferred_bytes / self.total_bytes

    def __str__(self) -> str:
        state = "complete" if self.complete else "in progress"
        return (
            f"snapshot {self.snapshot_id}: {self.transferred_bytes} of {self.total_bytes} "
            f"bytes ({self.fraction:.0%}, {state})"
        )


class _SnapshotTransfer:
    """One direction's snapshot: order, bounds and the running checksum."""

    __slots__ = ("begin", "complete", "done", "hasher")

    def __init__(self, begin: SnapshotBegin) -> None:
        self.begin = begin
        self.done = 0
        self.hasher = xxhash.xxh3_64()
        self.complete = False

    def check_chunk(self, chunk: SnapshotChunk) -> str | None:
        sid = self.begin.snapshot_id
        if chunk.snapshot_id != sid:
            return f"chunk of snapshot {chunk.snapshot_id} during snapshot {sid}"
        if not chunk.data:
            return f"empty chunk in snapshot {sid}"
        if chunk.offset != self.done:
            return (
                f"snapshot {sid} chunk at offset {chunk.offset}, expected offset "
                f"{self.done} (missing, overlapping or reordered chunk)"
            )
        if self.done + len(chunk.data) > self.begin.total_bytes:
            return (
                f"snapshot {sid} chunk ends at byte {self.done + len(chunk.data)}, past the "
                f"declared total of {self.begin.total_bytes} bytes"
            )
        return None

    def add_chunk(self, chunk: SnapshotChunk) -> None:
        self.hasher.update(chunk.data)
        self.done += len(chunk.data)

    def check_end(self, end: SnapshotEnd) -> str | None:
        sid = self.begin.snapshot_id
        if end.snapshot_id != sid:
            return f"end of snapshot {end.snapshot_id} during snapshot {sid}"
        if self.done != self.begin.total_bytes:
            return (
                f"snapshot {sid} ended after {self.done} of {self.begin.total_bytes} bytes"
            )
        digest: int = self.hasher.intdigest()
        if digest != end.checksum:
            return f"snapshot {sid} checksum mismatch ({digest:#018x} != {end.checksum:#018x})"
        return None

    def progress(self) -> SnapshotProgress:
        return SnapshotProgress(
            self.begin.snapshot_id, self.begin.total_bytes, self.done, self.complete
        )


class _State(enum.Enum):
    START = "start"                    # client: Hello not sent yet; server: awaiting Hello
    AWAIT_WELCOME = "await-welcome"    # client sent Hello
    HELLO_RECEIVED = "hello-received"  # server got Hello, must send Welcome
    ESTABLISHED = "established"
    FAILED = "failed"


Role = Literal["client", "server"]


class Session:
    """One side of one connection: the handshake and the ordering rules, with no I/O.

    The client calls `hello()` and writes the bytes; the server feeds bytes to `receive()`,
    gets the Hello, and replies with `welcome()`. After that either side may send Changes,
    Acks, snapshots, Pings and Pongs through `send()`.

    Rules enforced on what is received (a violation raises ProtocolError and the session is
    unusable from then on; only `send(Goodbye(...))` still works):

    - The first frame is Hello (server) or Welcome (client); the magic, protocol version
      and cluster must match ours, and the peer must not claim our own node id.
    - Changes: never of our own origin, never during an incoming snapshot, never empty, and
      each origin's seqs continue from what we told the peer we have applied (or from the
      last snapshot's `origin_seqs`), strictly increasing and, with `contiguous_seqs`,
      without gaps. So a duplicated, dropped or reordered batch is detected.
    - Acks: never for more than we sent (or the peer already had), never going backwards.
    - Snapshots: Begin, then chunks with matching id and contiguous offsets within the
      declared total, then End with the xxh3 of all the bytes.
    - Pongs answer a Ping we sent. Nothing may follow a Goodbye.

    The same rules are applied to what we send, so a local bug is caught before its bytes
    leave (`send` raises ProtocolError and sends nothing; the session stays usable).

    On an error, messages decoded earlier in the same `receive` call are discarded with it.
    That is safe: the sender resumes from what the receiver says it has applied.
    """

    def __init__(
        self,
        role: Role,
        local_node_id: str,
        cluster: str,
        epoch: int,
        applied_provider: Callable[[], Mapping[str, int]],
        *,
        max_frame: int = MAX_FRAME_DEFAULT,
        expected_peer_id: str | None = None,
        contiguous_seqs: bool = True,
    ) -> None:
        if role not in ("client", "server"):
            raise ValueError(f"role must be 'client' or 'server', not {role!r}")
        _check_name("local node id", local_node_id)
        _check_name("cluster", cluster)
        _check_int("epoch", epoch)
        self.role: Role = role
        self.local_node_id = local_node_id
        self.cluster = cluster
        self.epoch = epoch
        self.max_frame = max_frame
        self.expected_peer_id = expected_peer_id
        self.contiguous_seqs = contiguous_seqs
        self._applied_provider = applied_provider
        self._decoder = Decoder(max_frame)
        self._state = _State.START
        self.error: str | None = None
        self.peer_node_id: str | None = None
        self.peer_epoch: int | None = None
        # What the peer said it has applied at the handshake: where sending resumes.
        self.peer_applied: dict[str, int] = {}
        # What we said we have applied: where receiving resumes.
        self.advertised: dict[str, int] = {}
        self._recv_through: dict[str, int] = {}   # last seq received per origin
        self._send_through: dict[str, int] = {}   # last seq sent per origin (for ordering)
        self._sent_max: dict[str, int] = {}       # highest seq the peer can have per origin
        self._ack_floor: dict[str, int] = {}      # last acknowledged seq per origin
        self._incoming: _SnapshotTransfer | None = None
        self._outgoing: _SnapshotTransfer | None = None
        self._pings: set[int] = set()
        self._goodbye_received = False
        self._goodbye_sent = False

    # --- status ---

    @property
    def established(self) -> bool:
        return self._state is _State.ESTABLISHED

    @property
    def failed(self) -> bool:
        return self._state is _State.FAILED

    @property
    def goodbye_received(self) -> bool:
        return self._goodbye_received

    @property
    def incoming_snapshot(self) -> SnapshotProgress | None:
        return self._incoming.progress() if self._incoming is not None else None

    @property
    def outgoing_snapshot(self) -> SnapshotProgress | None:
        return self._outgoing.progress() if self._outgoing is not None else None


    def received_through(self, origin: str) -> int:
        """The last seq of `origin` received on this connection (or the resume point)."""
        return self._recv_through.get(origin, 0)

    def acknowledged_through(self, origin: str) -> int:
        return self._ack_floor.get(origin, 0)

    # --- handshake helpers ---

    def hello(self) -> bytes:
        """Client: the Hello frame that opens the connection."""
        return self.send(
            Hello(PROTOCOL_VERSION, self.local_node_id, self.cluster, self.epoch,
                  dict(self._applied_provider()))
        )

    def welcome(self) -> bytes:
        """Server: the Welcome frame, once the client's Hello has been received."""
        return self.send(Welcome(self.local_node_id, self.epoch, dict(self._applied_provider())))

    # --- receiving ---

    def _fail(self, reason: str) -> ProtocolError:
        self._state = _State.FAILED
        self.error = reason
        return ProtocolError(reason)

    def receive(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Validated messages completed by `data`, for the caller to act on, in order."""
        if self._state is _State.FAILED:
            raise ProtocolError(f"session already failed: {self.error}")
        if not data:
            return []
        if self.role == "client" and self._state is _State.START:
            raise self._fail("received data before sending Hello")
        handshaking = self._state is not _State.ESTABLISHED
        try:
            messages = self._decoder.feed(data)
        except ProtocolError as exc:
            if handshaking:
                hint = ""
                if self._decoder.frames == 0 and not exc.reason.startswith("not a mailfs"):
                    hint = " (not a mailfs peer?)"
                raise self._fail(f"bad handshake: {exc.reason}{hint}") from exc
            raise self._fail(exc.reason) from exc
        for message in messages:
            self._on_receive(message)
        return messages

    def eof(self) -> None:
        """The connection ended. Raises ProtocolError if it ended mid-frame, mid-snapshot or
        before the handshake finished (unless the peer said Goodbye)."""
        if self._state is _State.FAILED:
            raise ProtocolError(f"session already failed: {self.error}")
        try:
            self._decoder.eof()
        except ProtocolError as exc:
            raise self._fail(exc.reason) from exc
        if self._incoming is not None and not self._incoming.complete:
            raise self._fail(
                f"connection closed during incoming {self._incoming.progress()}"
            )
        if self._state is not _State.ESTABLISHED and not self._goodbye_received:
            raise self._fail("connection closed before the handshake finished")

    def _on_receive(self, message: Message) -> None:
        name = type(message).__name__
        if self._goodbye_received:
            raise self._fail(f"{name} after Goodbye")
        if isinstance(message, Goodbye):
            self._goodbye_received = True
            return
        state = self._state
        if state is _State.START:  # server awaiting Hello
            if not isinstance(message, Hello):
                raise self._fail(f"expected Hello as the first frame, got {name}")
            self._on_hello(message)
        elif state is _State.HELLO_RECEIVED:
            raise self._fail(f"{name} from the client before Welcome was sent")
        elif state is _State.AWAIT_WELCOME:
            if not isinstance(message, Welcome):
                raise self._fail(f"expected Welcome as the first frame, got {name}")
            self._on_welcome(message)
        else:
            self._on_established(message)

    def _check_peer_identity(self, node_id: str) -> None:
        if node_id == self.local_node_id:
            raise self._fail(f"peer claims our own node id {node_id!r}")
        if self.expected_peer_id is not None and node_id != self.expected_peer_id:
            raise self._fail(
                f"peer identifies as {node_id!r}, expected {self.expected_peer_id!r}"
            )

    def _on_hello(self, hello: Hello) -> None:
        if hello.version != PROTOCOL_VERSION:
            raise self._fail(
                f"peer speaks mailfs protocol version {hello.version}, this node speaks "
                f"version {PROTOCOL_VERSION}"
            )
        if hello.cluster != self.cluster:
            raise self._fail(
                f"peer {hello.node_id!r} belongs to cluster {hello.cluster!r}, "
                f"not {self.cluster!r}"
            )
        self._check_peer_identity(hello.node_id)
        self._set_peer(hello.node_id, hello.epoch, hello.applied)
        self._state = _State.HELLO_RECEIVED

    def _on_welcome(self, welcome: Welcome) -> None:
        self._check_peer_identity(welcome.node_id)
        self._set_peer(welcome.node_id, welcome.epoch, welcome.applied)
        self._state = _State.ESTABLISHED

    def _set_peer(self, node_id: str, epoch: int, applied: dict[str, int]) -> None:
        self.peer_node_id = node_id
        self.peer_epoch = epoch
        self.peer_applied = dict(applied)
        self._send_through = dict(applied)
        self._sent_max = dict(applied)
        self._ack_floor = dict(applied)

    def _on_established(self, message: Message) -> None:
        name = type(message).__name__
        match message:
            case Hello() | Welcome():
                raise self._fail(f"duplicate {name} after the handshake")
            case Changes():
                reason = self._check_changes(message, self._recv_through, self._incoming)
                if reason is None and message.origin == self.local_node_id:
                    reason = "peer sent changes of our own origin"
                if reason is not None:
                    raise self._fail(reason)
                self._recv_through[message.origin] = message.records[-1].seq
            case Ack():
                self._on_ack(message)
            case SnapshotBegin():
                reason = self._check_begin(message, self._incoming)
                if reason is not None:
                    raise self._fail(reason)
                self._incoming = _SnapshotTransfer(message)
            case SnapshotChunk():
                if self._incoming is None or self._incoming.complete:
                    raise self._fail("snapshot chunk without SnapshotBegin")
                reason = self._incoming.check_chunk(message)
                if reason is not None:
                    raise self._fail(reason)
                self._incoming.add_chunk(message)
            case SnapshotEnd():
                if self._incoming is None or self._incoming.complete:
                    raise self._fail("SnapshotEnd without SnapshotBegin")
                reason = self._incoming.check_end(message)
                if reason is not None:
                    raise self._fail(reason)
                self._incoming.complete = True
                self._recv_through = dict(self._incoming.begin.origin_seqs)
            case Ping():
                pass
            case Pong():
                if message.nonce not in self._pings:
                    raise self._fail(f"Pong for nonce {message.nonce}, which we never sent")
                self._pings.discard(message.nonce)
            case Goodbye():  # handled in _on_receive
                pass

    def _on_ack(self, ack: Ack) -> None:
        floor = self._ack_floor.get(ack.origin, 0)
        ceiling = self._sent_max.get(ack.origin, 0)
        if ack.seq < floor:
            raise self._fail(
                f"Ack of {ack.origin!r} seq {ack.seq} goes back from {floor}"
            )
        if ack.seq > ceiling:
            raise self._fail(
                f"Ack of {ack.origin!r} seq {ack.seq}, but only seqs through {ceiling} "
                "were sent"
            )
        self._ack_floor[ack.origin] = ack.seq

    def _check_changes(
        self,
        changes: Changes,
        through: dict[str, int],
        snapshot: _SnapshotTransfer | None,
    ) -> str | None:
        origin = changes.origin
        if snapshot is not None and not snapshot.complete:
            return f"Changes of {origin!r} during snapshot {snapshot.begin.snapshot_id}"
        if not changes.records:
            return f"empty Changes batch of {origin!r}"
        if origin not in through and len(through) >= MAX_ORIGINS:
            return f"more than {MAX_ORIGINS} origins"
        last = through.get(origin, 0)
        for change in changes.records:
            if self.contiguous_seqs and change.seq != last + 1:
                return (
                    f"Changes of {origin!r}: seq {change.seq} where {last + 1} was expected "
                    "(duplicate, missing or reordered change)"
                )
            if change.seq <= last:
                return (
                    f"Changes of {origin!r}: seq {change.seq} does not follow {last} "
                    "(duplicate or reordered change)"
                )
            last = change.seq
        return None

    @staticmethod
    def _check_begin(begin: SnapshotBegin, current: _SnapshotTransfer | None) -> str | None:
        if current is not None and not current.complete:
            return (
                f"SnapshotBegin {begin.snapshot_id} while snapshot "
                f"{current.begin.snapshot_id} is in progress"
            )
        return None

    # --- sending ---

    def send(self, message: Message) -> bytes:
        """The frame for `message`, after checking that sending it now keeps the rules.

        Raises ProtocolError (and changes nothing) if it would not.
        """
        if isinstance(message, Goodbye):
            if self._goodbye_sent:
                raise ProtocolError("refusing to send: Goodbye already sent")
            frame = encode(message, max_frame=self.max_frame)
            self._goodbye_sent = True
            return frame
        if self._state is _State.FAILED:
            raise ProtocolError(f"session already failed: {self.error}")
        if self._goodbye_sent:
            raise ProtocolError(f"refusing to send {type(message).__name__} after Goodbye")
        commit = self._check_send(message)
        frame = encode(message, max_frame=self.max_frame)
        commit()
        return frame

    def _check_send(self, message: Message) -> Callable[[], None]:
        """Raise if `message` may not be sent now; else return the state update to apply."""
        name = type(message).__name__
        state = self._state

        def refuse(reason: str) -> ProtocolError:
            return ProtocolError(f"refusing to send {name}: {reason}")

        if isinstance(message, Hello):
            if self.role != "client" or state is not _State.START:
                raise refuse("only a client sends Hello, once, first")
            if (message.node_id, message.cluster) != (self.local_node_id, self.cluster):
                raise refuse("node id or cluster differs from this session's")

            def commit_hello() -> None:
                self._state = _State.AWAIT_WELCOME
                self.advertised = dict(message.applied)
                self._recv_through = dict(message.applied)
            return commit_hello
        if isinstance(message, Welcome):
            if self.role != "server" or state is not _State.HELLO_RECEIVED:
                raise refuse("only a server sends Welcome, once, after the client's Hello")
            if message.node_id != self.local_node_id:
                raise refuse("node id differs from this session's")

            def commit_welcome() -> None:
                self._state = _State.ESTABLISHED
                self.advertised = dict(message.applied)
                self._recv_through = dict(message.applied)
            return commit_welcome
        if state is not _State.ESTABLISHED:
            raise refuse("the handshake has not finished")

        match message:
            case Changes():
                reason = self._check_changes(message, self._send_through, self._outgoing)
                if reason is None and message.origin == self.peer_node_id:
                    reason = "the peer's own changes"
                if reason is not None:
                    raise refuse(reason)

                def commit_changes() -> None:
                    last = message.records[-1].seq
                    self._send_through[message.origin] = last
                    self._sent_max[message.origin] = max(
                        self._sent_max.get(message.origin, 0), last
                    )
                return commit_changes
            case SnapshotBegin():
                reason = self._check_begin(message, self._outgoing)
                if reason is not None:
                    raise refuse(reason)

                def commit_begin() -> None:
                    self._outgoing = _SnapshotTransfer(message)
                return commit_begin
            case SnapshotChunk():
                outgoing = self._outgoing
                if outgoing is None or outgoing.complete:
                    raise refuse("no snapshot in progress")
                reason = outgoing.check_chunk(message)
                if reason is not None:
                    raise refuse(reason)
                transfer = outgoing

                def commit_chunk() -> None:
                    transfer.add_chunk(message)
                return commit_chunk
            case SnapshotEnd():
                outgoing = self._outgoing
                if outgoing is None or outgoing.complete:
                    raise refuse("no snapshot in progress")
                reason = outgoing.check_end(message)
                if reason is not None:
                    raise refuse(reason)

                def commit_end() -> None:
                    assert outgoing is not None
                    outgoing.complete = True
                    seqs = outgoing.begin.origin_seqs
                    self._send_through = dict(seqs)
                    for origin, seq in seqs.items():
                        self._sent_max[origin] = max(self._sent_max.get(origin, 0), seq)
                    self._ack_floor = {}  # the peer's state is replaced by the snapshot
                return commit_end
            case Ping():
                if message.nonce not in self._pings and (
                    len(self._pings) >= MAX_OUTSTANDING_PINGS
                ):
                    raise refuse(f"{MAX_OUTSTANDING_PINGS} Pings are already unanswered")
                return lambda: self._pings.add(message.nonce)
        return lambda: None

    def outgoing_snapshot_checksum(self) -> int:
        """The xxh3 of the snapshot bytes sent so far (for the SnapshotEnd)."""
        if self._outgoing is None:
            raise ProtocolError("no outgoing snapshot")
        digest: int = self._outgoing.hasher.intdigest()
        return digest
