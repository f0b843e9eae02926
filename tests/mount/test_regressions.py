"""Regression tests for bugs found in review, through a real mount."""

from __future__ import annotations

import os

from tests.mount.conftest import Dirs
from tests.rigs.mount import MailfsMount


def drop_kernel_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as handle:
        handle.write("2\n")


def test_lock_file_survives_kernel_forget(make_mount, dirs: Dirs) -> None:  # type: ignore[no-untyped-def]
    """A closed lock file whose inode the kernel forgot must still be found by lookup."""
    mount = make_mount(expect_errors=True)
    lock = mount.mountpoint / "dovecot-uidlist.lock"
    fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"12345\n")
    os.close(fd)
    drop_kernel_caches()  # the kernel sends FORGET; mailfs drops the volatile node
    assert lock.read_bytes() == b"12345\n"  # lookup: KeyError in core.lookup -> EIO
    assert "dovecot-uidlist.lock" in os.listdir(mount.mountpoint)


def test_rmdir_after_deleting_imported_index_files(make_mount, dirs: Dirs) -> None:  # type: ignore[no-untyped-def]
    """A directory that looks empty through the mount must be removable (Dovecot DELETE)."""
    box = dirs.backing / "box"
    box.mkdir()
    (box / "dovecot.index").write_bytes(b"old index")
    mount = make_mount()
    mbox = mount.mountpoint / "box"
    assert os.listdir(mbox) == ["dovecot.index"]  # imported
    (mbox / "dovecot.index").unlink()
    assert os.listdir(mbox) == []
    os.rmdir(mbox)  # ENOTEMPTY: the hidden backing copy is still there
    assert not mbox.exists()


def test_fstat_of_unlinked_open_maildir_file(mount: MailfsMount) -> None:
    """fstat on an open file must keep working after the file is unlinked (expunge vs reader)."""
    (mount.mountpoint / "cur").mkdir()
    path = mount.mountpoint / "cur" / "1.M1:2,"
    path.write_bytes(b"x" * 1000)
    fd = os.open(path, os.O_RDONLY)
    try:
        path.unlink()
        assert os.fstat(fd).st_size == 1000  # getattr lstat()s the old path: ENOENT
    finally:
        os.close(fd)


def test_fstat_of_open_file_replaced_by_rename(mount: MailfsMount) -> None:
    """An open file replaced by rename() keeps its own size, not the new file's."""
    (mount.mountpoint / "cur").mkdir()
    old = mount.mountpoint / "cur" / "a"
    new = mount.mountpoint / "cur" / "b"
    old.write_bytes(b"o" * 1000)
    new.write_bytes(b"n" * 10)
    fd = os.open(old, os.O_RDONLY)
    try:
        os.rename(new, old)
        assert os.fstat(fd).st_size == 1000  # getattr stats the name: 10
        assert os.pread(fd, 2000, 0) == b"o" * 1000
    finally:
        os.close(fd)


def test_rename_dir_over_empty_dir_keeps_backing_index(make_mount, dirs: Dirs) -> None:  # type: ignore[no-untyped-def]
    """Renaming a not-yet-imported dir over an empty one must not hide its index files."""
    (dirs.backing / "src").mkdir()
    (dirs.backing / "src" / "dovecot.index").write_bytes(b"index from NFS")
    mount = make_mount()
    os.mkdir(mount.mountpoint / "dst")  # marked imported
    os.rename(mount.mountpoint / "src", mount.mountpoint / "dst")  # marker of dst stays
    assert (mount.mountpoint / "dst" / "dovecot.index").read_bytes() == b"index from NFS"


def test_export_never_writes_outside_the_backing_path(make_mount, dirs: Dirs) -> None:  # type: ignore[no-untyped-def]
    """A name like '../escape' in the store (from a peer before names were checked, or a
    damaged state dir) must not make `mailfs export`, which runs as root, write there."""
    import lmdb

    from tests.rigs.mount import run_cli

    mount = make_mount(expect_errors=True)
    (mount.mountpoint / "box").mkdir()
    (mount.mountpoint / "box" / "dovecot.index").write_bytes(b"index")
    mount.stop()
    env = lmdb.open(str(dirs.state / "lmdb"), max_dbs=8)
    try:
        names = env.open_db(b"names")
        with env.begin(write=True) as txn:
            fid = txn.get(b"box\0dovecot.index", db=names)
            assert fid is not None
            txn.put(b"../escape\0dovecot.index", fid, db=names)
    finally:
        env.close()
    outside = dirs.backing.parent / "escape"
    outside.mkdir()
    mount = make_mount(expect_errors=True)
    result = run_cli("export", str(mount.mountpoint))
    assert result.returncode == 0, result.stderr
    assert (dirs.backing / "box" / "dovecot.index").read_bytes() == b"index"
    assert list(outside.iterdir()) == []
    assert "export skips" in mount.log()
