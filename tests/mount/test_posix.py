"""POSIX behaviour Dovecot relies on, through a real mount, for each file class."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import subprocess
import sys
import textwrap

import pytest

from tests.mount.conftest import Dirs
from tests.rigs.mount import MailfsMount

NOBODY = 65534
# The venv's interpreter lives under /root (mode 0700); an unprivileged caller needs
# the system one. These snippets use the standard library only.
SYSTEM_PYTHON = "/usr/bin/python3"


def run_as(uid: int, gid: int, umask: int, code: str) -> str:
    result = subprocess.run(
        [SYSTEM_PYTHON, "-c", textwrap.dedent(code)], user=uid, group=gid, umask=umask,
        extra_groups=[], capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_passthrough_files_land_on_backing(mount: MailfsMount, dirs: Dirs) -> None:
    (mount.mountpoint / "cur").mkdir()
    (mount.mountpoint / "cur" / "1.M1").write_bytes(b"message body")
    assert (dirs.backing / "cur" / "1.M1").read_bytes() == b"message body"
    assert (mount.mountpoint / "cur" / "1.M1").read_bytes() == b"message body"


def test_index_files_never_touch_backing(mount: MailfsMount, dirs: Dirs) -> None:
    (mount.mountpoint / "dovecot.index").write_bytes(b"I" * 100_000)
    (mount.mountpoint / "dovecot-uidlist").write_bytes(b"3 V1 N2\n")
    assert sorted(os.listdir(dirs.backing)) == []
    assert sorted(os.listdir(mount.mountpoint)) == ["dovecot-uidlist", "dovecot.index"]
    assert (mount.mountpoint / "dovecot.index").read_bytes() == b"I" * 100_000


def test_readdir_merges_backing_and_index_files(mount: MailfsMount) -> None:
    root = mount.mountpoint
    (root / "new").mkdir()
    (root / "new" / "m1").write_text("x")
    (root / "dovecot.index.log").write_text("log")
    (root / "dovecot-uidlist.lock").write_text("lock")
    assert sorted(os.listdir(root)) == ["dovecot-uidlist.lock", "dovecot.index.log", "new"]
    entries = {e.name: e.is_dir() for e in os.scandir(root)}
    assert entries == {"new": True, "dovecot.index.log": False, "dovecot-uidlist.lock": False}


@pytest.mark.parametrize("name", ["dovecot.index.log", "msg.file", "x.lock"])
def test_o_append(mount: MailfsMount, name: str) -> None:
    path = mount.mountpoint / name
    path.write_bytes(b"head")
    first = os.open(path, os.O_WRONLY | os.O_APPEND)
    second = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(first, b"-one")
        os.write(second, b"-two")
        os.lseek(first, 0, os.SEEK_SET)
        os.write(first, b"-three")
    finally:
        os.close(first)
        os.close(second)
    assert path.read_bytes() == b"head-one-two-three"


@pytest.mark.parametrize("name", ["dovecot.index.log", "msg.file", "x.lock"])
def test_o_append_follows_fcntl(mount: MailfsMount, name: str) -> None:
    """Dovecot marks a transaction log corrupted by dropping O_APPEND with fcntl and
    writing indexid=0 into the header. Had that write gone to the end instead, the header
    would still look valid and the log would gain a zero record: Dovecot then reports the
    log corrupted on every open, for good (seen after a full state disk in the soak run)."""
    path = mount.mountpoint / name
    path.write_bytes(b"HEADER--records")
    fd = os.open(path, os.O_RDWR | os.O_APPEND)
    try:
        os.write(fd, b"+more")
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_APPEND)
        assert os.pwrite(fd, b"\0\0\0\0", 2) == 4
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
        os.pwrite(fd, b"+last", 0)  # O_APPEND again: Linux appends whatever the offset
    finally:
        os.close(fd)
    assert path.read_bytes() == b"HE\0\0\0\0--records+more+last"

    plain = os.open(path, os.O_WRONLY)
    try:
        fcntl.fcntl(plain, fcntl.F_SETFL, fcntl.fcntl(plain, fcntl.F_GETFL) | os.O_APPEND)
        os.pwrite(plain, b"!", 0)
    finally:
        os.close(plain)
    assert path.read_bytes() == b"HE\0\0\0\0--records+more+last!"

@pytest.mark.parametrize("name", ["dovecot.index", "msg.file", "dovecot-uidlist.lock"])
def test_o_excl(mount: MailfsMount, name: str) -> None:
    path = mount.mountpoint / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    with pytest.raises(FileExistsError):
        os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)


def test_link_gives_index_files_inode_semantics(mount: MailfsMount) -> None:
    log = mount.mountpoint / "dovecot.index.log"
    log.write_bytes(b"records")
    os.link(log, mount.mountpoint / "dovecot.index.log.2")
    first, second = os.stat(log), os.stat(mount.mountpoint / "dovecot.index.log.2")
    assert first.st_ino == second.st_ino
    assert first.st_nlink == second.st_nlink == 2
    with open(log, "ab") as handle:
        handle.write(b"+more")
    assert (mount.mountpoint / "dovecot.index.log.2").read_bytes() == b"records+more"
    log.unlink()
    assert os.stat(mount.mountpoint / "dovecot.index.log.2").st_nlink == 1


def test_link_passthrough(mount: MailfsMount, dirs: Dirs) -> None:
    (mount.mountpoint / "a").write_text("mail")
    os.link(mount.mountpoint / "a", mount.mountpoint / "b")
    assert os.stat(mount.mountpoint / "b").st_nlink == 2
    assert os.stat(dirs.backing / "a").st_ino == os.stat(dirs.backing / "b").st_ino
    (mount.mountpoint / "a").unlink()
    assert (mount.mountpoint / "b").read_text() == "mail"


def test_rename_over_keeps_old_fd_reading_old_content(mount: MailfsMount) -> None:
    index = mount.mountpoint / "dovecot.index"
    index.write_bytes(b"old index")
    old_fd = os.open(index, os.O_RDONLY)
    old_ino = os.fstat(old_fd).st_ino
    try:
        tmp = mount.mountpoint / "dovecot.index.tmp"
        tmp.write_bytes(b"new index!")
        fd = os.open(tmp, os.O_RDONLY)
        os.fdatasync(fd)
        os.close(fd)
        os.rename(tmp, index)
        assert index.read_bytes() == b"new index!"
        assert not tmp.exists()
        assert os.stat(index).st_ino != old_ino
        assert os.pread(old_fd, 100, 0) == b"old index"
    finally:
        os.close(old_fd)


def test_dotlock_rename_promotes_and_fd_keeps_writing(mount: MailfsMount, dirs: Dirs) -> None:
    """dovecot.index.log.newlock is written, renamed over the log, and appended to via its fd."""
    lock = mount.mountpoint / "dovecot.index.log.newlock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, b"header")
        os.rename(lock, mount.mountpoint / "dovecot.index.log")
        os.write(fd, b"+appended")
    finally:
        os.close(fd)
    assert (mount.mountpoint / "dovecot.index.log").read_bytes() == b"header+appended"
    assert not lock.exists()
    assert os.listdir(dirs.backing) == []


def test_dotlock_promotion_survives_remount(make_mount, dirs: Dirs) -> None:  # type: ignore[no-untyped-def]
    mount = make_mount()
    lock = mount.mountpoint / "dovecot-uidlist.lock"
    lock.write_bytes(b"3 V123 N5\n1 :a\n")
    os.rename(lock, mount.mountpoint / "dovecot-uidlist")
    with pytest.raises(OSError) as linked:
        os.link(mount.mountpoint / "dovecot-uidlist", mount.mountpoint / "x.lock")
    assert linked.value.errno == errno.EXDEV
    mount.stop()
    mount = make_mount()
    assert (mount.mountpoint / "dovecot-uidlist").read_bytes() == b"3 V123 N5\n1 :a\n"
    assert not (mount.mountpoint / "dovecot-uidlist.lock").exists()


def test_link_volatile_onto_index_copies_content(mount: MailfsMount) -> None:
    lock = mount.mountpoint / "subscriptions.lock"
    lock.write_bytes(b"INBOX\n")
    os.link(lock, mount.mountpoint / "subscriptions")
    lock.unlink()
    assert (mount.mountpoint / "subscriptions").read_bytes() == b"INBOX\n"


@pytest.mark.parametrize(("src", "dst"), [
    ("dovecot.index", "mail.file"),
    ("mail.file", "dovecot.index"),
    ("dovecot.index", "x.lock"),
    ("mail.file", "y.lock"),
])
def test_cross_class_rename_and_link_get_exdev(mount: MailfsMount, src: str, dst: str) -> None:
    (mount.mountpoint / src).write_text("content")
    with pytest.raises(OSError) as renamed:
        os.rename(mount.mountpoint / src, mount.mountpoint / dst)
    assert renamed.value.errno == errno.EXDEV
    with pytest.raises(OSError) as linked:
        os.link(mount.mountpoint / src, mount.mountpoint / dst)
    assert linked.value.errno == errno.EXDEV
    assert (mount.mountpoint / src).read_text() == "content"


def test_rename_directory_carries_index_files(mount: MailfsMount, dirs: Dirs) -> None:
    old = mount.mountpoint / "Folder"
    (old / "sub").mkdir(parents=True)
    (old / "dovecot.index").write_bytes(b"top")
    (old / "sub" / "dovecot.index.log").write_bytes(b"deep")
    (old / "u.1").write_bytes(b"mail")
    (old / "d.lock").write_bytes(b"lock")
    os.rename(old, mount.mountpoint / "Renamed")
    new = mount.mountpoint / "Renamed"
    assert (new / "dovecot.index").read_bytes() == b"top"
    assert (new / "sub" / "dovecot.index.log").read_bytes() == b"deep"
    assert (new / "u.1").read_bytes() == b"mail"
    assert (new / "d.lock").read_bytes() == b"lock"
    assert not old.exists()
    assert sorted(os.listdir(new)) == ["d.lock", "dovecot.index", "sub", "u.1"]


def test_rmdir_refuses_while_index_files_remain(mount: MailfsMount) -> None:
    box = mount.mountpoint / "box"
    box.mkdir()
    (box / "dovecot.index").write_bytes(b"i")
    with pytest.raises(OSError) as refused:
        box.rmdir()
    assert refused.value.errno == errno.ENOTEMPTY
    (box / "dovecot.index").unlink()
    box.rmdir()
    assert not box.exists()


@pytest.mark.parametrize("name", ["dovecot.index.cache", "mail.file", "x.lock"])
def test_ftruncate_and_pwrite_in_place(mount: MailfsMount, name: str) -> None:
    path = mount.mountpoint / name
    path.write_bytes(b"0123456789" * 10_000)
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"HEAD", 0)
        os.ftruncate(fd, 50)
        os.pwrite(fd, b"tail", 60)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"HEAD456789" + b"0123456789" * 4 + b"\0" * 10 + b"tail"
    assert path.stat().st_size == 64


@pytest.mark.parametrize("name", ["dovecot.index", "mail.file", "x.lock"])
def test_utimes_chmod_chown(mount: MailfsMount, name: str) -> None:
    path = mount.mountpoint / name
    path.write_text("x")
    os.utime(path, ns=(1_000_000_000_123, 2_000_000_000_456))
    os.chmod(path, 0o640)
    os.chown(path, NOBODY, NOBODY)
    st = path.stat()
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_000_123, 2_000_000_000_456)
    assert st.st_mode & 0o7777 == 0o640
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)


def test_created_files_carry_caller_identity(mount: MailfsMount) -> None:
    mount.mountpoint.chmod(0o777)
    run_as(NOBODY, NOBODY, 0o027, f"""
        import os
        root = {str(mount.mountpoint)!r}
        for name in ("dovecot.index", "mail.file", "dovecot.index.log.newlock"):
            fd = os.open(os.path.join(root, name), os.O_CREAT | os.O_WRONLY, 0o666)
            os.close(fd)
        os.mkdir(os.path.join(root, "folder"), 0o777)
    """)
    for name, mode in (("dovecot.index", 0o640), ("mail.file", 0o640),
                       ("dovecot.index.log.newlock", 0o640), ("folder", 0o750)):
        st = os.stat(mount.mountpoint / name)
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (NOBODY, NOBODY, mode), name


def test_permissions_are_enforced(mount: MailfsMount) -> None:
    secret = mount.mountpoint / "dovecot.index"
    secret.write_text("private")
    secret.chmod(0o600)
    result = subprocess.run([SYSTEM_PYTHON, "-c", f"open({str(secret)!r}).read()"],
                            user=NOBODY, group=NOBODY, capture_output=True, text=True)
    assert result.returncode != 0
    assert "PermissionError" in result.stderr


@pytest.mark.parametrize("name", ["dovecot.index", "mail.file"])
def test_fsync_and_fdatasync_files_and_dirs(mount: MailfsMount, name: str) -> None:
    path = mount.mountpoint / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"durable")
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    dir_fd = os.open(mount.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    assert path.read_bytes() == b"durable"


def test_shared_readonly_mmap_sees_appends(mount: MailfsMount) -> None:
    log = mount.mountpoint / "dovecot.index.log"
    log.write_bytes(b"A" * 4096)
    reader = os.open(log, os.O_RDONLY)
    try:
        mapped = mmap.mmap(reader, 8192, mmap.MAP_SHARED, mmap.PROT_READ)
    except ValueError:
        mapped = None
    writer = os.open(log, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(writer, b"B" * 4096)
        mapped = mapped or mmap.mmap(reader, 8192, mmap.MAP_SHARED, mmap.PROT_READ)
        assert mapped[:4096] == b"A" * 4096
        assert mapped[4096:8192] == b"B" * 4096
        mapped.close()
        private = mmap.mmap(reader, 8192, mmap.MAP_PRIVATE, mmap.PROT_READ)
        assert private[8191:8192] == b"B"
        private.close()
    finally:
        os.close(writer)
        os.close(reader)


def test_fcntl_locks_within_the_node(mount: MailfsMount) -> None:
    path = mount.mountpoint / "dovecot.index.log"
    path.write_bytes(b"x")
    with open(path, "r+b") as handle:
        fcntl.lockf(handle, fcntl.LOCK_EX)
        result = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(f"""
                import fcntl, sys
                with open({str(path)!r}, "r+b") as other:
                    try:
                        fcntl.lockf(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError:
                        sys.exit(3)
            """)], timeout=30)
        assert result.returncode == 3
        fcntl.lockf(handle, fcntl.LOCK_UN)


def test_uidvalidity_file_is_empty_0444(mount: MailfsMount) -> None:
    path = mount.mountpoint / "dovecot-uidvalidity.5f3a2b1c"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o444)
    os.close(fd)
    assert path.stat().st_size == 0
    assert path.stat().st_mode & 0o777 == 0o444


def test_inode_numbers_are_stable(mount: MailfsMount) -> None:
    (mount.mountpoint / "dovecot.index").write_text("i")
    (mount.mountpoint / "mail").write_text("m")
    (mount.mountpoint / "dir").mkdir()
    first = {n: os.stat(mount.mountpoint / n).st_ino for n in ("dovecot.index", "mail", "dir")}
    subprocess.run(["sh", "-c", "echo 2 > /proc/sys/vm/drop_caches"], check=False)
    second = {n: os.stat(mount.mountpoint / n).st_ino for n in ("dovecot.index", "mail", "dir")}
    assert first == second
    assert len(set(first.values())) == 3


def test_unlinked_open_index_file_stays_readable(mount: MailfsMount) -> None:
    path = mount.mountpoint / "dovecot.index.cache"
    path.write_bytes(b"cache" * 1000)
    fd = os.open(path, os.O_RDONLY)
    try:
        path.unlink()
        assert not path.exists()
        assert os.pread(fd, 10, 0) == b"cachecache"
    finally:
        os.close(fd)


def test_statfs_reports_backing(mount: MailfsMount, dirs: Dirs) -> None:
    ours, theirs = os.statvfs(mount.mountpoint), os.statvfs(dirs.backing)
    assert ours.f_blocks == theirs.f_blocks
    assert ours.f_bsize == theirs.f_bsize


@pytest.mark.parametrize(("src", "dst"), [("dovecot.index.tmp", "dovecot.index"),
                                          ("a.msg", "b.msg"), ("a.lock", "b.lock")])
def test_rename_noreplace(mount: MailfsMount, src: str, dst: str) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    (mount.mountpoint / src).write_text("new")
    (mount.mountpoint / dst).write_text("old")
    at_fdcwd, noreplace = -100, 1
    result = libc.renameat2(at_fdcwd, os.fsencode(mount.mountpoint / src), at_fdcwd,
                            os.fsencode(mount.mountpoint / dst), noreplace)
    assert result == -1 and ctypes.get_errno() == errno.EEXIST
    assert (mount.mountpoint / dst).read_text() == "old"
    (mount.mountpoint / dst).unlink()
    assert libc.renameat2(at_fdcwd, os.fsencode(mount.mountpoint / src), at_fdcwd,
                          os.fsencode(mount.mountpoint / dst), noreplace) == 0
    assert (mount.mountpoint / dst).read_text() == "new"
