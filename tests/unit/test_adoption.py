"""The pieces a restarted daemon adopts a connection with: the record, handle numbers, the
fid mark (the end-to-end behaviour is in tests/mount/test_adoption.py)."""

from __future__ import annotations

import stat
import struct
from pathlib import Path

import pytest

from mailfs.adoption import RESEND_SINCE, ConnectionRecord, load_record, save_record, stat_of
from mailfs.cachemgr.metastore import FID_MARK, FidMark, MetaStore
from mailfs.fs.nodes import HANDLE_INODE_BITS, REPLICATED_BASE, handle_number, inode_of_handle
from mailfs.replication.identity import make_fid

# fuse_in_header (40 bytes) then fuse_init_in: major, minor, max_readahead, flags.
FUSE_INIT = 26


def init_request(major: int, minor: int) -> bytes:
    header = struct.pack("<IIQQIIIHH", 56, FUSE_INIT, 2, 0, 0, 0, 0, 0, 0)
    return header + struct.pack("<IIII", major, minor, 131072, 0)


def record(minor: int = 45) -> ConnectionRecord:
    root = stat_of(stat.S_IFDIR | 0o750, 8, 8, 1_000_000_001, 2_000_000_002, 3_000_000_003)
    return ConnectionRecord("/srv/index", "0:52", init_request(7, minor), root)


def test_a_record_comes_back_as_it_was_saved(tmp_path: Path) -> None:
    save_record(tmp_path, record())
    loaded = load_record(tmp_path)
    assert loaded is not None
    assert (loaded.mountpoint, loaded.device) == ("/srv/index", "0:52")
    assert loaded.init_request == record().init_request
    assert loaded.protocol == (7, 45)
    root = loaded.root_stat
    assert (stat.S_IMODE(root.st_mode), root.st_uid, root.st_gid) == (0o750, 8, 8)
    assert (root.st_atime_ns, root.st_mtime_ns, root.st_ctime_ns) == (
        1_000_000_001, 2_000_000_002, 3_000_000_003)


@pytest.mark.parametrize("damage", [b"", b"{", b'{"version": 99}', b'{"version": 1}',
                                    b'{"version": 1, "mountpoint": "/x", "device": "0:1", '
                                    b'"init": "zz", "root": [16877, 0, 0, 0, 0, 0]}',
                                    b'{"version": 1, "mountpoint": "/x", "device": "0:1", '
                                    b'"init": "", "root": [33188, 0, 0, 0, 0, 0]}'])
def test_a_damaged_record_means_mounting_afresh(tmp_path: Path, damage: bytes) -> None:
    (tmp_path / "connection.json").write_bytes(damage)
    assert load_record(tmp_path) is None


def test_resending_needs_protocol_7_40() -> None:
    assert record(minor=39).protocol < RESEND_SINCE <= record(minor=40).protocol
    short = ConnectionRecord("/m", "0:1", b"\0" * 20, record().root_stat)
    assert short.protocol == (0, 0)


@pytest.mark.parametrize("inode", [1, 2, REPLICATED_BASE + 1,
                                   REPLICATED_BASE + make_fid(65535, (1 << 40) - 1)])
def test_a_handle_number_gives_back_its_inode(inode: int) -> None:
    for serial in (1, 17, 31):
        fh = handle_number(serial, inode)
        assert inode_of_handle(fh) == inode
        assert fh < 1 << 62, "bit 62 is the append tag"
        assert fh >> HANDLE_INODE_BITS == serial


def test_the_fid_mark_outlives_its_process(tmp_path: Path) -> None:
    mark = FidMark(tmp_path / FID_MARK)
    assert mark.value == 0
    mark.raise_to(12345)
    # No close, no flush: a killed daemon does neither; the page cache has the store.
    again = FidMark(tmp_path / FID_MARK)
    assert again.value == 12345
    mark.close()
    again.close()


def test_a_reserved_fid_is_never_handed_out_again_after_a_crash(tmp_path: Path) -> None:
    """A lock file's fid is not journaled; the next store must start past it."""
    store = MetaStore(tmp_path, 1 << 20, 1 << 24, 1.0, 1 << 20)
    store.recover()
    created = store.create(b"", b"dovecot.index", 0o100600, 0, 0).fid
    reserved = [store.reserve_fid() for _ in range(3)]
    assert created < reserved[0] < reserved[1] < reserved[2]
    # A crash: no clean stop, nothing committed beyond what the journal holds.
    store.close()
    again = MetaStore(tmp_path, 1 << 20, 1 << 24, 1.0, 1 << 20)
    assert again.recover() == 1  # the create, from the journal
    assert again.create(b"", b"dovecot.index.log", 0o100600, 0, 0).fid > reserved[-1]
    again.close()
