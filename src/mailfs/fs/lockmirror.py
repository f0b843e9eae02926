"""Lock files kept where a crashed daemon's successor finds them.

Lock files (the volatile class) live in the daemon's RAM. An index-only mount's connection
outlives a daemon crash (adoption.py), and so do the processes on it: a Dovecot that held
`dovecot-uidlist.lock` when the daemon died goes on writing it, truncating it and renaming
it over the uidlist through the adopting daemon. A lock that died with the daemon fails
those calls with ENOENT, and Dovecot logs an error for each of them.

So each lock file is mirrored into a directory under the run dir, one file per lock,
named by its fid: a header page (names and attributes, checksummed; the mtime apart, as a
write moves it) and then the content, written at the same offsets. A process crash leaves
it in the page cache. The adopting daemon loads them; a fresh mount and a clean stop
remove them. A lock cycle costs a handful of system calls on the trio thread (a first
version with a JSON file renamed into place cost about 100 us of CPU per lock).

A lock whose mirror could not be written is no longer mirrored, and what there was of it
is removed: a mirror behind the lock would give the next daemon stale content to rename
over an index file, which is worse than no lock at all.
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

from mailfs.cachemgr.records import Attrs

log = logging.getLogger(__name__)

# The content starts here; the header page before it.
HEADER_SIZE = 4096
MTIME = struct.Struct("<q")  # at offset 0: set after every write, so not checksummed
SEAL = struct.Struct("<QI")  # at MTIME.size: xxh3 of the body, body length
BODY = struct.Struct("<IIIqqH")  # mode, uid, gid, atime_ns, ctime_ns, number of names
NAME = struct.Struct("<HH")  # lengths of a name's directory path and of the name
BODY_START = MTIME.size + SEAL.size


@dataclass
class MirroredLock:
    fid: int
    attrs: Attrs
    content: bytearray
    names: list[tuple[bytes, bytes]]


def mirror_directory(run_dir: Path, state_dir: Path) -> Path:
    """One directory per state dir: adoption is per state dir."""
    tag = hashlib.sha256(os.fsencode(os.path.realpath(state_dir))).hexdigest()[:16]
    return run_dir / f"locks-{tag}"


def encode_header(attrs: Attrs, names: list[tuple[bytes, bytes]]) -> bytes:
    body = bytearray(BODY.pack(attrs.mode, attrs.uid, attrs.gid, attrs.atime_ns,
                               attrs.ctime_ns, len(names)))
    for dirpath, name in names:
        body += NAME.pack(len(dirpath), len(name)) + dirpath + name
    header = MTIME.pack(attrs.mtime_ns) + SEAL.pack(xxhash.xxh3_64_intdigest(body),
                                                    len(body)) + body
    if len(header) > HEADER_SIZE:
        raise OSError(f"names too long for the header ({len(header)} bytes)")
    # Whole, so that a new file is long enough to hold content from the first save on.
    return header.ljust(HEADER_SIZE, b"\0")


def decode_header(header: bytes) -> tuple[Attrs, list[tuple[bytes, bytes]]]:
    """The attributes (without nlink and size) and the names; ValueError if damaged."""
    if len(header) < BODY_START:
        raise ValueError("header cut short")
    (mtime_ns,) = MTIME.unpack_from(header)
    checksum, length = SEAL.unpack_from(header, MTIME.size)
    body = header[BODY_START:BODY_START + length]
    if len(body) != length or xxhash.xxh3_64_intdigest(body) != checksum:
        raise ValueError("header checksum mismatch")
    mode, uid, gid, atime_ns, ctime_ns, count = BODY.unpack_from(body)
    names = []
    at = BODY.size
    for _ in range(count):
        path_length, name_length = NAME.unpack_from(body, at)
        at += NAME.size
        names.append((bytes(body[at:at + path_length]),
                      bytes(body[at + path_length:at + path_length + name_length])))
        at += path_length + name_length
    return Attrs(mode, uid, gid, 0, 0, atime_ns, mtime_ns, ctime_ns), names


class LockMirror:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._fds: dict[int, int] = {}
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
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

    # -------------------------------------------------------------- changes to locks

    def saved(self, fid: int, attrs: Attrs, names: Iterable[tuple[bytes, bytes]]) -> None:
        """A lock was made, or its names or attributes changed."""
        if fid in self._unmirrored:
            return
        try:
            os.pwrite(self._fd(fid), encode_header(attrs, list(names)), 0)
        except OSError as exc:
            self._lost(fid, exc)

    def wrote(self, fid: int, offset: int, data: bytes, mtime_ns: int) -> None:
        fd = self._fds.get(fid)
        if fd is None:
            return
        try:
            os.pwrite(fd, data, HEADER_SIZE + offset)
            os.pwrite(fd, MTIME.pack(mtime_ns), 0)
        except OSError as exc:
            self._lost(fid, exc)

    def resized(self, fid: int, size: int, attrs: Attrs,
                names: Iterable[tuple[bytes, bytes]]) -> None:
        fd = self._fds.get(fid)
        if fd is None:
            return
        try:
            os.ftruncate(fd, HEADER_SIZE + size)
        except OSError as exc:
            self._lost(fid, exc)
            return
        self.saved(fid, attrs, names)

    def dropped(self, fid: int) -> None:
        """The lock has no name left, or became an index file."""
        self._unmirrored.discard(fid)
        fd = self._fds.pop(fid, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        try:
            os.unlink(self._path(fid))
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("cannot remove the mirror of lock file %d (%s): a daemon adopting "
                      "this mount after a crash may find it", fid, exc)

    # -------------------------------------------------------------- internals

    def _path(self, fid: int) -> Path:
        return self.directory / str(fid)

    def _fd(self, fid: int) -> int:
        fd = self._fds.get(fid)
        if fd is None:
            fd = self._fds[fid] = os.open(self._path(fid),
                                          os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return fd

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
            try:
                locks.append(self._loaded(int(entry.name)))
            except (OSError, ValueError, struct.error) as exc:
                log.warning("lock file mirror %s unreadable (%s): left out", entry.name, exc)
        return locks

    def _loaded(self, fid: int) -> MirroredLock:
        fd = os.open(self._path(fid), os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size - HEADER_SIZE
            if size < 0:
                raise ValueError("no content page")
            attrs, names = decode_header(os.pread(fd, HEADER_SIZE, 0))
            content = bytearray(os.pread(fd, size, HEADER_SIZE)) if size else bytearray()
            if len(content) != size:
                raise ValueError("content cut short")
        except BaseException:
            os.close(fd)
            raise
        self._fds[fid] = fd
        attrs.nlink = len(names)
        attrs.size = size
        attrs.ctime_ns = max(attrs.ctime_ns, attrs.mtime_ns)
        return MirroredLock(fid, attrs, content, names)
