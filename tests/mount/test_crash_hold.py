"""After a daemon crash, processes on the mount wait instead of failing (crash_hold).

Each test crashes the daemon (SIGKILL) while another process holds a file of the mount
open, the way a Dovecot process holds its indexes, and then has that process read.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tests.mount.conftest import Dirs
from tests.rigs.mount import MailfsMount, is_mounted, run_cli

MakeMount = Callable[..., MailfsMount]
ReaderOf = Callable[..., "Reader"]

# Opens a file, says so, reads once per line on stdin and reports what came back.
READER = textwrap.dedent("""
    import errno, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDONLY)
    print("open", flush=True)
    for _ in sys.stdin:
        began = time.monotonic()
        try:
            os.fstat(fd)
            os.stat(sys.argv[1])
            result = "ok"
        except OSError as exc:
            result = errno.errorcode[exc.errno]
        print(result, round(time.monotonic() - began, 2), flush=True)
""")


class Reader:
    def __init__(self, path: Path, prefix: Sequence[str] = ()) -> None:
        self.process = subprocess.Popen([*prefix, sys.executable, "-c", READER, str(path)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)
        assert self.process.stdout is not None and self.process.stdin is not None
        self.stdout, self.stdin = self.process.stdout, self.process.stdin
        assert self.stdout.readline().strip() == "open"
        self.answer: list[str] = []
        self._thread: threading.Thread | None = None

    def ask(self) -> None:
        """One access in the background; `answer` gets "ok SECONDS" or "ERRNO SECONDS"."""
        self.stdin.write("go\n")
        self.stdin.flush()
        self._thread = threading.Thread(
            target=lambda: self.answer.append(self.stdout.readline().strip()), daemon=True)
        self._thread.start()

    def wait_answer(self, timeout: float) -> str | None:
        assert self._thread is not None
        self._thread.join(timeout)
        return self.answer[-1] if self.answer else None

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)


@pytest.fixture
def reader_of() -> Iterator[ReaderOf]:
    readers: list[Reader] = []

    def start(path: Path, prefix: Sequence[str] = ()) -> Reader:
        readers.append(Reader(path, prefix))
        return readers[-1]

    yield start
    for reader in readers:
        reader.close()


def crash(mount: MailfsMount) -> int:
    """SIGKILL of the daemon alone; returns its keeper's pid (looked up before)."""
    keeper = keeper_pid(mount)
    assert keeper is not None
    assert mount.process is not None
    mount.process.send_signal(signal.SIGKILL)
    mount.process.wait(timeout=30)
    return keeper


def keeper_pid(mount: MailfsMount) -> int | None:
    result = run_cli("status", str(mount.mountpoint), "--json")
    assert result.returncode == 0, result.stderr
    pid = json.loads(result.stdout)["crash_hold"]["keeper_pid"]
    assert pid is None or isinstance(pid, int)
    return pid


def gone(pid: int, timeout: float) -> bool:
    """Whether `pid` has exited within `timeout` s (a zombie counts: whoever adopted the
    keeper may reap it late)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rpartition(")")[2].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def mount_and_reader(make_mount: MakeMount, reader_of: ReaderOf, *options: str,
                     content: bytes = b"x") -> tuple[MailfsMount, Reader]:
    """A mount with one index file, and a process that holds that file open."""
    mount = make_mount(tuple(arg for option in options for arg in ("-o", option)))
    (mount.mountpoint / "dovecot.index").write_bytes(content)
    return mount, reader_of(mount.mountpoint / "dovecot.index")


def test_processes_wait_until_stopped_and_the_next_mount_serves_everything(
        make_mount: MakeMount, dirs: Dirs, reader_of: ReaderOf) -> None:
    mount, reader = mount_and_reader(make_mount, reader_of,
                                     content=b"written before the crash")
    keeper = crash(mount)
    reader.ask()
    assert reader.wait_answer(2.0) is None, "a process on the crashed mount failed at once"
    assert not gone(keeper, 0.5), "the keeper let go while a process still used the mount"
    reader.close()  # the supervisor stops Dovecot
    assert gone(keeper, 10), "the keeper held on after the last process had gone"
    assert "no process uses" in mount.log()
    mount.kill()
    mount = make_mount()
    assert (mount.mountpoint / "dovecot.index").read_bytes() == b"written before the crash"


def test_without_a_hold_processes_fail_at_once(
        make_mount: MakeMount, reader_of: ReaderOf) -> None:
    mount, reader = mount_and_reader(make_mount, reader_of, "crash_hold=0")
    assert keeper_pid(mount) is None
    assert mount.process is not None
    mount.process.send_signal(signal.SIGKILL)
    mount.process.wait(timeout=30)
    reader.ask()
    answer = reader.wait_answer(10.0)
    assert answer is not None and answer.split()[0] in ("ENOTCONN", "ECONNABORTED"), answer


def test_the_hold_ends_by_killing_the_processes_still_on_the_mount(
        make_mount: MakeMount, reader_of: ReaderOf) -> None:
    mount, reader = mount_and_reader(make_mount, reader_of, "crash_hold=2")
    keeper = crash(mount)
    began = time.monotonic()
    reader.ask()
    reader.process.wait(timeout=30)
    assert reader.process.returncode == -signal.SIGKILL
    assert time.monotonic() - began >= 1.5
    assert reader.answer == [] or reader.answer == [""], "the process ran on after an error"
    assert gone(keeper, 10)
    log = mount.log()
    assert "killed them" in log and f"{reader.process.pid} (python" in log


def test_without_the_fence_the_hold_ends_in_enotconn(
        make_mount: MakeMount, reader_of: ReaderOf) -> None:
    mount, reader = mount_and_reader(make_mount, reader_of, "crash_hold=2",
                                     "crash_fence=false")
    crash(mount)
    reader.ask()
    answer = reader.wait_answer(30.0)
    assert answer is not None, "the hold did not end"
    result, seconds = answer.split()
    assert result in ("ENOTCONN", "ECONNABORTED") and float(seconds) >= 1.5, answer
    assert reader.process.poll() is None


def test_a_new_mount_waits_for_the_processes_of_the_crashed_one(
        make_mount: MakeMount, dirs: Dirs, reader_of: ReaderOf) -> None:
    mount, reader = mount_and_reader(make_mount, reader_of)
    keeper = crash(mount)
    mount.kill()  # clears the dead mount the way an admin would; the hold goes on
    started: list[MailfsMount] = []
    thread = threading.Thread(target=lambda: started.append(make_mount()), daemon=True)
    thread.start()
    time.sleep(2.0)
    assert not is_mounted(dirs.mnt), "mounted beside a process of the crashed daemon"
    assert not gone(keeper, 0.1)
    reader.close()
    thread.join(60)
    assert started and is_mounted(dirs.mnt)
    assert "still holds the old connection" in started[0].log()
    assert (dirs.mnt / "dovecot.index").read_bytes() == b"x"


def test_a_clean_unmount_ends_the_keeper_and_sigterm_does_not(make_mount: MakeMount) -> None:
    mount = make_mount()
    keeper = keeper_pid(mount)
    assert keeper is not None
    os.kill(keeper, signal.SIGTERM)  # systemd's stop reaches every process of the unit
    assert not gone(keeper, 0.5)
    (mount.mountpoint / "dovecot.index").write_bytes(b"still served")
    mount.stop()
    assert gone(keeper, 10), "the keeper outlived a clean unmount"


def test_umount_of_the_crashed_mount_ends_the_hold_at_once(
        make_mount: MakeMount, dirs: Dirs, reader_of: ReaderOf) -> None:
    """systemd runs ExecStop (`mailfs umount`) after the crash: it must neither wait on the
    held connection nor leave the processes on it waiting for the whole hold."""
    mount, reader = mount_and_reader(make_mount, reader_of, "crash_hold=120",
                                     "index_timeout=0.1", "passthrough_timeout=0.1")
    keeper = crash(mount)
    reader.ask()
    time.sleep(0.5)  # past the root's attribute timeout: a stat of it would wait
    began = time.monotonic()
    result = run_cli("umount", str(mount.mountpoint), timeout=60)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - began < 30
    assert "ended the crash hold" in result.stdout
    assert gone(keeper, 10)
    reader.process.wait(timeout=10)
    assert reader.process.returncode == -signal.SIGKILL
    assert not is_mounted(dirs.mnt)
    assert "when told to unmount; killed them" in mount.log()


def test_a_process_in_another_mount_namespace_keeps_the_hold(
        make_mount: MakeMount, reader_of: ReaderOf) -> None:
    """systemd starts Dovecot with PrivateTmp=: its files on the mount have mount ids of
    its own namespace. An idle process with the file open must keep the hold all the same."""
    mount = make_mount()
    (mount.mountpoint / "dovecot.index").write_bytes(b"x")
    reader = reader_of(mount.mountpoint / "dovecot.index",
                       ["unshare", "--mount", "--propagation", "slave"])
    keeper = crash(mount)
    assert not gone(keeper, 2.0), "released while a process in another namespace held a file"
    reader.close()
    assert gone(keeper, 10)


PATH_CALLER = textwrap.dedent("""
    import os, sys
    print("ready", flush=True)
    sys.stdin.readline()
    os.stat(sys.argv[1])
    print("returned", flush=True)
""")


def test_a_process_waiting_in_a_path_call_keeps_the_hold_and_is_fenced(
        make_mount: MakeMount, dirs: Dirs) -> None:
    """No file of the mount open: only the request it waits on names it."""
    mount = make_mount(("-o", "crash_hold=3", "-o", "index_timeout=0.1",
                        "-o", "passthrough_timeout=0.1"))
    (mount.mountpoint / "dovecot.index").write_bytes(b"x")
    caller = subprocess.Popen([sys.executable, "-c", PATH_CALLER,
                               str(mount.mountpoint / "dovecot.index")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              cwd="/")
    try:
        assert caller.stdout is not None and caller.stdin is not None
        assert caller.stdout.readline().strip() == "ready"
        keeper = keeper_pid(mount)
        assert keeper is not None and mount.process is not None
        # Stopped first, so that the stat's request waits unread when the daemon dies.
        mount.process.send_signal(signal.SIGSTOP)
        time.sleep(0.3)  # past the attribute timeouts: the stat must ask the daemon
        caller.stdin.write("go\n")
        caller.stdin.flush()
        time.sleep(0.3)
        mount.process.send_signal(signal.SIGKILL)
        mount.process.wait(timeout=30)
        assert not gone(keeper, 1.5), "released while a process waited in a path call"
        caller.wait(timeout=30)
        assert caller.returncode == -signal.SIGKILL
        assert gone(keeper, 10)
        assert f"{caller.pid} (python" in mount.log()
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait(timeout=30)
