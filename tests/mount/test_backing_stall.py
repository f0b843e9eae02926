"""Never freeze: mailfs over a real network filesystem (sshfs) whose server stops answering.

The backing store is an sshfs mount served from an sshd in a private network namespace
(tests/rigs/sshfs.py). `stall()` stops the sshfs process, so every backing call blocks in
the kernel like a call to an NFS server that went away. Index files must keep working
meanwhile, and passthrough calls must fail with EIO after `backing_timeout` instead of
hanging. Everything that could hang runs in a subprocess with its own timeout, so a freeze
fails the test (with the kernel stacks of the stuck processes) instead of hanging pytest.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.rigs.mount import MailfsMount, force_unmount, is_mounted, mailfs_cmd, run_cli
from tests.rigs.sshfs import SshfsMount, sshfs_backing, sshfs_unusable

REPO = Path(__file__).resolve().parents[2]
BACKING_TIMEOUT = 3.0
# The watchdog looks every 0.5 s; process start-up and scheduling get the rest.
EIO_MARGIN = 3.0
# Index-file operations never wait for the backing store (at most 2 ms per backing call,
# and they make none): the whole batch takes milliseconds; this bound only absorbs noise.
INDEX_OPS_BOUND = 2.0

INDEX_V1 = b"index version 1\n" * 40
LOG_V1 = b"log record 1\n" * 10
UIDLIST_V1 = b"3 V1234 N2 Gguid\n1 :msg.1\n"
MSG_1 = b"Subject: one\n\nfirst message\n" * 20
MSG_2 = b"Subject: two\n\nsecond message\n" * 20
MSG_3 = b"Subject: three\n\nwritten after the stall\n" * 20
# Written while the backing store is stalled.
INDEX_V2 = b"index version 2, written during the stall\n" * 30
LOG_APPEND = b"log record 2, appended during the stall\n" * 5
UIDLIST_V2 = b"3 V1234 N3 Gguid\n1 :msg.1\n2 :msg.2\n"
CACHE_V1 = b"cache file created during the stall\n" * 25


@dataclass
class Rig:
    base: Path
    sshfs: SshfsMount
    mnt: Path
    state: Path
    mounts: list[MailfsMount] = field(default_factory=list)

    def mount(self, extra_args: Sequence[str] = ()) -> MailfsMount:
        mount = MailfsMount(self.sshfs.mountpoint, self.mnt, self.state, extra_args,
                            log_path=self.base / f"mailfs-{len(self.mounts)}.log")
        self.mounts.append(mount)
        return mount.start()

    def logs(self) -> str:
        return "\n".join(mount.log() for mount in self.mounts)


@pytest.fixture
def rig() -> Iterator[Rig]:
    reason = sshfs_unusable()
    if reason is not None and not os.environ.get("CI"):
        pytest.skip(reason)
    # Not pytest's tmp_path: that sits under a 0700 directory, and tests act as other users.
    base = Path(tempfile.mkdtemp(prefix="mailfs-sshfs-"))
    base.chmod(0o755)
    mnt, state = base / "mnt", base / "state"
    for path in (mnt, state):
        path.mkdir()
        path.chmod(0o755)
    try:
        with sshfs_backing(base) as sshfs:
            result = Rig(base, sshfs, mnt, state)
            try:
                yield result
            finally:
                sshfs.resume()  # a stalled backing store would keep the daemon from exiting
                failures = []
                for mount in result.mounts:
                    try:
                        mount.stop()
                    except Exception as exc:  # still kill it, and the others
                        failures.append(f"stop failed: {exc}")
                    finally:
                        mount.kill()
                force_unmount(mnt)
                assert not failures, "\n".join(failures)
    finally:
        if not any(is_mounted(path) for path in (mnt, base / "sshfs")):
            shutil.rmtree(base, ignore_errors=True)


# ------------------------------------------------------------------ bounded subprocesses


def kernel_stacks(pids: Sequence[int]) -> str:
    """Where each process (and each of its threads) sits in the kernel."""
    lines = []
    for pid in pids:
        try:
            tasks = sorted(os.listdir(f"/proc/{pid}/task"), key=int)
        except FileNotFoundError:
            lines.append(f"pid {pid}: gone")
            continue
        for tid in tasks:
            base = f"/proc/{pid}/task/{tid}"
            try:
                with open(f"{base}/comm") as comm, open(f"{base}/stat") as stat:
                    name, state = comm.read().strip(), stat.read().rsplit(")", 1)[1].split()[0]
                with open(f"{base}/stack") as stack:
                    frames = stack.read().strip().replace("\n", " <- ")
            except OSError as exc:
                frames = f"({exc})"
                name = state = "?"
            lines.append(f"pid {pid} tid {tid} {name} [{state}]: {frames}")
    return "\n".join(lines)


def run_bounded(argv: Sequence[str], timeout: float, rig: Rig,
                ) -> subprocess.CompletedProcess[str]:
    """Run a command that may touch the mount; on timeout, fail with the kernel stacks."""
    process = subprocess.Popen(list(argv), cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        daemons = [m.process.pid for m in rig.mounts if m.process and m.process.poll() is None]
        stacks = kernel_stacks([process.pid, *daemons, rig.sshfs.sshfs_pid])
        process.kill()
        process.communicate(timeout=30)
        pytest.fail(f"{list(argv)} hung for more than {timeout}s\n"
                    f"kernel stacks:\n{stacks}\n--- mailfs log\n{rig.logs()}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


def run_json(argv: Sequence[str], timeout: float, rig: Rig) -> dict[str, Any]:
    result = run_bounded(argv, timeout, rig)
    assert result.returncode == 0, f"{result.stderr}\n--- mailfs log\n{rig.logs()}"
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


INDEX_OPS = "import json, sys; from tests.mount.test_backing_stall import index_ops; " \
            "print(json.dumps(index_ops(sys.argv[1])))"
PASSTHROUGH_OP = "import json, sys; from tests.mount.test_backing_stall import " \
                 "passthrough_op; print(json.dumps(passthrough_op(sys.argv[1], sys.argv[2])))"


def index_ops(directory: str) -> dict[str, float]:
    """What Dovecot does to a mailbox's index files; runs in the subprocess. Step -> seconds."""
    box = Path(directory)
    times: dict[str, float] = {}

    def step(name: str) -> None:
        times[name] = time.monotonic() - started

    started = time.monotonic()
    os.stat(box / "dovecot.index")
    step("stat")
    fd = os.open(box / "dovecot.index.log", os.O_WRONLY | os.O_APPEND)
    os.write(fd, LOG_APPEND)
    os.fsync(fd)
    os.close(fd)
    step("append+fsync log")
    assert (box / "dovecot.index.log").read_bytes() == LOG_V1 + LOG_APPEND
    step("read log")
    fd = os.open(box / "dovecot.index.tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, INDEX_V2)
    os.fsync(fd)
    os.close(fd)
    os.rename(box / "dovecot.index.tmp", box / "dovecot.index")
    step("write tmp+rename over index")
    assert (box / "dovecot.index").read_bytes() == INDEX_V2
    step("read index")
    fd = os.open(box / "dovecot-uidlist.lock", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, UIDLIST_V2)
    os.close(fd)
    os.rename(box / "dovecot-uidlist.lock", box / "dovecot-uidlist")
    step("dot-lock+rename over uidlist")
    assert (box / "dovecot-uidlist").read_bytes() == UIDLIST_V2
    step("read uidlist")
    with open(box / "dovecot.index.cache", "xb") as cache:
        cache.write(CACHE_V1)
        cache.flush()
        os.fsync(cache.fileno())
    step("create+fsync cache")
    with open(box / "dovecot.index.cache", "rb") as reader:
        assert reader.read() == CACHE_V1
    step("read cache")
    return times


def passthrough_op(kind: str, path: str) -> dict[str, object]:
    """One backing-store operation; runs in the subprocess. Reports errno and seconds."""
    started = time.monotonic()
    error = 0
    try:
        if kind == "listdir":
            os.listdir(path)
        elif kind == "read":
            with open(path, "rb") as handle:
                handle.read()
        elif kind == "create":
            with open(path, "xb") as handle:
                handle.write(b"Subject: lost\n\nnever written\n")
        else:
            raise ValueError(kind)
    except OSError as exc:
        error = exc.errno or -1
    return {"kind": kind, "errno": error, "seconds": time.monotonic() - started}


def status(rig: Rig, timeout: float = 20.0) -> dict[str, Any]:
    started = time.monotonic()
    result = run_cli("status", str(rig.mnt), "--json", timeout=timeout)
    assert result.returncode == 0, f"{result.stderr}\n--- mailfs log\n{rig.logs()}"
    parsed: dict[str, Any] = json.loads(result.stdout)
    parsed["_seconds"] = time.monotonic() - started
    return parsed


# ------------------------------------------------------------------ tests


def test_mailfs_over_sshfs_works(rig: Rig) -> None:
    mount = rig.mount()
    box = rig.mnt / "alice" / "INBOX"
    box.mkdir(parents=True)
    (box / "msg.1").write_bytes(MSG_1)
    (box / "dovecot.index").write_bytes(INDEX_V1)
    with open(box / "dovecot.index.log", "wb") as log:
        log.write(LOG_V1)
        log.flush()
        os.fsync(log.fileno())
    assert (box / "msg.1").read_bytes() == MSG_1
    assert (box / "dovecot.index").read_bytes() == INDEX_V1
    assert (box / "dovecot.index.log").read_bytes() == LOG_V1
    assert sorted(os.listdir(box)) == ["dovecot.index", "dovecot.index.log", "msg.1"]

    # The message went over the network to the remote directory; the index files did not.
    remote_box = rig.sshfs.remote_dir / "alice" / "INBOX"
    assert (remote_box / "msg.1").read_bytes() == MSG_1
    assert sorted(os.listdir(remote_box)) == ["msg.1"]

    state = status(rig)
    assert state["healthy"] is True
    assert state["backing_timeouts"] == 0
    mount.stop()
    rig.mount()
    assert (box / "dovecot.index").read_bytes() == INDEX_V1
    assert (box / "dovecot.index.log").read_bytes() == LOG_V1
    assert (box / "msg.1").read_bytes() == MSG_1
    for started in rig.mounts:
        assert not started.problems(), started.log()


def test_files_stay_reachable_when_sshfs_renumbers_them(rig: Rig) -> None:
    """sshfs numbers files as it meets them and renumbers those its kernel side forgot,
    unlike NFS. mailfs must then know passthrough files by name: Dovecot on the full
    overlay over sshfs got "dbox: Unexpectedly lost uid" after a folder rename."""
    rig.mount()
    state = status(rig)
    assert (state["backing_fs_type"], state["backing_inodes"]) == ("fuse.sshfs", "unstable")
    folder = rig.mnt / "Work" / "Reports" / "dbox-Mails"
    folder.mkdir(parents=True)
    (folder / "u.1").write_bytes(MSG_1)
    os.rename(rig.mnt / "Work", rig.mnt / "Projects")
    message = rig.mnt / "Projects" / "Reports" / "dbox-Mails" / "u.1"
    # O_PATH keeps the overlay's inode without an open, so nothing pins sshfs's.
    pinned = os.open(message, os.O_PATH)
    try:
        before = os.stat(rig.sshfs.mountpoint / "Projects/Reports/dbox-Mails/u.1").st_ino
        try:
            Path("/proc/sys/vm/drop_caches").write_text("2")
        except OSError as exc:
            pytest.skip(f"cannot make the kernel forget sshfs's inodes here: {exc}")
        after = os.stat(rig.sshfs.mountpoint / "Projects/Reports/dbox-Mails/u.1").st_ino
        if after == before:
            pytest.skip("sshfs kept its inode number: nothing to check here")
        with open(f"/proc/self/fd/{pinned}", "rb") as reopened:
            assert reopened.read() == MSG_1
        assert os.stat(f"/proc/self/fd/{pinned}").st_size == len(MSG_1)
    finally:
        os.close(pinned)
    assert message.read_bytes() == MSG_1
    for started in rig.mounts:
        assert not started.problems(), started.log()


def test_stalled_backing_never_freezes_index_files(rig: Rig) -> None:
    rig.mount(["-o", f"backing_timeout={BACKING_TIMEOUT:g}"])
    box = rig.mnt / "INBOX"
    other = rig.mnt / "Archive"
    never_listed = rig.mnt / "Never-listed"
    box.mkdir()
    other.mkdir()
    (other / "msg.2").write_bytes(MSG_2)
    (box / "dovecot.index").write_bytes(INDEX_V1)
    (box / "dovecot.index.log").write_bytes(LOG_V1)
    (box / "dovecot-uidlist").write_bytes(UIDLIST_V1)
    # The last passthrough changes in each directory leave fresh directory attributes in
    # the daemon (and so in the kernel) for `passthrough_timeout` (10 s): walking into
    # INBOX and the root needs no backing call within that time. (Later in a stall the
    # kernel revalidates the directory, a backing lstat: index operations in it then fail
    # with EIO after backing_timeout too, because directories are passthrough.)
    (box / "msg.1").write_bytes(MSG_1)
    never_listed.mkdir()
    os.stat(box)
    os.stat(box / "dovecot.index.log")
    os.stat(rig.mnt)
    assert status(rig)["backing_timeouts"] == 0

    rig.sshfs.stall()
    times = run_json(python(INDEX_OPS, str(box)), timeout=20.0, rig=rig)
    took = max(times.values())
    assert took < INDEX_OPS_BOUND, f"index operations were slow while stalled: {times}"

    # Passthrough calls fail with EIO once the watchdog gives up on them; all at once, on
    # their own worker threads.
    checks = [("listdir", never_listed), ("read", other / "msg.2"),
              ("create", box / "msg.new")]
    running = [
        subprocess.Popen(python(PASSTHROUGH_OP, kind, str(path)), cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for kind, path in checks
    ]
    bound = BACKING_TIMEOUT + EIO_MARGIN + 5.0
    results: list[dict[str, Any]] = []
    for process in running:
        try:
            stdout, stderr = process.communicate(timeout=bound)
        except subprocess.TimeoutExpired:
            daemons = [m.process.pid for m in rig.mounts if m.process]
            stacks = kernel_stacks([process.pid, *daemons, rig.sshfs.sshfs_pid])
            for each in running:
                each.kill()
                each.communicate(timeout=30)
            pytest.fail(f"a passthrough call hung for more than {bound}s while the backing "
                        f"store was stalled\n{stacks}\n--- mailfs log\n{rig.logs()}")
        assert process.returncode == 0, stderr
        results.append(json.loads(stdout))
    for result in results:
        assert result["errno"] == errno.EIO, results
        assert result["seconds"] < BACKING_TIMEOUT + EIO_MARGIN, results
        assert result["seconds"] > BACKING_TIMEOUT - 0.5, results

    state = status(rig)
    assert state["backing_timeouts"] >= len(checks), state
    assert state["healthy"] is False, state
    assert state["backing_healthy"] is False, state
    assert state["_seconds"] < BACKING_TIMEOUT + EIO_MARGIN, state

    rig.sshfs.resume()
    # The worker threads that were stuck in sshfs get their answers now; the mount works.
    (box / "msg.3").write_bytes(MSG_3)
    assert (box / "msg.3").read_bytes() == MSG_3
    assert (other / "msg.2").read_bytes() == MSG_2
    assert os.listdir(never_listed) == []
    assert not (box / "msg.new").exists() or (box / "msg.new").stat().st_size == 0
    assert (rig.sshfs.remote_dir / "INBOX" / "msg.3").read_bytes() == MSG_3
    after = status(rig)
    assert after["backing_stalled_calls"] == 0, after

    rig.mounts[0].stop()
    rig.mount()
    assert (box / "dovecot.index").read_bytes() == INDEX_V2
    assert (box / "dovecot.index.log").read_bytes() == LOG_V1 + LOG_APPEND
    assert (box / "dovecot-uidlist").read_bytes() == UIDLIST_V2
    assert (box / "dovecot.index.cache").read_bytes() == CACHE_V1
    assert (box / "msg.1").read_bytes() == MSG_1
    assert (box / "msg.3").read_bytes() == MSG_3
    assert (other / "msg.2").read_bytes() == MSG_2
    assert not (box / "dovecot.index.tmp").exists()
    assert not (box / "dovecot-uidlist.lock").exists()
    # Index files never reached the backing store, not even while it was stalled.
    remote_names = set(os.listdir(rig.sshfs.remote_dir / "INBOX"))
    assert not {name for name in remote_names if name.startswith("dovecot")}, remote_names

    logs = rig.logs()
    assert "Traceback" not in logs, logs
    assert "did not return within" in logs, logs


# ------------------------------------------------------------------ regressions
# Each of these reproduced a freeze or leak found with this rig.


def make_mailbox(rig: Rig) -> Path:
    """INBOX with the index files INDEX_OPS expects, its attributes cached by the kernel."""
    box = rig.mnt / "INBOX"
    box.mkdir()
    (box / "dovecot.index").write_bytes(INDEX_V1)
    (box / "dovecot.index.log").write_bytes(LOG_V1)
    (box / "dovecot-uidlist").write_bytes(UIDLIST_V1)
    os.stat(box)
    return box


def test_status_during_stall_before_any_timeout(rig: Rig) -> None:
    """`mailfs status` must not touch the backing store: it would freeze with it."""
    # A long timeout: no call times out during the test, so health must come from elsewhere
    # than a timed-out call (it once came from an isdir() of the backing root, which hung).
    rig.mount(["-o", "backing_timeout=60"])
    box = make_mailbox(rig)
    time.sleep(1.5)  # sshfs's own kernel attribute cache (1 s) must not answer for it
    rig.sshfs.stall()
    result = run_bounded(mailfs_cmd("status", str(rig.mnt), "--json"), timeout=5.0, rig=rig)
    assert result.returncode == 0, result.stderr
    times = run_json(python(INDEX_OPS, str(box)), timeout=5.0, rig=rig)
    assert max(times.values()) < INDEX_OPS_BOUND, times


def backing_fds(pid: int, backing: Path) -> list[str]:
    """The daemon's open files on the backing store."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(f"{backing}/"):
            found.append(target)
    return found


def wait_for_no_backing_fds(pid: int, backing: Path, seconds: float) -> list[str]:
    deadline = time.monotonic() + seconds
    while (left := backing_fds(pid, backing)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def test_timed_out_open_leaks_no_fd(rig: Rig) -> None:
    """An open the watchdog failed must not leave its late fd open for the mount's life."""
    mount = rig.mount(["-o", "backing_timeout=2"])
    assert mount.process is not None
    box = rig.mnt / "INBOX"
    box.mkdir()
    (box / "msg.1").write_bytes(MSG_1)
    os.stat(box / "msg.1")
    assert wait_for_no_backing_fds(mount.process.pid, rig.sshfs.mountpoint, 5.0) == []
    rig.sshfs.stall()
    result = run_json(python(PASSTHROUGH_OP, "read", str(box / "msg.1")), timeout=15.0, rig=rig)
    assert result["errno"] == errno.EIO, result
    rig.sshfs.resume()
    assert (box / "msg.1").read_bytes() == MSG_1
    left = wait_for_no_backing_fds(mount.process.pid, rig.sshfs.mountpoint, 5.0)
    assert left == [], f"the daemon still holds {left}"


def test_index_files_stay_reachable_after_directory_caches_expire(rig: Rig) -> None:
    """Past passthrough_timeout the kernel revalidates directories on every path walk; during
    a stall the daemon answers for directories it knows from their last attributes."""
    rig.mount(["-o", "backing_timeout=30", "-o", "passthrough_timeout=1"])
    box = make_mailbox(rig)
    rig.sshfs.stall()
    time.sleep(3.5)  # the kernel's directory caches expire; the daemon sees the stall
    times = run_json(python(INDEX_OPS, str(box)), timeout=10.0, rig=rig)
    assert max(times.values()) < INDEX_OPS_BOUND, times
    state = json.loads(run_bounded(mailfs_cmd("status", str(rig.mnt), "--json"), timeout=5.0,
                                   rig=rig).stdout)
    assert state["healthy"] is False
