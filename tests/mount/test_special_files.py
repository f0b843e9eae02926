"""Symbolic links, fifos, sockets and device nodes behave as on the local disk.

Every scenario runs on a plain directory of this machine's disk (ext4) and on the mount, in
both modes (a passthrough directory of a full overlay, and an index-only mount where they
live in the meta store), and what can be observed must be the same. Conformance suites
cascade from these calls (symlink missing made thousands of pjdfstest cases fail).
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.rigs.mount import MailfsMount, mounted, run_cli

Observed = dict[str, object]
UNPRIVILEGED = "nobody"
RUNUSER = shutil.which("runuser") or shutil.which("runuser", path="/usr/sbin:/sbin")
# The system's interpreter: the project's venv may sit where that user cannot reach it.
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")


@pytest.fixture(params=["full", "index-only"])
def mount(request: pytest.FixtureRequest, base: Path) -> Iterator[MailfsMount]:
    backing = base / "backing" if request.param == "full" else None
    with mounted(backing, base / "mnt", base / "state") as live:
        yield live
    assert live.problems() == []


def errno_of(call: Callable[[], object]) -> str:
    try:
        call()
    except OSError as exc:
        return errno.errorcode[exc.errno or 0]
    return "ok"


def describe(path: Path) -> Observed:
    st = os.lstat(path)
    seen: Observed = {"type": stat.filemode(st.st_mode), "nlink": st.st_nlink,
                      "uid": st.st_uid, "gid": st.st_gid}
    if stat.S_ISLNK(st.st_mode):
        seen["target"] = os.readlink(path)
        seen["size"] = st.st_size
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        seen["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
    return seen


def links_and_nodes(root: Path) -> Observed:
    """Everything a conformance suite asks of these calls, as observations."""
    seen: Observed = {}
    d = root / "dir"
    d.mkdir()
    (d / "file").write_bytes(b"content")
    os.symlink("file", d / "link")
    os.symlink("no-such-target", d / "dangling")
    os.symlink("/an/absolute/target", d / "absolute")
    os.symlink("../dir/file", d / "relative")
    seen["link"] = describe(d / "link")
    seen["dangling"] = describe(d / "dangling")
    seen["absolute"] = describe(d / "absolute")
    seen["read through link"] = (d / "link").read_bytes()
    seen["read through relative"] = (d / "relative").read_bytes()
    seen["dangling exists"] = os.path.exists(d / "dangling")
    seen["stat of dangling"] = errno_of(lambda: os.stat(d / "dangling"))
    seen["symlink over a name"] = errno_of(lambda: os.symlink("x", d / "file"))
    seen["readlink of a file"] = errno_of(lambda: os.readlink(d / "file"))
    seen["open O_NOFOLLOW"] = errno_of(
        lambda: os.close(os.open(d / "link", os.O_RDONLY | os.O_NOFOLLOW)))
    os.rename(d / "link", d / "moved")
    seen["after rename"] = describe(d / "moved")
    seen["old name after rename"] = os.path.lexists(d / "link")
    os.link(d / "moved", d / "hard", follow_symlinks=False)
    seen["hard link to a link"] = describe(d / "hard")
    os.unlink(d / "moved")
    seen["unlink a link keeps the target"] = (d / "file").read_bytes()
    seen["hard link after unlink"] = describe(d / "hard")
    os.symlink("file", d / "other")
    os.rename(d / "other", d / "dangling")  # a link renamed over a link
    seen["renamed over"] = describe(d / "dangling")
    os.mkfifo(d / "fifo", 0o640)
    seen["fifo"] = describe(d / "fifo")
    os.mknod(d / "regular", stat.S_IFREG | 0o600)
    seen["mknod regular"] = describe(d / "regular")
    os.mknod(d / "chr", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.mknod(d / "blk", stat.S_IFBLK | 0o660, os.makedev(7, 0))
    seen["chr"] = describe(d / "chr")
    seen["blk"] = describe(d / "blk")
    seen["mknod existing"] = errno_of(lambda: os.mkfifo(d / "fifo"))
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(d / "sock"))
        server.listen()
        seen["socket"] = describe(d / "sock")
        seen["bind again"] = errno_of(lambda: socket.socket(socket.AF_UNIX).bind(str(d / "sock")))
    long_name = "l" * 255
    os.symlink("t" * 1000, d / long_name)
    seen["255-byte name"] = describe(d / long_name)
    seen["256-byte name"] = errno_of(lambda: os.symlink("t", d / ("l" * 256)))
    seen["4095-byte target"] = errno_of(lambda: os.symlink("t" * 4095, d / "longest"))
    seen["4095-byte target reads back"] = len(os.readlink(d / "longest"))
    seen["4096-byte target"] = errno_of(lambda: os.symlink("t" * 4096, d / "too-long"))
    seen["listing"] = sorted(os.listdir(d))
    for name in os.listdir(d):
        os.unlink(d / name)
    os.rmdir(d)
    return seen


def test_links_and_special_files_match_the_local_disk(base: Path, mount: MailfsMount) -> None:
    assert links_and_nodes(mount.mountpoint) == links_and_nodes(base / "local")


def test_links_and_special_files_survive_a_remount(mount: MailfsMount) -> None:
    root = mount.mountpoint
    os.symlink("target", root / "link")
    os.mkfifo(root / "fifo", 0o600)
    os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    before = {name: describe(root / name) for name in ("link", "fifo", "null")}
    mount.stop()
    mount.start()
    assert {name: describe(root / name) for name in ("link", "fifo", "null")} == before


def test_creating_links_and_nodes_updates_the_directory_times(base: Path,
                                                              mount: MailfsMount) -> None:
    for root in (mount.mountpoint, base / "local"):
        made = {
            "symlink": lambda d: os.symlink("t", d / "link"),
            "mkfifo": lambda d: os.mkfifo(d / "fifo"),
            "mknod": lambda d: os.mknod(d / "chr", stat.S_IFCHR | 0o600, os.makedev(1, 3)),
            "bind": lambda d: socket.socket(socket.AF_UNIX).bind(str(d / "sock")),
            "unlink": lambda d: os.unlink(d / "link"),
            "rename": lambda d: os.rename(d / "fifo", d / "fifo2"),
        }
        d = root / "times"
        d.mkdir()
        for what, call in made.items():
            before = os.stat(d)
            time.sleep(0.01)
            call(d)
            after = os.stat(d)
            assert after.st_mtime_ns > before.st_mtime_ns, f"{what} on {root}: mtime"
            assert after.st_ctime_ns > before.st_ctime_ns, f"{what} on {root}: ctime"
        link = d / "link2"
        os.symlink("t", link)
        assert os.lstat(link).st_ctime_ns == os.lstat(link).st_mtime_ns


UNPRIVILEGED_SCRIPT = """
import errno, json, os, socket, stat, sys
d = sys.argv[1]
def attempt(call):
    try:
        call()
        return "ok"
    except OSError as exc:
        return errno.errorcode[exc.errno]
print(json.dumps({
    "symlink in a root-owned dir": attempt(lambda: os.symlink("t", d + "/closed/link")),
    "mkfifo in a root-owned dir": attempt(lambda: os.mkfifo(d + "/closed/fifo")),
    "symlink in an open dir": attempt(lambda: os.symlink("t", d + "/open/link")),
    "mkfifo in an open dir": attempt(lambda: os.mkfifo(d + "/open/fifo", 0o666)),
    "mknod of a device": attempt(lambda: os.mknod(d + "/open/chr", stat.S_IFCHR | 0o600,
                                                  os.makedev(1, 3))),
    "bind in an open dir": attempt(lambda: socket.socket(socket.AF_UNIX).bind(d + "/open/sock")),
    "unlink another user's link in a sticky dir": attempt(lambda: os.unlink(d + "/sticky/link")),
    "owner of own link": os.lstat(d + "/open/link").st_uid == os.getuid(),
    "mode of own fifo": oct(stat.S_IMODE(os.lstat(d + "/open/fifo").st_mode)),
}))
"""


def as_unprivileged(root: Path) -> object:
    for name, mode in (("closed", 0o755), ("open", 0o777), ("sticky", 0o1777)):
        (root / name).mkdir()
        (root / name).chmod(mode)
    os.symlink("t", root / "sticky" / "link")
    done = subprocess.run(
        [str(RUNUSER), "-u", UNPRIVILEGED, "--", str(SYSTEM_PYTHON), "-c", UNPRIVILEGED_SCRIPT,
         str(root)], capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.skipif(RUNUSER is None or SYSTEM_PYTHON is None,
                    reason="needs runuser (util-linux) and /usr/bin/python3")
def test_permission_rules_for_an_unprivileged_user(base: Path, mount: MailfsMount) -> None:
    assert as_unprivileged(mount.mountpoint) == as_unprivileged(base / "local")


def test_links_and_nodes_move_onto_and_off_an_index_only_mount(base: Path) -> None:
    source = base / "local" / "index"
    source.mkdir()
    (source / "dovecot.index").write_bytes(b"index")
    os.symlink("dovecot.index", source / "link")
    os.symlink("gone", source / "dangling")
    os.mkfifo(source / "fifo", 0o640)
    os.mknod(source / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    with mounted(None, base / "mnt", base / "state") as live:
        result = run_cli("import", str(live.mountpoint), "--from", str(source))
        assert result.returncode == 0, result.stderr
        target = base / "local" / "exported"
        target.mkdir()
        result = run_cli("export", str(live.mountpoint), "--to", str(target))
        assert result.returncode == 0, result.stderr
        on_mount = {name: describe(live.mountpoint / name) for name in os.listdir(source)}
    before = {name: describe(source / name) for name in os.listdir(source)}
    assert on_mount == before
    assert {name: describe(target / name) for name in os.listdir(target)} == before
    assert (target / "link").read_bytes() == b"index"


def deep_path(root: Path, total: int) -> tuple[Path, str]:
    """Nested directories under root and a file name, making a path `total` bytes long."""
    name = "f" * 100
    left = total - len(str(root)) - 1 - len(name)  # for "/dir/dir/.../dir", then "/name"
    parts = []
    while left > 1 + 255:
        part = min(255, left - 1 - 1 - 1)  # leave room for one more "/x"
        parts.append("d" * part)
        left -= 1 + part
    parts.append("e" * (left - 1))
    path = os.path.join(str(root), *parts)
    assert len(os.path.join(path, name)) == total
    return Path(path), name


def test_paths_up_to_path_max_work(mount: MailfsMount) -> None:
    """The kernel passes paths up to 4095 bytes; the backing root's prefix must not count
    against that (the daemon works relative to the backing root). An index-only mount keys
    every path in LMDB, which takes 511 bytes: longer paths are refused there, cleanly
    (a key it could not hold used to fail every commit from then on)."""
    if mount.backing is None:
        deepest, name = deep_path(mount.mountpoint, len(str(mount.mountpoint)) + 1 + 511)
        os.makedirs(deepest)
        (deepest / name).write_bytes(b"at the limit")
        with pytest.raises(OSError) as caught:
            (deepest / (name + "x")).write_bytes(b"one byte deeper")
        assert caught.value.errno == errno.ENAMETOOLONG
        with pytest.raises(OSError) as caught:
            os.mkdir(deepest / (name + "x"))
        assert caught.value.errno == errno.ENAMETOOLONG
        mount.stop()  # commits: nothing it accepted is beyond what LMDB can keep
        mount.start()
        assert (deepest / name).read_bytes() == b"at the limit"
        return
    directory, name = deep_path(mount.mountpoint, 4095)
    os.makedirs(directory)
    target = directory / name
    target.write_bytes(b"deep")
    assert target.read_bytes() == b"deep"
    os.chmod(target, 0o600)
    os.utime(target, ns=(1_000_000_000, 2_000_000_000))
    assert os.stat(target).st_mtime_ns == 2_000_000_000
    os.rename(target, directory / ("g" * 100))
    os.link(directory / ("g" * 100), target)
    os.unlink(directory / ("g" * 100))
    link = directory / ("h" * 100)
    os.symlink(name, link)
    assert os.readlink(link) == name
    os.mkfifo(directory / ("i" * 100))
    assert sorted(os.listdir(directory)) == [name, "h" * 100, "i" * 100]
    with pytest.raises(OSError) as caught:
        (directory / (name + "x")).write_bytes(b"one byte too long")
    assert caught.value.errno == errno.ENAMETOOLONG
    for entry in os.listdir(directory):
        os.unlink(directory / entry)
    shutil.rmtree(mount.mountpoint / directory.relative_to(mount.mountpoint).parts[0])


def setgid_directory(root: Path) -> Observed:
    shared = root / "shared"
    shared.mkdir()
    os.chown(shared, 0, 1234)
    os.chmod(shared, 0o2775)
    (shared / "dovecot.index").write_bytes(b"index")
    (shared / "message").write_bytes(b"mail")
    (shared / "sub").mkdir(0o755)
    os.symlink("message", shared / "link")
    os.mkfifo(shared / "fifo", 0o640)
    return {name: (os.lstat(shared / name).st_gid,
                   oct(stat.S_IMODE(os.lstat(shared / name).st_mode)))
            for name in sorted(os.listdir(shared))}


def test_a_set_group_id_directory_passes_its_group_on(base: Path, mount: MailfsMount) -> None:
    assert setgid_directory(mount.mountpoint) == setgid_directory(base / "local")


def file_changes(name: str) -> list[tuple[str, Callable[[Path], object], str]]:
    """(what, the call on directory d, the file's name after it)."""
    f = name
    return [
        ("write", lambda d: (d / f).write_bytes(b"more"), f),
        ("append", lambda d: _append(d / f), f),
        ("truncate", lambda d: os.truncate(d / f, 1), f),
        ("chmod", lambda d: os.chmod(d / f, 0o600), f),
        ("chown", lambda d: os.chown(d / f, 1234, 1234), f),
        ("utime", lambda d: os.utime(d / f, ns=(5_000_000_000, 6_000_000_000)), f),
        ("link", lambda d: os.link(d / f, d / (f + ".2")), f),
        ("unlink the other name", lambda d: os.unlink(d / (f + ".2")), f),
        ("rename", lambda d: os.rename(d / f, d / (f + ".new")), f + ".new"),
        ("rename back", lambda d: os.rename(d / (f + ".new"), d / f), f),
        ("read", lambda d: (d / f).read_bytes(), f),
    ]


def _append(path: Path) -> None:
    with open(path, "ab") as out:
        out.write(b"x")


def time_changes(root: Path, name: str) -> dict[str, tuple[bool, bool, bool, bool]]:
    """For each call on a file: did the file's ctime and mtime, and its directory's, move?"""
    d = root / "times"
    d.mkdir()
    (d / name).write_bytes(b"content")
    seen = {}
    current = name
    for what, call, after in file_changes(name):
        before_file, before_dir = os.stat(d / current), os.stat(d)
        time.sleep(0.01)
        call(d)
        current = after
        after_file, after_dir = os.stat(d / current), os.stat(d)
        seen[what] = (after_file.st_ctime_ns != before_file.st_ctime_ns,
                      after_file.st_mtime_ns != before_file.st_mtime_ns,
                      after_dir.st_ctime_ns != before_dir.st_ctime_ns,
                      after_dir.st_mtime_ns != before_dir.st_mtime_ns)
    return seen


@pytest.mark.parametrize("name", ["message", "dovecot.index.log"])
def test_file_times_move_as_on_the_local_disk(base: Path, mount: MailfsMount, name: str) -> None:
    """(file ctime, file mtime, directory ctime, directory mtime) changed or not, per call:
    for a mail file and an index file (passthrough and meta store in the full overlay)."""
    on_mount, on_disk = time_changes(mount.mountpoint, name), time_changes(base / "local", name)
    if mount.backing is not None and name.startswith("dovecot"):
        # Listed in ARCHITECTURE: index names live in the store, the directory on the
        # backing store, which does not see them come and go.
        on_disk = {what: (*seen[:2], False, False) if what in NAME_CHANGES else seen
                   for what, seen in on_disk.items()}
    assert on_mount == on_disk


NAME_CHANGES = ("link", "unlink the other name", "rename", "rename back")


def calls_that_change_nothing(root: Path, name: str) -> dict[str, tuple[bool, bool]]:
    """(ctime moved, mtime moved) for calls that succeed without changing a value. On ext4
    every one of them moves ctime, and truncates move mtime too (found by a randomized
    comparison of sequences of calls as several users; pjdfstest's chown tests ask for
    the chown(-1, -1) case)."""
    d = root / "same"
    d.mkdir()
    target = d / name
    target.write_bytes(b"")
    os.symlink(name, d / "link")
    mode = stat.S_IMODE(os.stat(target).st_mode)
    calls: dict[str, Callable[[], object]] = {
        "chown(-1, -1)": lambda: os.chown(target, -1, -1),
        "lchown(-1, -1) of a link": lambda: os.lchown(d / "link", -1, -1),
        "chmod to the same mode": lambda: os.chmod(target, mode),
        "chown to the same owner": lambda: os.chown(target, 0, 0),
        "utime to the same times": lambda: os.utime(
            target, ns=(os.stat(target).st_atime_ns, os.stat(target).st_mtime_ns)),
        "truncate to the same size": lambda: os.truncate(target, 0),
        "ftruncate to the same size": lambda: _ftruncate(target, 0),
        "O_TRUNC of an empty file": lambda: os.close(os.open(target, os.O_WRONLY | os.O_TRUNC)),
    }
    seen = {}
    for what, call in calls.items():
        observed = d / "link" if "link" in what else target
        before = os.lstat(observed)
        time.sleep(0.01)
        call()
        after = os.lstat(observed)
        seen[what] = (after.st_ctime_ns != before.st_ctime_ns,
                      after.st_mtime_ns != before.st_mtime_ns)
    return seen


def _ftruncate(path: Path, size: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


@pytest.mark.parametrize("name", ["message", "dovecot.index.log", "dovecot.index.log.newlock"])
def test_calls_that_change_nothing_still_move_ctime(base: Path, mount: MailfsMount,
                                                     name: str) -> None:
    """For a mail file, an index file and a lock file (passthrough, the store and RAM in
    the full overlay; all in the store on an index-only mount)."""
    expected = calls_that_change_nothing(base / "local", name)
    assert all(ctime for ctime, _ in expected.values())  # what ext4 does, as a check
    assert calls_that_change_nothing(mount.mountpoint, name) == expected


def test_a_directory_rename_too_deep_for_its_index_files_is_refused_before_it_moves(
        mount: MailfsMount) -> None:
    """The store keys index files by their whole path (511 bytes at most). Renaming their
    directory deeper than that must fail before anything moves, or the directory would
    move on the backing store while its index files stayed keyed under the old path."""
    root = mount.mountpoint
    deep = root / ("d" * 255) / ("e" * 200)
    deep.mkdir(parents=True)
    (root / "box").mkdir()
    (root / "box" / "dovecot.index.log").write_bytes(b"log")
    (root / "plain").mkdir()
    (root / "plain" / "message").write_bytes(b"mail")
    with pytest.raises(OSError) as caught:
        os.rename(root / "box", deep / ("f" * 60))
    assert caught.value.errno == errno.ENAMETOOLONG
    assert (root / "box" / "dovecot.index.log").read_bytes() == b"log"
    if mount.backing is not None:  # no index file below: any depth the kernel passes
        os.rename(root / "plain", deep / ("f" * 60))
        assert (deep / ("f" * 60) / "message").read_bytes() == b"mail"
    mount.stop()  # every change committed: nothing too deep reached LMDB
    mount.start()
    assert (root / "box" / "dovecot.index.log").read_bytes() == b"log"


def as_user(uid: int, gid: int, groups: list[int], call: Callable[[], object]) -> None:
    """Run `call` in a child process with these ids; fails the test if the call fails."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups(groups)
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            call()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def modes_after_an_unprivileged_o_trunc(root: Path) -> dict[str, str]:
    seen = {}
    for name in ("message", "dovecot.index", "x.lock"):
        for mode in (0o6777, 0o4755, 0o2755, 0o2745, 0o755):
            for groups in ([], [1234]):
                path = root / name
                path.write_bytes(b"content")
                os.chown(path, 1000, 1234)
                os.chmod(path, mode)
                as_user(1000, 1000, groups,
                        lambda p=path: os.close(os.open(p, os.O_WRONLY | os.O_TRUNC)))  # type: ignore[misc]
                seen[f"{name} {oct(mode)} groups={groups}"] = oct(os.stat(path).st_mode)
                path.unlink()
    return seen


def test_an_unprivileged_o_trunc_clears_set_id_bits(base: Path, mount: MailfsMount) -> None:
    """Linux clears set-user-ID, and set-group-ID where the file is group executable or the
    caller is not in its group, when a process without CAP_FSETID truncates a file. For
    open(O_TRUNC) the kernel leaves that to the FUSE filesystem, whose calls on the store
    run as root and so kept the bits (found by a randomized comparison with ext4)."""
    expected = modes_after_an_unprivileged_o_trunc(base / "local")
    assert expected["message 0o6777 groups=[]"] == "0o100777"  # what ext4 does, as a check
    assert expected["message 0o2745 groups=[1234]"] == "0o102745"
    assert modes_after_an_unprivileged_o_trunc(mount.mountpoint) == expected
