"""Lock files kept where a crashed daemon's successor finds them.

Lock files (the volatile class) live in the daemon's RAM. An index-only mount's connection
outlives a daemon crash (adoption.py), and so do the processes on it: a Dovecot that held
`dovecot-uidlist.lock` when the daemon died goes on writing it, truncating it and renaming
it over the uidlist through the adopting daemon. A lock that died with the daemon fails
those calls with ENOENT, and Dovecot logs an error for each of them.

So each lock file is mirrored into a slot file in a directory under the run dir: a header
page (the fid, names and attributes, checksummed; the mtime and size apart, as every write
moves them) and then the content, written at the same offsets. A process crash leaves it
in the page cache. The adopting daemon loads them; a fresh mount and a clean stop remove
them.

Slots are reused, not made and removed per lock: a lock lives for a few requests, and an
O_CREAT open plus an unlink cost four times the CPU of the writes themselves on ext4
(about 40 against 10 us per lock cycle). A freed slot has its seal zeroed; what an earlier
lock left in its content area is zeroed before a new lock's size grows over it.

A lock whose mirror could not be written is no longer mirrored, and its slot is freed: a
mirror behind the lock would give the next daemon stale content to rename over an index
file, which is worse than no lock at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import xxhash

from mailfs.cachemgr.records import MAX_RECORD, Attrs

log = logging.getLogger(__name__)

# The content starts here; the header page before it.
HEADER_SIZE = 4096
STATE = struct.Struct("<qq")  # at offset 0: mtime_ns, size; set after every write
SEAL = struct.Struct("<QI")  # at STATE.size: xxh3 of the body, body length; zero when free
BODY = struct.Struct("<QIIIqqH")  # fid, mode, uid, gid, atime_ns, ctime_ns, number of names
NAME = struct.Struct("<HH")  # lengths of a name's directory path and of the name
BODY_START = STATE.size + SEAL.size
FREE = bytes(BODY_START)
SLOT_PREFIX = "slot-"
SHRINK_ABOVE = 64 * 1024  # content bytes a free slot keeps


class FreeSlot(ValueError):
    pass


@dataclass
class MirroredLock:
    fid: int
    attrs: Attrs
    content: bytearray
    names: list[tuple[bytes, bytes]]


@dataclass
class Slot:
    name: str
    fd: int
    size: int = 0  # the mirrored lock's size
    dirty_end: int = 0  # content bytes an earlier lock may have left, up to here


def write_all(fd: int, data: bytes, offset: int) -> None:
    """pwrite, failing on a short write: a slot must never claim bytes it does not hold."""
    written = os.pwrite(fd, data, offset)
    if written != len(data):
        raise OSError(f"short write ({written} of {len(data)} bytes)")


def mirror_directory(run_dir: Path, state_dir: Path) -> Path:
    """One directory per state dir: adoption is per state dir."""
    tag = hashlib.sha256(os.fsencode(os.path.realpath(state_dir))).hexdigest()[:16]
    return run_dir / f"locks-{tag}"


def encode_header(fid: int, attrs: Attrs, size: int,
                  names: list[tuple[bytes, bytes]]) -> bytes:
    try:
        body = bytearray(BODY.pack(fid, attrs.mode, attrs.uid, attrs.gid, attrs.atime_ns,
                                   attrs.ctime_ns, len(names)))
        for dirpath, name in names:
            body += NAME.pack(len(dirpath), len(name)) + dirpath + name
    except struct.error as exc:
        raise OSError(f"lock not mirrorable: {exc}") from exc
    header = (STATE.pack(attrs.mtime_ns, size)
              + SEAL.pack(xxhash.xxh3_64_intdigest(body), len(body)) + body)
    if len(header) > HEADER_SIZE:
        raise OSError(f"names too long for the header ({len(header)} bytes)")
    return header


def decode_header(header: bytes) -> tuple[int, Attrs, list[tuple[bytes, bytes]]]:
    """The fid, the attributes (size set, without nlink) and the names; ValueError if the
    slot is free or damaged."""
    if len(header) < BODY_START:
        raise ValueError("header cut short")
    mtime_ns, size = STATE.unpack_from(header)
    checksum, length = SEAL.unpack_from(header, STATE.size)
    body = header[BODY_START:BODY_START + length]
    if (checksum, length) == (0, 0):
        raise FreeSlot("free")
    if len(body) != length or xxhash.xxh3_64_intdigest(body) != checksum:
        raise ValueError("header checksum mismatch")
    # The size sits outside the seal; a lock renamed over an index file must fit a record.
    if not 0 <= size <= MAX_RECORD:
        raise ValueError(f"size {size} out of range")
    fid, mode, uid, gid, atime_ns, ctime_ns, count = BODY.unpack_from(body)
    names = []
    at = BODY.size
    for _ in range(count):
        path_length, name_length = NAME.unpack_from(body, at)
        at += NAME.size
        names.append((bytes(body[at:at + path_length]),
                      bytes(body[at + path_length:at + path_length + name_length])))
        at += path_length + name_length
    return fid, Attrs(mode, uid, gid, 0, size, atime_ns, mtime_ns, ctime_ns), names


class LockMirror:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._slots: dict[int, Slot] = {}  # by fid
        self._free: list[Slot] = []
        self._slot_count = 0
        self._unmirrored: set[int] = set()
        self.failures = 0

    # -------------------------------------------------------------- the daemon's life

    def open(self, keep: bool) -> list[MirroredLock]:
        """Make the directory; `keep` (an adopted connection): load the locks in it, else
        remove them."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(self.directory)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise OSError(f"{self.directory} is not a directory of this user")
        os.chmod(self.directory, 0o700)
        if not keep:
            self._remove_all()
            return []
        return self._load()

    def remove(self) -> None:
        """At a clean stop: no process can hold a lock of this mount any more."""
        self.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def close(self) -> None:
        for slot in [*self._slots.values(), *self._free]:
            with contextlib.suppress(OSError):
                os.close(slot.fd)
        self._slots.clear()
        self._free.clear()

    # -------------------------------------------------------------- changes to locks

    def saved(self, fid: int, attrs: Attrs, size: int,
              names: Iterable[tuple[bytes, bytes]]) -> None:
        """A lock was made, or its names, attributes or size changed."""
        if fid in self._unmirrored:
            return
        try:
            slot = self._slot(fid)
            if size > slot.size:
                self._zero_leftovers(slot, slot.size, size)
            write_all(slot.fd, encode_header(fid, attrs, size, list(names)), 0)
            slot.size = size
        except OSError as exc:
            self._lost(fid, exc)

    def wrote(self, fid: int, offset: int, data: bytes, mtime_ns: int) -> None:
        slot = self._slots.get(fid)
        if slot is None:
            return
        end = offset + len(data)
        try:
            if offset > slot.size:
                self._zero_leftovers(slot, slot.size, offset)
            # Raised first: a write that fails part-way has still left bytes there.
            slot.dirty_end = max(slot.dirty_end, end)
            write_all(slot.fd, data, HEADER_SIZE + offset)
            slot.size = max(slot.size, end)
            write_all(slot.fd, STATE.pack(mtime_ns, slot.size), 0)
        except OSError as exc:
            self._lost(fid, exc)

    def dropped(self, fid: int) -> None:
        """The lock has no name left, or became an index file."""
        self._unmirrored.discard(fid)
        slot = self._slots.pop(fid, None)
        if slot is not None:
            self._free_slot(slot)

    # -------------------------------------------------------------- internals

    def _slot(self, fid: int) -> Slot:
        slot = self._slots.get(fid)
        if slot is None:
            if self._free:
                slot = self._free.pop()
            else:
                name = f"{SLOT_PREFIX}{self._slot_count}"
                slot = Slot(name, os.open(self.directory / name,
                                          os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                                          0o600))
                self._slot_count += 1
            self._slots[fid] = slot
        return slot

    def _free_slot(self, slot: Slot) -> None:
        try:
            write_all(slot.fd, FREE, 0)
            if slot.dirty_end > SHRINK_ABOVE:
                # A large lock's bytes would otherwise hold RAM (a tmpfs) until a clean stop.
                os.ftruncate(slot.fd, HEADER_SIZE)
                slot.dirty_end = 0
        except OSError:
            # Not reused, and removed: it may still hold the lock that has just gone.
            with contextlib.suppress(OSError):
                os.close(slot.fd)
            self._forget(slot.name)
            return
        slot.size = 0
        self._free.append(slot)

    def _forget(self, name: str) -> None:
        """Remove a slot that cannot be freed or read."""
        try:
            os.unlink(self.directory / name)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("cannot remove lock mirror %s (%s): a daemon adopting this mount after "
                      "a crash may take back a lock that was gone", name, exc)

    @staticmethod
    def _zero_leftovers(slot: Slot, start: int, end: int) -> None:
        """The lock grows from `start` to `end` without writing there: it must read as
        zeros, not as what an earlier lock in this slot left."""
        end = min(end, slot.dirty_end)
        if start < end:
            write_all(slot.fd, bytes(end - start), HEADER_SIZE + start)

    def _lost(self, fid: int, exc: OSError) -> None:
        self.failures += 1
        log.warning("lock file %d is no longer mirrored (%s): a daemon adopting this mount "
                    "after a crash will not find it", fid, exc)
        self.dropped(fid)
        self._unmirrored.add(fid)

    def _remove_all(self) -> None:
        for entry in os.scandir(self.directory):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)

    def _load(self) -> list[MirroredLock]:
        locks = []
        for entry in os.scandir(self.directory):
            number = entry.name.removeprefix(SLOT_PREFIX)
            if not (number.isascii() and number.isdigit()) or entry.name == number:
                log.warning("%s in the lock mirror is no slot: removed", entry.name)
                self._forget(entry.name)
                continue
            self._slot_count = max(self._slot_count, int(number) + 1)
            try:
                # The private directory's entry: its size is what the slot holds.
                file_size = entry.stat(follow_symlinks=False).st_size
                fd = os.open(entry.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError as exc:
                log.warning("lock file mirror %s unreadable (%s): left out", entry.name, exc)
                self._forget(entry.name)  # not reusable without knowing what it holds
                continue
            slot = Slot(entry.name, fd, dirty_end=max(0, file_size - HEADER_SIZE))
            lock = self._loaded(slot)
            if lock is not None:
                locks.append(lock)
        return locks

    def _loaded(self, slot: Slot) -> MirroredLock | None:
        """The lock in a slot, which is now that lock's; None for a free or damaged slot,
        which is freed."""
        fd, name = slot.fd, slot.name
        try:
            fid, attrs, names = decode_header(os.pread(fd, HEADER_SIZE, 0))
            if fid in self._slots:
                raise ValueError(f"lock {fid} is in another slot too")
            content = bytearray(os.pread(fd, min(attrs.size, slot.dirty_end), HEADER_SIZE))
        except (OSError, ValueError, struct.error) as exc:
            if not isinstance(exc, FreeSlot):
                log.warning("lock file mirror %s unreadable (%s): left out", name, exc)
            self._free_slot(slot)
            return None
        # Past the end of the file is a hole: zeros.
        content.extend(bytes(attrs.size - len(content)))
        slot.size = attrs.size
        self._slots[fid] = slot
        attrs.nlink = len(names)
        attrs.ctime_ns = max(attrs.ctime_ns, attrs.mtime_ns)
        return MirroredLock(fid, attrs, content, names)
