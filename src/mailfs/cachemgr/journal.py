"""The write-ahead journal that makes every write() survive a crash of the daemon.

write() must return quickly, so changes are committed to LMDB in groups. Between two
commits each change is appended to a plain journal file (no fsync): the kernel keeps
it even if the daemon is killed, and a machine crash loses only what nobody fsync'd,
which is allowed. Each commit rotates to a new journal file and deletes the old ones
once LMDB holds their changes, so replay after a crash skips records whose seq LMDB
already has.

A full state disk must not leave Dovecot unable to undo: after a failed append it truncates
its transaction log back, or overwrites a few bytes in place, and ext4 allows both on a
full disk because they need no new blocks. Here every change needs journal space, so the
journal keeps a preallocated reserve file and gives it up, a piece at a time, to records
of such space-neutral changes only. It is made whole again once there is room.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from mailfs.cachemgr.records import CorruptRecord, Field, Op, Record, decode_stream, encode

log = logging.getLogger(__name__)

PREFIX = "journal-"
SUFFIX = ".log"
RESERVE_NAME = "journal-reserve"
RESERVE_BYTES = 8 << 20
# Given up in pieces, so that one undo does not spend the reserve of many.
RESERVE_PIECE = 256 << 10
# Free space (beyond what the reserve gave up) that ends a full-disk spell.
ROOM_AGAIN = 1 << 20
# Overwrites, and writes into space that deletes freed, leave this much of the reserve to
# the changes that must never fail for want of space: truncates, renames (a lock file
# renamed over its index file above all: Dovecot leaves a lock behind when that fails,
# and every later session waits on it), unlinks. Overwrites cost journal space here,
# unlike on ext4, and a busy Dovecot would use up the whole reserve within seconds.
RESERVE_FLOOR = 4 << 20

# Records appended by the current trio task. Each FUSE request runs in a task of its own
# context, so a request refused for want of space can tell that it changed nothing and may
# run again (fs/fulldisk.py).
APPENDED_BY_TASK: contextvars.ContextVar[int] = contextvars.ContextVar(
    "appended_by_task", default=0)


class Journal:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.seq = 0
        self.generation = 0
        self.fd = -1
        self.offset = 0
        self.bytes_since_rotate = 0
        self.reserve_path = directory / RESERVE_NAME
        self.reserve_whole = False
        self.reserve_unsupported = False  # this filesystem cannot preallocate: no reserve
        self.reserve_records = 0  # records ever written into space the reserve gave up
        # Bytes the reserve gave up that undo records have not used yet. Other writes must
        # leave them alone, or the first appends after a full disk eat the reserve piece
        # by piece and the undo that needed it fails (seen in the soak run).
        self.reserve_loose = 0
        self.overwrite_loose = 0  # the same, given up for overwrites
        self._out_of_space = False
        self.full_spells = 0  # times the state disk has been found full
        self.last_refused = 0  # size of the last record refused for want of space
        self._space_checked = 0.0
        self.freed = 0  # bytes deleted or truncated away while the disk is full

    @property
    def out_of_space(self) -> bool:
        """Set by a record refused for want of space, cleared once there is room again."""
        return self._out_of_space

    @out_of_space.setter
    def out_of_space(self, value: bool) -> None:
        if value and not self._out_of_space:
            self.full_spells += 1
        self._out_of_space = value

    def generations(self) -> list[int]:
        found = []
        for entry in os.listdir(self.directory):
            if entry.startswith(PREFIX) and entry.endswith(SUFFIX):
                try:
                    found.append(int(entry[len(PREFIX):-len(SUFFIX)]))
                except ValueError:
                    continue
        return sorted(found)

    def path(self, generation: int) -> Path:
        return self.directory / f"{PREFIX}{generation:012d}{SUFFIX}"

    def replay(self, committed_seq: int) -> Iterator[Record]:
        """Yield the records that LMDB does not have yet, in order.

        Replay stops at the first torn or corrupt record: what follows it cannot be
        trusted to be a contiguous history.
        """
        expected = committed_seq + 1
        for generation in self.generations():
            self.generation = max(self.generation, generation)
            data = self.path(generation).read_bytes()
            try:
                for record in decode_stream(data):
                    if record.op is Op.REMOTE:
                        yield record  # the store skips what LMDB already has
                        continue
                    if record.seq <= committed_seq:
                        continue
                    if record.seq != expected:
                        log.warning("journal gap: expected seq %d, found %d; replay stops",
                                    expected, record.seq)
                        return
                    expected += 1
                    self.seq = record.seq
                    yield record
                    if record.op is Op.SKIP:
                        expected = int(record.fields[0]) + 1  # type: ignore[arg-type]
            except CorruptRecord as exc:
                log.warning("journal %s: %s; replay stops there", self.path(generation), exc)
                return

    def start(self, seq: int) -> None:
        self.seq = seq
        self._open(self.generation + 1)

    def _open(self, generation: int) -> None:
        # Open first and swap after: if the open fails, the old file stays in use, and
        # self.fd never names a closed descriptor that a later open() could reuse.
        fd = os.open(self.path(generation), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        old, self.fd = self.fd, fd
        self.generation = generation
        self.offset = os.fstat(fd).st_size
        self.bytes_since_rotate = 0
        if old >= 0:
            os.close(old)

    def append(self, op: Op, fields: tuple[Field, ...], space_neutral: bool = False
               ) -> tuple[Record, bytes]:
        """Write one record; returns it and its encoding (which replication sends as is).

        `space_neutral`: the change needs no new space on a real disk (an overwrite within
        the file's blocks, a truncate, an unlink), so on a full disk it may use the reserve.
        """
        record = Record(self.seq + 1, op, fields)
        data = encode(record)
        try:
            if space_neutral and op is not Op.WRITE:
                self._write_in_reserve(data, undo=True)
            elif space_neutral:
                self._write_in_reserve(data, undo=False)
            else:
                try:
                    self._keep_loose(len(data), self.reserve_loose + self.overwrite_loose)
                    self._write(data)
                    self.out_of_space = False
                except OSError as exc:
                    if exc.errno != errno.ENOSPC or not self.spend_freed(len(data)):
                        raise
                    try:
                        self._write_in_reserve(data, undo=False)
                    except OSError:
                        self.freed += len(data)  # not spent after all
                        raise
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                self.out_of_space = True
                self.last_refused = len(data)
            raise
        self.seq = record.seq
        APPENDED_BY_TASK.set(APPENDED_BY_TASK.get() + 1)
        return record, data

    def append_group(self, changes: list[tuple[Op, tuple[Field, ...]]]
                     ) -> list[tuple[Record, bytes]]:
        """Write several records with one write(2): all of them or, on any error, none.

        For changes that peers must never see half of (a takeover and its content)."""
        records = [Record(self.seq + 1 + index, op, fields)
                   for index, (op, fields) in enumerate(changes)]
        encoded = [encode(record) for record in records]
        self._write_new_space(b"".join(encoded))
        self.out_of_space = False
        self.seq = records[-1].seq
        APPENDED_BY_TASK.set(APPENDED_BY_TASK.get() + len(records))
        return list(zip(records, encoded, strict=True))

    def _write_in_reserve(self, data: bytes, undo: bool) -> None:
        """Write a record that may use space the reserve gives up.

        Undos (`undo`) may use all of it. Overwrites may not use what was given up for
        undos, nor take the reserve below RESERVE_FLOOR.
        """
        try:
            if not undo:
                self._keep_loose(len(data), self.reserve_loose)
            self._write(data)
        except OSError as exc:
            if (exc.errno != errno.ENOSPC
                    or not self._give_up_reserve(len(data), undo)):
                raise
            self._write(data)
            self.reserve_records += 1
        if undo:
            used = min(self.reserve_loose, len(data))
            self.reserve_loose -= used
            self.overwrite_loose = max(0, self.overwrite_loose - (len(data) - used))
        else:
            self.overwrite_loose = max(0, self.overwrite_loose - len(data))

    def note_freed(self, size: int) -> None:
        """A file's content shrank or went away. On a full ext4 its blocks are free for
        the next writes; Dovecot counts on that (it deletes a broken cache file and then
        writes a new log). Here freed space comes back only with the next LMDB commit,
        which a full disk prevents, so it is lent from the reserve instead."""
        if self.out_of_space and size > 0:
            self.freed += size

    def spend_freed(self, size: int) -> bool:
        """Take `size` bytes of what was freed during this full-disk spell, if any left."""
        if self.freed < size:
            return False
        self.freed -= size
        return True

    def short_of_space(self) -> bool:
        """Whether the state disk is still full since a record was refused for want of
        space. Once it is, the disk is looked at again at most once a second."""
        if not self.out_of_space:
            return False
        now = time.monotonic()
        if now - self._space_checked < 1.0:
            return True
        self._space_checked = now
        if self.has_room():
            self.out_of_space = False
            self.freed = 0
        return self.out_of_space

    def has_room(self) -> bool:
        """Whether the state disk has room again: ROOM_AGAIN free, and at least as much as
        the record last refused, beside the space the reserve gave up."""
        try:
            vfs = os.statvfs(self.directory)
        except OSError:
            return False
        loose = self.reserve_loose + self.overwrite_loose
        return vfs.f_bavail * vfs.f_frsize - loose >= max(ROOM_AGAIN, self.last_refused)

    def _keep_loose(self, size: int, keep: int) -> None:
        """ENOSPC for a write that would leave less than `keep` bytes free: space the
        reserve gave up for other kinds of records."""
        if not keep:
            return
        try:
            vfs = os.statvfs(self.directory)
        except OSError:
            return
        if vfs.f_bavail * vfs.f_frsize - size < keep:
            raise OSError(errno.ENOSPC, "state disk full: the space left is kept for "
                                        "undoing changes")

    def sync_files(self) -> None:
        """fsync every journal file and the directory that names them: replay then finds
        every record written so far after a crash of the machine, too."""
        for generation in self.generations():
            if generation == self.generation and self.fd >= 0:
                os.fdatasync(self.fd)
                continue
            fd = os.open(self.path(generation), os.O_RDONLY)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def ensure_reserve(self) -> None:
        """Make the reserve whole again; quietly leaves it short while the disk is full."""
        if self.reserve_unsupported:
            return
        try:
            fd = os.open(self.reserve_path, os.O_WRONLY | os.O_CREAT, 0o600)
        except OSError as exc:
            log.warning("cannot open the journal reserve %s: %s", self.reserve_path, exc)
            return
        try:
            st = os.fstat(fd)
            # Blocks, not size: a sparse file (copied, or a filesystem that emulates
            # preallocation) holds no space for anybody.
            if st.st_size < RESERVE_BYTES or st.st_blocks * 512 < RESERVE_BYTES:
                os.posix_fallocate(fd, 0, RESERVE_BYTES)
            self.reserve_whole = True
            self.reserve_loose = self.overwrite_loose = 0
            self.out_of_space = False
            self.freed = 0
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                self.reserve_unsupported = True
                log.warning("cannot preallocate the journal reserve (%s): on a full state "
                            "disk, undoing changes will fail like any other write", exc)
        finally:
            os.close(fd)

    def reserve_bytes(self) -> int:
        try:
            return self.reserve_path.stat().st_blocks * 512
        except OSError:
            return 0

    def _give_up_reserve(self, needed: int, undo: bool) -> bool:
        """Free a piece of the reserve big enough for a record of `needed` bytes, for
        undos or for overwrites; False once it is gone (for overwrites: down to
        RESERVE_FLOOR)."""
        piece = max(RESERVE_PIECE, -(-needed // RESERVE_PIECE) * RESERVE_PIECE)
        floor = 0 if undo else RESERVE_FLOOR
        try:
            size = self.reserve_path.stat().st_size
        except FileNotFoundError:
            return False  # the disk was already full when the reserve was to be made
        except OSError as exc:
            log.error("cannot give up journal reserve space: %s", exc)
            return False
        if size == 0 or size - piece < floor:
            return False
        try:
            self.reserve_whole = False
            os.truncate(self.reserve_path, max(0, size - piece))
            if undo:
                self.reserve_loose += min(piece, size)
            else:
                self.overwrite_loose += min(piece, size)
        except OSError as exc:
            log.error("cannot give up journal reserve space: %s", exc)
            return False
        log.warning("state disk full: journaling %s in the reserve (%d KiB of it left)",
                    "undo-type changes" if undo else "overwrites", max(0, size - piece) >> 10)
        return True

    def append_remote(self, fields: tuple[Field, ...]) -> None:
        """Write a peer's change: it keeps its place in the history, but takes no seq."""
        self._write_new_space(encode(Record(0, Op.REMOTE, fields)))

    def _write_new_space(self, data: bytes) -> None:
        """Write records that need new space: never into what the reserve gave up."""
        try:
            self._keep_loose(len(data), self.reserve_loose + self.overwrite_loose)
            self._write(data)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                self.out_of_space = True
                self.last_refused = len(data)
            raise

    def _write(self, data: bytes) -> None:
        try:
            written = os.write(self.fd, data)
        except OSError:
            self._cut_back()
            raise
        if written != len(data):
            self._cut_back()
            raise OSError(errno.ENOSPC, "journal write was short (disk full?)")
        self.offset += written
        self.bytes_since_rotate += written

    def _cut_back(self) -> None:
        # A half-written record would stop replay there, so remove it now.
        try:
            os.ftruncate(self.fd, self.offset)
        except OSError as exc:
            log.error("cannot cut back the journal after a failed write: %s", exc)

    def rotate(self) -> int:
        """Start a new file; returns the generation that the coming commit covers.

        An empty file is kept: while a full disk makes every commit fail, a new file per
        attempt would strand the free end of each last page and pile up empty files."""
        if self.offset == 0:
            return self.generation - 1
        closed = self.generation
        self._open(closed + 1)
        return closed

    def remove_through(self, generation: int) -> None:
        for old in self.generations():
            if old <= generation:
                with contextlib.suppress(FileNotFoundError):
                    self.path(old).unlink()

    def size(self) -> int:
        total = 0
        for generation in self.generations():
            with contextlib.suppress(FileNotFoundError):
                total += self.path(generation).stat().st_size
        return total

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
