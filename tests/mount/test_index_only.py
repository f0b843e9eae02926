"""Index-only mounts: no backing path; files and directories live in the meta store."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rigs.mount import MailfsMount, force_unmount, mounted, run_cli

LOCK = "dovecot-uidlist.lock"


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mailfs-io-"))
    path.chmod(0o755)
    (path / "mnt").mkdir()
    yield path
    force_unmount(path / "mnt")
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def index_mount(base: Path) -> Iterator[MailfsMount]:
    with mounted(None, base / "mnt", base / "state") as mount:
        yield mount
    assert mount.problems() == []


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root: file content, or None for a directory."""
    found: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            found[os.path.relpath(os.path.join(dirpath, name), root)] = None
        for name in filenames:
            path = os.path.join(dirpath, name)
            found[os.path.relpath(path, root)] = Path(path).read_bytes()
    return found


def test_directories_and_files_survive_a_remount_with_their_inode_numbers(
        index_mount: MailfsMount) -> None:
    root = index_mount.mountpoint
    (root / "alice" / "mailboxes" / "INBOX").mkdir(parents=True, mode=0o750)
    (root / "alice" / "mailboxes" / "INBOX" / "dovecot.index").write_bytes(b"index")
    (root / "alice" / "subscriptions").write_bytes(b"INBOX\n")
    (root / "alice" / "notes.txt").write_bytes(b"any name is replicated here")
    before = tree(root)
    inodes = {path: os.lstat(root / path).st_ino for path in before}
    assert os.stat(root / "alice" / "mailboxes" / "INBOX").st_mode & 0o7777 == 0o750
    index_mount.stop()
    index_mount.start()
    assert tree(root) == before
    assert {path: os.lstat(root / path).st_ino for path in before} == inodes


def test_directory_rules_match_a_local_filesystem(index_mount: MailfsMount) -> None:
    root = index_mount.mountpoint
    (root / "box").mkdir()
    (root / "box" / "dovecot.index.log").write_bytes(b"log")
    (root / "box" / LOCK).write_bytes(b"123")
    with pytest.raises(FileExistsError):
        (root / "box").mkdir()
    with pytest.raises(OSError) as caught:
        os.rmdir(root / "box")
    assert caught.value.errno == errno.ENOTEMPTY
    with pytest.raises(IsADirectoryError):
        os.unlink(root / "box")
    with pytest.raises(NotADirectoryError):
        os.rmdir(root / "box" / "dovecot.index.log")
    with pytest.raises(OSError) as caught:
        os.rename(root / "box", root / "box" / "inside")
    assert caught.value.errno == errno.EINVAL
    with pytest.raises(OSError) as caught:
        os.mkdir(root / "box" / "x.lock")  # lock names are files on this node only
    assert caught.value.errno == errno.EPERM
    (root / "box" / "dovecot.index.log").unlink()
    (root / "box" / LOCK).unlink()
    os.rmdir(root / "box")
    assert not (root / "box").exists()


def test_renaming_a_tree_carries_index_files_and_locks(index_mount: MailfsMount) -> None:
    root = index_mount.mountpoint
    (root / "Work" / "Reports").mkdir(parents=True)
    (root / "Work" / "Reports" / "dovecot.index").write_bytes(b"reports index")
    (root / "Work" / LOCK).write_bytes(b"held")
    (root / "Empty").mkdir()
    os.rename(root / "Work", root / "Empty")  # over an empty directory, as rename(2) allows
    assert (root / "Empty" / "Reports" / "dovecot.index").read_bytes() == b"reports index"
    assert (root / "Empty" / LOCK).read_bytes() == b"held"
    assert not (root / "Work").exists()
    (root / "Full").mkdir()
    (root / "Full" / "dovecot.index").write_bytes(b"x")
    with pytest.raises(OSError) as caught:
        os.rename(root / "Empty", root / "Full")
    assert caught.value.errno == errno.ENOTEMPTY
    assert sorted(os.listdir(root)) == ["Empty", "Full"]


def test_owner_mode_and_times_of_directories(index_mount: MailfsMount) -> None:
    root = index_mount.mountpoint
    (root / "user").mkdir()
    os.chown(root / "user", 5000, 5000)
    os.chmod(root / "user", 0o700)
    os.utime(root / "user", ns=(1_000_000_000, 2_000_000_000))
    st = os.stat(root / "user")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (5000, 5000, 0o700)
    assert st.st_mtime_ns == 2_000_000_000
    with pytest.raises(PermissionError):
        os.chmod(root, 0o700)  # set on the mountpoint directory before mounting instead


def test_the_root_shows_the_mountpoint_directory_owner_and_mode(base: Path) -> None:
    os.chown(base / "mnt", 4242, 4343)
    os.chmod(base / "mnt", 0o751)
    mount = MailfsMount(None, base / "mnt", base / "state").start()
    try:
        st = os.stat(base / "mnt")
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (4242, 4343, 0o751)
    finally:
        mount.stop()


def test_status_and_statfs(index_mount: MailfsMount) -> None:
    result = run_cli("status", str(index_mount.mountpoint), "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["mode"] == "index-only"
    assert "backing_calls" not in status
    assert status["healthy"] is True
    ours, state = os.statvfs(index_mount.mountpoint), os.statvfs(index_mount.state_dir)
    assert (ours.f_blocks, ours.f_bsize) == (state.f_blocks, state.f_bsize)


def test_migration_onto_and_off_an_index_only_mount(index_mount: MailfsMount,
                                                    base: Path) -> None:
    """`import --from` adopts today's `:INDEX=` tree; `export --to` writes it back."""
    source = base / "old-index"
    (source / "alice" / "mailboxes" / "INBOX").mkdir(parents=True)
    (source / "alice" / "mailboxes" / "INBOX" / "dovecot.index").write_bytes(b"i" * 5000)
    (source / "alice" / "dovecot.list.index.log").write_bytes(b"list log")
    (source / "alice" / LOCK).write_bytes(b"stale lock")
    os.chown(source / "alice", 5000, 5000)
    os.chmod(source / "alice", 0o700)
    assert not (index_mount.mountpoint / "alice").exists()  # the kernel caches "absent"
    result = run_cli("import", str(index_mount.mountpoint), "--from", str(source))
    assert result.returncode == 0, result.stderr
    assert "imported 5 index files" in result.stdout  # 3 directories, 2 files, no lock
    expected = {path: data for path, data in tree(source).items() if LOCK not in path}
    assert tree(index_mount.mountpoint) == expected
    st = os.stat(index_mount.mountpoint / "alice")
    assert (st.st_uid, st.st_mode & 0o7777) == (5000, 0o700)

    target = base / "new-index"
    target.mkdir()
    result = run_cli("export", str(index_mount.mountpoint), "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert tree(target) == expected
    assert os.stat(target / "alice").st_uid == 5000

    result = run_cli("export", str(index_mount.mountpoint))
    assert result.returncode != 0
    assert "--to DIR" in result.stderr
    result = run_cli("export", str(index_mount.mountpoint), "--to",
                     str(index_mount.mountpoint / "alice"))
    assert result.returncode != 0
    assert "inside the mount" in result.stderr
    # A name the kernel has never looked up: checking it is a request to this very daemon,
    # which must not be waiting on its own trio thread for the answer (it hung there).
    result = run_cli("export", str(index_mount.mountpoint), "--to",
                     str(index_mount.mountpoint / "alice" / "never-looked-up"), timeout=30)
    assert result.returncode != 0
    assert "inside the mount" in result.stderr


def test_a_backing_path_and_index_only_do_not_mix(base: Path) -> None:
    result = run_cli("mount", "--index-only", str(base), str(base / "mnt"),
                     "--state-dir", str(base / "state"), "--foreground")
    assert result.returncode != 0
    assert "no backing path" in result.stderr
    result = run_cli("mount", str(base / "mnt"), "--state-dir", str(base / "state"),
                     "--foreground")
    assert result.returncode != 0
    assert "needs a backing path" in result.stderr
