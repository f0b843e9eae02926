"""LockMirror on a real directory: what a daemon adopting a crashed one's connection gets
back, and what it must never get (a mirror that fell behind its lock)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mailfs.cachemgr.records import Attrs
from mailfs.fs.lockmirror import (
    HEADER_SIZE,
    SHRINK_ABOVE,
    LockMirror,
    decode_header,
    encode_header,
    mirror_directory,
)

NAME = (b"alice/control/.INBOX", b"dovecot-uidlist.lock")


def attrs(mtime_ns: int = 1_700_000_000_123_456_789) -> Attrs:
    return Attrs(0o100600, 8, 8, 1, 0, mtime_ns, mtime_ns, mtime_ns)


def test_a_lock_comes_back_as_it_was(tmp_path: Path) -> None:
    mirror = LockMirror(tmp_path / "locks")
    assert mirror.open(keep=False) == []
    mirror.saved(41, attrs(), 0, [NAME])
    mirror.wrote(41, 0, b"3 V1 N2 with a longer line", 1_700_000_001_000_000_007)
    mirror.saved(41, attrs(1_700_000_002_000_000_003), 7, [NAME, (b"alice", b"x.lock")])
    mirror.wrote(41, 7, b"\n", 1_700_000_003_000_000_001)
    mirror.close()  # a crash: nothing more is written

    [lock] = LockMirror(tmp_path / "locks").open(keep=True)
    assert lock.fid == 41
    assert bytes(lock.content) == b"3 V1 N2\n"
    assert lock.names == [NAME, (b"alice", b"x.lock")]
    assert (lock.attrs.nlink, lock.attrs.size, lock.attrs.mode) == (2, 8, 0o100600)
    assert lock.attrs.mtime_ns == 1_700_000_003_000_000_001  # exact, not the clock's tick


def test_a_fresh_mount_and_a_clean_stop_leave_no_locks(tmp_path: Path) -> None:
    mirror = LockMirror(tmp_path / "locks")
    mirror.open(keep=False)
    mirror.saved(7, attrs(), 0, [NAME])
    mirror.close()
    assert LockMirror(tmp_path / "locks").open(keep=False) == []
    assert os.listdir(tmp_path / "locks") == []
    again = LockMirror(tmp_path / "locks")
    again.open(keep=False)
    again.saved(8, attrs(), 0, [NAME])
    again.remove()
    assert not (tmp_path / "locks").exists()


def test_a_dropped_lock_is_gone(tmp_path: Path) -> None:
    mirror = LockMirror(tmp_path / "locks")
    mirror.open(keep=False)
    mirror.saved(5, attrs(), 0, [NAME])
    mirror.wrote(5, 0, b"content", 1)
    mirror.dropped(5)
    assert LockMirror(tmp_path / "locks").open(keep=True) == []


def test_a_mirror_that_could_not_keep_up_is_never_served(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write the mirror missed would hand the next daemon stale content, which Dovecot
    could then rename over its uidlist: the whole lock is left out instead."""
    mirror = LockMirror(tmp_path / "locks")
    mirror.open(keep=False)
    mirror.saved(9, attrs(), 0, [NAME])
    mirror.wrote(9, 0, b"first half ", 1)
    real_pwrite = os.pwrite

    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    mirror.wrote(9, 11, b"second half", 2)
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    mirror.wrote(9, 22, b" and more", 3)  # the lock goes on; its mirror does not
    mirror.saved(9, attrs(), 33, [NAME])
    assert mirror.failures == 1
    mirror.close()
    assert LockMirror(tmp_path / "locks").open(keep=True) == []


def test_slots_are_reused_and_hold_nothing_of_an_earlier_lock(tmp_path: Path) -> None:
    """A new lock in a reused slot, grown by a sparse write or a truncate, reads zeros
    where the earlier lock had content."""
    mirror = LockMirror(tmp_path / "locks")
    mirror.open(keep=False)
    for fid in range(100, 150):
        mirror.saved(fid, attrs(), 0, [NAME])
        mirror.wrote(fid, 0, b"old content of an earlier lock", 1)
        mirror.dropped(fid)
    assert os.listdir(tmp_path / "locks") == ["slot-0"]
    mirror.saved(200, attrs(), 0, [NAME])
    mirror.wrote(200, 4, b"new", 2)
    mirror.saved(201, attrs(), 0, [(b"alice", b"other.lock")])
    mirror.saved(201, attrs(), 6, [(b"alice", b"other.lock")])  # ftruncate to 6
    mirror.close()

    locks = {lock.fid: lock for lock in LockMirror(tmp_path / "locks").open(keep=True)}
    assert bytes(locks[200].content) == b"\0\0\0\0new"
    assert bytes(locks[201].content) == bytes(6)
    assert sorted(os.listdir(tmp_path / "locks")) == ["slot-0", "slot-1"]


def test_a_taken_back_slot_is_reused_after_its_lock_is_dropped(tmp_path: Path) -> None:
    mirror = LockMirror(tmp_path / "locks")
    mirror.open(keep=False)
    mirror.saved(1, attrs(), 0, [NAME])
    mirror.saved(2, attrs(), 0, [NAME])
    mirror.dropped(1)
    mirror.close()
    adopting = LockMirror(tmp_path / "locks")
    assert [lock.fid for lock in adopting.open(keep=True)] == [2]
    adopting.dropped(2)
    for fid in (3, 4, 5):
        adopting.saved(fid, attrs(), 0, [NAME])
    adopting.close()
    assert sorted(os.listdir(tmp_path / "locks")) == ["slot-0", "slot-1", "slot-2"]
    assert sorted(lock.fid for lock in LockMirror(tmp_path / "locks").open(keep=True)) == [
        3, 4, 5]


def test_a_short_write_drops_the_mirror(tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A nearly full tmpfs may take part of a write: the slot must not claim the rest."""
    mirror = LockMirror(tmp_path / "locks")
    mirror.open(keep=False)
    mirror.saved(1, attrs(), 0, [NAME])
    mirror.wrote(1, 0, b"earlier lock, longer content", 1)
    mirror.dropped(1)
    mirror.saved(2, attrs(), 0, [NAME])
    real_pwrite = os.pwrite
    monkeypatch.setattr(os, "pwrite",
                        lambda fd, data, offset: real_pwrite(fd, data[:len(data) // 2], offset))
    mirror.wrote(2, 0, b"new content", 2)
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    assert mirror.failures == 1
    mirror.close()
    assert LockMirror(tmp_path / "locks").open(keep=True) == []


def test_a_large_lock_gives_its_room_back_when_dropped(tmp_path: Path) -> None:
    mirror = LockMirror(tmp_path / "locks")
    mirror.open(keep=False)
    mirror.saved(1, attrs(), 0, [NAME])
    mirror.wrote(1, 0, bytes(SHRINK_ABOVE + 1), 1)
    mirror.dropped(1)
    assert os.path.getsize(tmp_path / "locks" / "slot-0") == HEADER_SIZE
    mirror.saved(2, attrs(), 0, [NAME])
    mirror.saved(2, attrs(), 10, [NAME])
    mirror.close()
    [lock] = LockMirror(tmp_path / "locks").open(keep=True)
    assert bytes(lock.content) == bytes(10)


def test_files_that_are_no_slots_are_removed_and_the_rest_loads(tmp_path: Path) -> None:
    mirror = LockMirror(tmp_path / "locks")
    mirror.open(keep=False)
    mirror.saved(6, attrs(), 0, [NAME])
    mirror.close()
    for stray in ("slot-\u00b2", "17", "slot-"):  # a digit int() refuses, the old format
        (tmp_path / "locks" / stray).write_bytes(b"x")
    [lock] = LockMirror(tmp_path / "locks").open(keep=True)
    assert lock.fid == 6
    assert os.listdir(tmp_path / "locks") == ["slot-0"]


def test_a_damaged_entry_is_left_out(tmp_path: Path) -> None:
    mirror = LockMirror(tmp_path / "locks")
    mirror.open(keep=False)
    mirror.saved(3, attrs(), 0, [NAME])
    mirror.saved(4, attrs(), 0, [NAME])
    mirror.saved(5, attrs(), 0, [NAME])
    mirror.close()
    with open(tmp_path / "locks" / "slot-0", "r+b") as damaged:
        damaged.seek(30)  # inside the sealed body
        damaged.write(b"\xff")
    with open(tmp_path / "locks" / "slot-2", "r+b") as damaged:
        damaged.seek(8)  # the size, outside the seal
        damaged.write((1 << 50).to_bytes(8, "little"))
    [lock] = LockMirror(tmp_path / "locks").open(keep=True)
    assert lock.fid == 4


def test_names_and_attributes_survive_the_header_round_trip() -> None:
    names = [(b"", b"a.lock"), (b"alice/mail/.Sent", b"dovecot-uidlist.lock")]
    original = attrs()
    fid, decoded, decoded_names = decode_header(encode_header(12, original, 300, names))
    assert (fid, decoded_names, decoded.size) == (12, names, 300)
    assert (decoded.mode, decoded.uid, decoded.gid, decoded.atime_ns, decoded.mtime_ns,
            decoded.ctime_ns) == (original.mode, original.uid, original.gid,
                                  original.atime_ns, original.mtime_ns, original.ctime_ns)
    with pytest.raises(ValueError):
        decode_header(bytes(HEADER_SIZE))  # a free slot, or one made just before a crash


def test_a_directory_someone_else_owns_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "locks").symlink_to(target)
    with pytest.raises(OSError):
        LockMirror(tmp_path / "locks").open(keep=True)


def test_each_state_dir_has_its_own_directory(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert mirror_directory(run, tmp_path / "a") != mirror_directory(run, tmp_path / "b")
    assert mirror_directory(run, tmp_path / "a").parent == run


def test_a_lock_cut_short_and_written_past_its_end_reads_zeros_between(
        tmp_path: Path) -> None:
    """Dovecot truncates a lock and writes again: the bytes the truncate cut off must not
    come back in the gap a later write leaves."""
    mirror = LockMirror(tmp_path / "locks")
    mirror.open(keep=False)
    mirror.saved(3, attrs(), 0, [NAME])
    mirror.wrote(3, 0, b"0123456789abcdef", 1)
    mirror.saved(3, attrs(), 4, [NAME])  # ftruncate to 4
    mirror.wrote(3, 8, b"XY", 2)
    mirror.close()
    [lock] = LockMirror(tmp_path / "locks").open(keep=True)
    assert bytes(lock.content) == b"0123\0\0\0\0XY"
