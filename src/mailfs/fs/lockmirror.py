"""Lock files kept where a crashed daemon's successor finds them.

Lock files (the volatile class) live in the daemon's RAM. An index-only mount's connection
outlives a daemon crash (adoption.py), and so do the processes on it: a Dovecot that held
`dovecot-uidlist.lock` when the daemon died goes on writing it, truncating it and renaming
it over the uidlist through the adopting daemon. A lock that died with the daemon fails
those calls with ENOENT, and Dovecot logs an error for each of them.

So each lock file is mirrored into a directory under the run dir, one pair of files per
lock: `<fid>` holds its content (written at the same offsets, its mtime set to the lock's)
and `<fid>.meta` its names and other attributes (written whole, then renamed into place).
A process crash leaves both in the page cache. The adopting daemon loads them; a fresh
mount and a clean stop remove them.

A lock whose mirror could not be written is no longer mirrored, and what there was of it
is removed: a mirror behind the lock would give the next daemon stale content to rename
over an index file, which is worse than no lock at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mailfs.cachemgr.records import Attrs

log = logging.getLogger(__name__)

META = ".meta"
PARTIAL = ".partial"


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

    def saved(self, fid: int, attrs: Attrs, names: Iterable[tuple[bytes, bytes]],
              content: bytes | bytearray | None = None) -> None:
        """A lock's names or attributes changed (`content`: and its content, whole)."""
        if fid in self._unmirrored:
            return
        try:
            fd = self._fd(fid)
            if content is not None:
                os.ftruncate(fd, 0)
                os.pwrite(fd, content, 0)
            os.utime(fd, ns=(attrs.atime_ns, attrs.mtime_ns))
            meta = {"mode": attrs.mode, "uid": attrs.uid, "gid": attrs.gid,
                    "atime_ns": attrs.atime_ns, "ctime_ns": attrs.ctime_ns,
                    "names": [[dirpath.hex(), name.hex()] for dirpath, name in names]}
            partial = self._path(fid, PARTIAL)
            with open(partial, "w", encoding="ascii") as file:
                json.dump(meta, file)
            os.replace(partial, self._path(fid, META))
        except OSError as exc:
            self._lost(fid, exc)

    def wrote(self, fid: int, offset: int, data: bytes, mtime_ns: int) -> None:
        if fid in self._unmirrored or fid not in self._fds:
            return
        fd = self._fds[fid]
        try:
            os.pwrite(fd, data, offset)
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        except OSError as exc:
            self._lost(fid, exc)

    def resized(self, fid: int, size: int, attrs: Attrs,
                names: Iterable[tuple[bytes, bytes]]) -> None:
        if fid in self._unmirrored or fid not in self._fds:
            return
        try:
            os.ftruncate(self._fds[fid], size)
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
        for suffix in (META, "", PARTIAL):
            try:
                os.unlink(self._path(fid, suffix))
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.error("cannot remove the mirror of lock file %d (%s): a daemon adopting "
                          "this mount after a crash may find it", fid, exc)

    # -------------------------------------------------------------- internals

    def _path(self, fid: int, suffix: str) -> Path:
        return self.directory / f"{fid}{suffix}"

    def _fd(self, fid: int) -> int:
        fd = self._fds.get(fid)
        if fd is None:
            fd = self._fds[fid] = os.open(self._path(fid, ""),
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
            if not entry.name.endswith(META):
                continue
            fid_text = entry.name[:-len(META)]
            try:
                fid = int(fid_text)
                locks.append(self._loaded(fid))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("lock file mirror %s unreadable (%s): left out", entry.name, exc)
        return locks

    def _loaded(self, fid: int) -> MirroredLock:
        with open(self._path(fid, META), encoding="ascii") as file:
            meta = json.load(file)
        fd = os.open(self._path(fid, ""), os.O_RDWR | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            content = bytearray(os.pread(fd, st.st_size, 0)) if st.st_size else bytearray()
        except OSError:
            os.close(fd)
            raise
        self._fds[fid] = fd
        names = [(bytes.fromhex(dirpath), bytes.fromhex(name))
                 for dirpath, name in meta["names"]]
        attrs = Attrs(int(meta["mode"]), int(meta["uid"]), int(meta["gid"]), len(names),
                      len(content), int(meta["atime_ns"]), st.st_mtime_ns,
                      max(int(meta["ctime_ns"]), st.st_mtime_ns))
        return MirroredLock(fid, attrs, content, names)
