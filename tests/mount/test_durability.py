"""Crash recovery, durability, full disk and bounded memory, through real mounts."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.mount.conftest import Dirs
from tests.rigs.cluster import wait_for
from tests.rigs.mount import MailfsMount, run_cli

MakeMount = Callable[..., MailfsMount]
# No periodic commit during a test: what a test writes stays in the journal until it says.
NO_AUTO_COMMIT = ("-o", "commit_interval=600")
# What a full disk refuses, as on ext4: without the default wait for room (fs/fulldisk.py).
NO_HOLD = ("-o", "full_disk_wait=0")


def tree_digest(root: Path) -> dict[str, str]:
    result = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            result[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return result


def dovecot_like_workload(root: Path, rounds: int) -> None:
    """What Dovecot does to its index files, without fsync: appends, rewrites, dot-locks."""
    for box in ("INBOX", "Sent", "Archive/2026"):
        (root / box).mkdir(parents=True, exist_ok=True)
    for i in range(rounds):
        box = root / ("INBOX", "Sent", "Archive/2026")[i % 3]
        with open(box / "dovecot.index.log", "ab") as log:
            log.write(f"record {i}\n".encode() * 7)
        tmp = box / "dovecot.index.tmp"
        tmp.write_bytes(f"index version {i}\n".encode() * 50)
        os.rename(tmp, box / "dovecot.index")
        lock = box / "dovecot-uidlist.lock"
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, f"3 V1 N{i}\n".encode())
        os.close(fd)
        os.rename(lock, box / "dovecot-uidlist")
        with open(box / "dovecot.index.cache", "r+b" if i >= 3 else "wb") as cache:
            cache.seek(i * 1000)
            cache.write(b"C" * 1500)
            cache.seek(0)
            cache.write(f"hdr{i}".encode())
        (box / f"msg.{i}").write_bytes(b"mail" * 100)


def status(mount: MailfsMount) -> dict[str, int]:
    result = run_cli("status", str(mount.mountpoint), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_kill9_loses_nothing_written(make_mount: MakeMount, dirs: Dirs) -> None:
    mount = make_mount(NO_AUTO_COMMIT)
    dovecot_like_workload(mount.mountpoint, 60)
    expected = tree_digest(mount.mountpoint)
    assert status(mount)["committed_seq"] < status(mount)["journal_seq"], \
        "the workload should leave changes only in the journal for this test to mean anything"
    mount.kill()
    mount = make_mount()
    assert tree_digest(mount.mountpoint) == expected
    assert status(mount)["replayed_records"] > 0


def test_kill9_mid_stream_keeps_every_completed_write(make_mount: MakeMount, dirs: Dirs) -> None:
    # The crash hold makes the writer wait, then kills it (its fence): a short hold.
    mount = make_mount(("-o", "crash_hold=2"))
    ledger = dirs.state.parent / "ledger"
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os
        root = {str(mount.mountpoint)!r}
        ledger = open({str(ledger)!r}, "w", buffering=1)
        fd = os.open(os.path.join(root, "dovecot.index.log"), os.O_WRONLY | os.O_CREAT |
                     os.O_APPEND, 0o600)
        i = 0
        try:
            while True:
                os.write(fd, b"%08d" % i + b"." * 56)
                ledger.write(f"{{i}}\\n")
                i += 1
        except OSError:
            pass
    """)])
    try:
        deadline = time.monotonic() + 30
        while (not ledger.exists() or len(ledger.read_text().splitlines()) < 2000):
            assert time.monotonic() < deadline, "writer made no progress"
            time.sleep(0.05)
        mount.kill()
        writer.wait(timeout=30)
        assert writer.returncode == -signal.SIGKILL, "the writer ran on after the crash"
    finally:
        if writer.poll() is None:
            writer.send_signal(signal.SIGKILL)
            writer.wait()
    completed = len(ledger.read_text().splitlines())
    mount = make_mount()
    data = (mount.mountpoint / "dovecot.index.log").read_bytes()
    records = [data[i:i + 64] for i in range(0, len(data), 64)]
    assert len(records) >= completed
    for i, record in enumerate(records):
        assert record == b"%08d" % i + b"." * 56


def test_fsynced_data_survives_losing_the_journal(make_mount: MakeMount, dirs: Dirs) -> None:
    """A machine crash loses the unsynced journal; fsync'd data must already be in LMDB."""
    mount = make_mount()
    path = mount.mountpoint / "dovecot.index"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"fsynced")
    os.fsync(fd)
    os.write(fd, b" and not")
    os.close(fd)
    mount.kill()
    journals = [p for p in dirs.state.iterdir()
                if p.name.startswith("journal-") and p.name.endswith(".log")]
    assert journals
    for journal in journals:
        journal.unlink()
    mount = make_mount()
    assert path.read_bytes().startswith(b"fsynced")


def append_to_newest_journal(dirs: Dirs, data: bytes) -> None:
    journal = max(p for p in dirs.state.iterdir()
                  if p.name.startswith("journal-") and p.name.endswith(".log"))
    with open(journal, "ab") as handle:
        handle.write(data)


def test_torn_journal_tail_is_ignored(make_mount: MakeMount, dirs: Dirs) -> None:
    mount = make_mount(NO_AUTO_COMMIT)
    (mount.mountpoint / "dovecot-uidlist").write_bytes(b"first")
    mount.kill()
    append_to_newest_journal(dirs, b"\x40\x00\x00\x00garbage")  # a header, its body lost
    mount = make_mount()
    assert (mount.mountpoint / "dovecot-uidlist").read_bytes() == b"first"


def test_small_writes_are_committed_in_groups(mount: MailfsMount) -> None:
    before = status(mount)["commits"]
    fd = os.open(mount.mountpoint / "dovecot.index.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                 0o600)
    try:
        for i in range(2000):
            os.write(fd, b"x%d" % i)
    finally:
        os.close(fd)
    run_cli("flush", str(mount.mountpoint), check=True)
    assert status(mount)["commits"] - before < 100


def test_ram_is_a_bounded_cache_over_lmdb(make_mount: MakeMount) -> None:
    mount = make_mount(("--ram-budget", "1M", "-o", "commit_interval=0.2"))
    blobs = {}
    for i in range(80):
        box = mount.mountpoint / f"box{i}"
        box.mkdir()
        blobs[box / "dovecot.index.cache"] = os.urandom(64 * 1024 + i)
        (box / "dovecot.index.cache").write_bytes(blobs[box / "dovecot.index.cache"])
    run_cli("flush", str(mount.mountpoint), check=True)
    time.sleep(1.0)  # the committer evicts after its next round
    state = status(mount)
    assert state["ram_cache_bytes"] <= 1 << 20
    assert state["evictions"] > 0
    subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=False)
    for path, blob in blobs.items():
        assert path.read_bytes() == blob
    assert status(mount)["ram_misses"] > 0


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A 24 MiB tmpfs standing in for a disk that fills up."""
    target = Path(f"/tmp/mailfs-small-disk-{os.getpid()}")
    target.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(target)], check=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)
        target.rmdir()


def fill(path: Path) -> None:
    with open(path, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * (1 << 20))
                handle.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    # Leave a few KiB so that the kernel itself does not wedge; LMDB needs more than that.
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) - 16 * 1024)


def test_full_disk_gives_enospc_and_loses_nothing(dirs: Dirs, small_disk: Path) -> None:
    state = small_disk / "state"
    mount = MailfsMount(dirs.backing, dirs.mnt, state, ("-o", "commit_interval=60", *NO_HOLD))
    mount.start()
    try:
        safe = mount.mountpoint / "dovecot.index"
        fd = os.open(safe, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"committed before the disk filled")
        os.fsync(fd)
        os.close(fd)
        fill(small_disk / "filler")
        errors = set()
        big = mount.mountpoint / "dovecot.index.cache"
        fd = os.open(big, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for _ in range(64):
                os.write(fd, os.urandom(256 * 1024))
            os.fsync(fd)
        except OSError as exc:
            errors.add(exc.errno)
        finally:
            try:
                os.close(fd)
            except OSError as exc:
                errors.add(exc.errno)
        assert errors == {errno.ENOSPC}
        assert safe.read_bytes() == b"committed before the disk filled"
        # Small changes still fit the journal; their commit to LMDB may not fit the disk.
        small = mount.mountpoint / "dovecot-uidlist"
        fd = os.open(small, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"small change")
        try:
            os.fsync(fd)
            synced = True
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
            synced = False
        finally:
            os.close(fd)
        assert small.read_bytes() == b"small change"
        (small_disk / "filler").unlink()
        mount.stop()
        mount.start()
        assert safe.read_bytes() == b"committed before the disk filled"
        # Written, even if not fsync'd when the disk was full: a clean stop loses nothing.
        assert small.read_bytes() == b"small change", f"fsync had succeeded: {synced}"
        assert "ENOSPC" in mount.log() or "No space" in mount.log()
    finally:
        mount.stop()
        mount.kill()


@pytest.fixture
def small_disk_mount(dirs: Dirs, small_disk: Path) -> Iterator[MailfsMount]:
    """A mount whose state directory is on the small disk, with no periodic commit, that
    refuses what a full disk refuses at once."""
    mount = MailfsMount(dirs.backing, dirs.mnt, small_disk / "state",
                        (*NO_AUTO_COMMIT, *NO_HOLD),
                        log_path=dirs.state.parent / "small-disk-mailfs.log")
    mount.start()
    try:
        yield mount
    finally:
        mount.stop()
        mount.kill()


def fill_to_the_last_page(path: Path) -> None:
    with open(path, "wb", buffering=0) as handle:
        for size in (1 << 20, 4096):
            try:
                while True:
                    handle.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC


def test_a_full_disk_still_lets_dovecot_undo_and_overwrite(
        small_disk_mount: MailfsMount, small_disk: Path) -> None:
    """On ext4, a full disk refuses what needs new blocks but still allows truncating,
    overwriting in place, unlinking and fsync: Dovecot relies on that to undo a failed log
    append. Without it the log keeps a half-written record and Dovecot reports it corrupted,
    and a failed fsync makes Dovecot leave a saved mail file its index does not know."""
    mount = small_disk_mount
    log_file = mount.mountpoint / "dovecot.index.log"
    spare = mount.mountpoint / "dovecot.index.log.2"
    body = os.urandom(64 * 1024)
    log_file.write_bytes(body)
    spare.write_bytes(b"an older log")
    fd = os.open(log_file, os.O_RDWR)
    os.fsync(fd)
    fill_to_the_last_page(small_disk / "filler")
    with pytest.raises(OSError) as grown:
        os.pwrite(fd, os.urandom(64 * 1024), len(body))
    assert grown.value.errno == errno.ENOSPC
    patch = os.urandom(8192)
    for round_ in range(8):  # more than the journal's last page could hold
        os.pwrite(fd, patch, 8192 * round_)
        os.ftruncate(fd, len(body) - 100 * (round_ + 1))
        # What the reserve gave up is for undos only: an append must not take it.
        with pytest.raises(OSError) as grown:
            os.pwrite(fd, os.urandom(16 * 1024), len(body))
        assert grown.value.errno == errno.ENOSPC
    expected = (patch * 8)[: len(body) - 800]
    assert os.pread(fd, len(body), 0) == expected
    # The space the reserve gave up is taken too: LMDB has no room for a commit, and
    # the fsync'd journal makes the changes durable instead.
    fill_to_the_last_page(small_disk / "filler2")
    os.fsync(fd)
    os.close(fd)
    spare.unlink()
    counts = status(mount)
    assert counts["journal_reserve_records"] > 0
    assert counts["journal_fsyncs"] > 0
    mount.kill()  # the changes are in the journal only: replay must bring them back
    (small_disk / "filler").unlink()
    (small_disk / "filler2").unlink()
    mount.start()
    assert log_file.read_bytes() == expected
    assert not spare.exists()
    assert status(mount)["journal_reserve_bytes"] >= 8 << 20  # whole again


def test_a_full_disk_refuses_lock_content_but_never_the_rename_that_installs_it(
        small_disk_mount: MailfsMount, small_disk: Path) -> None:
    """Dovecot rotates its log by writing dovecot.index.log.newlock and renaming it over
    dovecot.index.log. On ext4 with a full disk the write fails and the rename never does.
    Lock files live in RAM here, so the write used to succeed and the rename, which copies
    the content into the store, failed: Dovecot left the .newlock behind and every later
    session hung on it (seen in bench/disturbance.py)."""
    mount = small_disk_mount
    root = mount.mountpoint
    (root / "dovecot.index.log").write_bytes(b"old log" * 1000)
    (root / "dovecot.index.cache").write_bytes(os.urandom(64 * 1024))
    (root / "dovecot.index").write_bytes(b"index" * 100)
    header = os.urandom(112)
    written_before = root / "dovecot.index.log.newlock"
    fd = os.open(written_before, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, header)
    os.close(fd)
    fill_to_the_last_page(small_disk / "filler")
    with pytest.raises(OSError) as grown, open(root / "dovecot.index.cache", "ab") as cache:
        cache.write(os.urandom(256 * 1024))
        cache.flush()
    assert grown.value.errno == errno.ENOSPC
    for size in range(6000, 2000, -500):  # undos: more than the journal's last page
        os.truncate(root / "dovecot.index.log", size)
    assert status(mount)["journal_reserve_records"] > 0
    os.rename(written_before, root / "dovecot.index.log")
    assert (root / "dovecot.index.log").read_bytes() == header
    # A lock written now fails like a file on a full disk, and Dovecot drops it...
    lock = root / "dovecot-uidlist.lock"
    fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with pytest.raises(OSError) as refused:
            os.write(fd, os.urandom(64 * 1024))
        assert refused.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    lock.unlink()
    # ...unless deletes freed the room, as on ext4 (Dovecot deletes a broken cache).
    cached = status(mount)["ram_cache_files"]
    os.unlink(root / "dovecot.index.cache")
    # The kernel sends the release of the closed cache file in the background, and the
    # file's space is free once mailfs has it: on a busy machine that can be after the
    # unlink returned.
    wait_for(lambda: status(mount)["ram_cache_files"] < cached, what="the cache to go")
    uidlist = os.urandom(48 * 1024)
    fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, uidlist)
    finally:
        os.close(fd)
    os.rename(lock, root / "dovecot-uidlist")
    # mail_index_create_backup() links the index to a temporary name.
    os.link(root / "dovecot.index", root / "dovecot.index.backup.tmp")
    os.rename(root / "dovecot.index.backup.tmp", root / "dovecot.index.backup")
    assert (root / "dovecot.index.backup").read_bytes() == b"index" * 100
    (small_disk / "filler").unlink()
    deadline = time.monotonic() + 10
    while True:  # the mount looks at the disk again at most once a second
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.write(fd, os.urandom(64 * 1024))
            break
        except OSError as exc:
            assert exc.errno == errno.ENOSPC and time.monotonic() < deadline
            time.sleep(0.2)
        finally:
            os.close(fd)
    lock.unlink()
    mount.stop()
    mount.start()
    assert (root / "dovecot.index.log").read_bytes() == header
    assert (root / "dovecot-uidlist").read_bytes() == uidlist
    assert (root / "dovecot.index.backup").read_bytes() == b"index" * 100


def test_overwrites_on_a_full_disk_leave_reserve_for_renames_and_truncates(
        small_disk_mount: MailfsMount, small_disk: Path) -> None:
    """Every overwrite costs journal space here (none on ext4), and a busy Dovecot
    overwrites its cache tens of thousands of times while a disk is full. Overwrites must
    stop at the reserve's floor, so that renames, truncates and unlinks still work."""
    mount = small_disk_mount
    root = mount.mountpoint
    cache = root / "dovecot.index.cache"
    cache.write_bytes(os.urandom(1 << 20))
    (root / "dovecot.index.tmp").write_bytes(b"new index")
    (root / "dovecot.index.log").write_bytes(b"log" * 4000)
    fill_to_the_last_page(small_disk / "filler")
    fd = os.open(cache, os.O_RDWR)
    refused = 0
    try:
        for round_ in range(300):  # 300 x 64 KiB: far more than the 8 MiB reserve
            try:
                os.pwrite(fd, os.urandom(64 << 10), (round_ % 16) << 16)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                refused += 1
    finally:
        os.close(fd)
    assert refused > 0, "overwrites took the whole reserve"
    assert status(mount)["journal_reserve_bytes"] >= (4 << 20) - (256 << 10)
    os.rename(root / "dovecot.index.tmp", root / "dovecot.index")
    os.truncate(root / "dovecot.index.log", 100)
    (root / "dovecot.index.log").unlink()
    assert (root / "dovecot.index").read_bytes() == b"new index"
    (small_disk / "filler").unlink()
    mount.stop()
    mount.start()
    assert (root / "dovecot.index").read_bytes() == b"new index"
    assert not (root / "dovecot.index.log").exists()


# Appends stdin to the file argv[1] in one write: a child process, so that a write held by
# the mount can be killed if the test fails.
APPEND_STDIN = textwrap.dedent("""
    import sys
    data = sys.stdin.buffer.read()
    with open(sys.argv[1], "ab") as handle:
        handle.write(data)  # buffered: retries short writes
""")


def append_all(path: Path, data: bytes) -> None:
    """Like a writer that retries short writes: the kernel splits a big write into
    requests, and a full disk may refuse only a later one."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def start_append(path: Path, data: bytes) -> subprocess.Popen[bytes]:
    child = subprocess.Popen([sys.executable, "-c", APPEND_STDIN, str(path)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    assert child.stdin is not None
    child.stdin.write(data)
    child.stdin.close()
    return child


def test_a_full_state_disk_holds_changes_until_there_is_room(
        dirs: Dirs, small_disk: Path) -> None:
    """With the default full_disk_wait, a write the full disk refuses waits for room and
    then succeeds: Dovecot never sees ENOSPC from a brief spell. Reads and status go on
    meanwhile (never freeze)."""
    mount = MailfsMount(dirs.backing, dirs.mnt, small_disk / "state", NO_AUTO_COMMIT,
                        log_path=dirs.state.parent / "small-disk-mailfs.log")
    mount.start()
    writer: subprocess.Popen[bytes] | None = None
    try:
        root = mount.mountpoint
        cache = root / "dovecot.index.cache"
        cache.write_bytes(b"header")
        (root / "dovecot.index").write_bytes(b"index")
        fill_to_the_last_page(small_disk / "filler")
        appended = os.urandom(256 << 10)
        writer = start_append(cache, appended)
        wait_for(lambda: status(mount)["full_disk_holding"] == 1, timeout=30,
                 what="the append to be held")
        assert (root / "dovecot.index").read_bytes() == b"index"
        assert status(mount)["state_disk_full"] is True
        assert writer.poll() is None, "the append was not held"
        (small_disk / "filler").unlink()
        assert writer.wait(timeout=60) == 0, writer.stderr.read().decode()  # type: ignore[union-attr]
        assert cache.read_bytes() == b"header" + appended
        counts = status(mount)
        assert counts["full_disk_went_on"] >= 1
        assert counts["full_disk_refused"] == 0
        assert counts["full_disk_holding"] == 0
        assert "state disk full: changes to index files wait" in mount.log()
        mount.stop()
        mount.start()
        assert cache.read_bytes() == b"header" + appended
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
            writer.wait()
        mount.stop()
        mount.kill()


def test_a_state_disk_that_stays_full_fails_changes_after_the_wait(
        dirs: Dirs, small_disk: Path) -> None:
    """The wait is bounded: after full_disk_wait the change fails with ENOSPC, and later
    changes in the same spell fail at once instead of each waiting again. Once there is
    room, changes succeed, and nothing written before is lost."""
    mount = MailfsMount(dirs.backing, dirs.mnt, small_disk / "state",
                        (*NO_AUTO_COMMIT, "-o", "full_disk_wait=2"),
                        log_path=dirs.state.parent / "small-disk-mailfs.log")
    mount.start()
    try:
        root = mount.mountpoint
        cache = root / "dovecot.index.cache"
        cache.write_bytes(b"header")
        fill_to_the_last_page(small_disk / "filler")
        refusals = 0
        for attempt in range(2):
            with pytest.raises(OSError) as refused:
                append_all(cache, os.urandom(256 << 10))
            assert refused.value.errno == errno.ENOSPC
            counts = status(mount)
            assert counts["full_disk_held"] == 1, f"attempt {attempt} waited again"
            assert counts["full_disk_refused"] > refusals
            refusals = counts["full_disk_refused"]
        assert counts["full_disk_longest_hold_s"] >= 1.5
        assert "state disk still full after 2 s" in mount.log()
        (small_disk / "filler").unlink()
        appended = os.urandom(256 << 10)
        before = cache.read_bytes()  # with what the refused appends wrote before failing
        append_all(cache, appended)
        assert cache.read_bytes() == before + appended
        mount.stop()
        mount.start()
        assert cache.read_bytes() == before + appended
    finally:
        mount.stop()
        mount.kill()


def use_up_the_journal_page(path: Path) -> None:
    """Append to a file until the full disk refuses even a small record: the journal's
    last page is used up. (Appends within the file's last block count as overwrites, which
    the reserve takes: hence the many small ones.)"""
    for size in (16 << 10, 1 << 10, 64):
        with pytest.raises(OSError) as refused:
            for _ in range(4096):
                append_all(path, os.urandom(size))
        assert refused.value.errno == errno.ENOSPC


def test_a_directory_rename_on_a_full_disk_keeps_the_index_files_below(
        dirs: Dirs, small_disk: Path) -> None:
    """An index-only directory rename is two records: the directory's own entry, then the
    names below it. Only the first used to be space-neutral, so on a full disk the
    directory moved and its index files stayed under the old path, orphaned and lost."""
    mount = MailfsMount(None, dirs.mnt, small_disk / "state", (*NO_AUTO_COMMIT, *NO_HOLD),
                        log_path=dirs.state.parent / "small-disk-mailfs.log")
    mount.start()
    try:
        root = mount.mountpoint
        # Long names: the record for the names below must not fit where an append of one
        # byte did not.
        old, new = root / ("INBOX-" + "i" * 150), root / ("Archive-" + "a" * 150)
        old.mkdir()
        (old / "dovecot.index").write_bytes(b"index of INBOX")
        (old / "dovecot.index.log").write_bytes(b"log" * 1000)
        fill_to_the_last_page(small_disk / "filler")
        use_up_the_journal_page(root / "dovecot.index.cache")
        os.rename(old, new)
        assert sorted(os.listdir(new)) == ["dovecot.index", "dovecot.index.log"]
        assert (new / "dovecot.index").read_bytes() == b"index of INBOX"
        (small_disk / "filler").unlink()
        mount.stop()
        mount.start()
        assert not old.exists()
        assert (new / "dovecot.index").read_bytes() == b"index of INBOX"
        assert (new / "dovecot.index.log").read_bytes() == b"log" * 1000
    finally:
        mount.stop()
        mount.kill()


def test_a_mkdir_on_a_full_state_disk_succeeds_when_the_directory_was_made(
        dirs: Dirs, small_disk: Path) -> None:
    """Full overlay: the backing mkdir has happened before the store notes the directory
    as imported; a full state disk used to turn that note into ENOSPC for a directory that
    exists (and a retry into EEXIST)."""
    mount = MailfsMount(dirs.backing, dirs.mnt, small_disk / "state",
                        (*NO_AUTO_COMMIT, *NO_HOLD),
                        log_path=dirs.state.parent / "small-disk-mailfs.log")
    mount.start()
    try:
        root = mount.mountpoint
        (root / "dovecot.index.log").write_bytes(b"log" * 1000)  # the root is imported
        fill_to_the_last_page(small_disk / "filler")
        use_up_the_journal_page(root / "dovecot.index.cache")
        (root / "Drafts").mkdir()
        assert (dirs.backing / "Drafts").is_dir()
        assert os.listdir(root / "Drafts") == []
        (small_disk / "filler").unlink()
        (root / "Drafts" / "dovecot.index").write_bytes(b"drafts index")
        mount.stop()
        mount.start()
        assert (root / "Drafts" / "dovecot.index").read_bytes() == b"drafts index"
    finally:
        mount.stop()
        mount.kill()


def test_corrupt_journal_does_not_stop_later_replays(make_mount: MakeMount, dirs: Dirs) -> None:
    """A zero-filled tail (machine crash) in a journal with nothing to replay must not stop
    the replay of every later journal."""
    mount = make_mount(NO_AUTO_COMMIT)
    (mount.mountpoint / "dovecot.index").write_bytes(b"one")
    run_cli("flush", str(mount.mountpoint), check=True)  # LMDB has it; the journal is empty
    mount.kill()
    append_to_newest_journal(dirs, b"\0" * 4096)
    mount = make_mount(NO_AUTO_COMMIT)
    assert (mount.mountpoint / "dovecot.index").read_bytes() == b"one"
    (mount.mountpoint / "dovecot-uidlist").write_bytes(b"two")  # only in the journal now
    mount.kill()
    mount = make_mount(NO_AUTO_COMMIT)
    assert (mount.mountpoint / "dovecot-uidlist").read_bytes() == b"two"
