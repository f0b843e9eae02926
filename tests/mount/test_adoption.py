"""A restarted daemon takes over the FUSE connection of a crashed one (index-only mounts).

A child process holds files of the mount open across a kill -9 of the daemon, asks for
something while no daemon runs, and goes on using its descriptors once the next daemon
has adopted the connection: no call fails, and nothing written is lost.
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
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rigs.mount import MailfsMount, force_unmount, is_mounted, mounted, run_cli

# Holds a file and its directory open; runs one command per stdin line, prints the result.
CHILD = textwrap.dedent("""
    import errno, os, sys
    path = sys.argv[1]
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    dir_fd = os.open(os.path.dirname(path), os.O_RDONLY)
    print("open", flush=True)
    for line in sys.stdin:
        command, _, argument = line.strip().partition(" ")
        try:
            if command == "stat":
                result = str(os.stat(path).st_size)
            elif command == "fstat":
                result = str(os.fstat(fd).st_size)
            elif command == "read":
                result = os.pread(fd, 4096, 0).decode()
            elif command == "write":
                result = str(os.pwrite(fd, argument.encode(), 0))
            elif command == "truncate":
                os.ftruncate(fd, int(argument))
                result = "truncated"
            elif command == "fsync":
                os.fsync(fd)
                result = "synced"
            elif command == "list":
                result = ",".join(sorted(os.listdir(f"/proc/self/fd/{dir_fd}")))
            else:
                result = "unknown command"
        except OSError as exc:
            result = errno.errorcode[exc.errno]
        print(result, flush=True)
""")


class Child:
    def __init__(self, path: Path) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", CHILD, str(path)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)
        assert self.process.stdin is not None and self.process.stdout is not None
        self.stdin, self.stdout = self.process.stdin, self.process.stdout
        assert self.stdout.readline().strip() == "open"
        self._answers: list[str] = []
        self._reader: threading.Thread | None = None

    def send(self, command: str) -> None:
        self.stdin.write(command + "\n")
        self.stdin.flush()
        self._reader = threading.Thread(
            target=lambda: self._answers.append(self.stdout.readline().strip()), daemon=True)
        self._reader.start()

    def answer(self, timeout: float) -> str | None:
        assert self._reader is not None
        self._reader.join(timeout)
        return self._answers.pop() if self._answers else None

    def ask(self, command: str, timeout: float = 30.0) -> str | None:
        self.send(command)
        return self.answer(timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)


@pytest.fixture
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    yield started
    for child in started:
        child.close()


@pytest.fixture(params=["short timeouts"])
def index_mount(base: Path, request: pytest.FixtureRequest) -> Iterator[MailfsMount]:
    """Short kernel timeouts by default: a stat after the crash must reach the (dead)
    daemon. With the default ones the kernel goes on using the numbers it holds."""
    timeouts = ["-o", "index_timeout=0.1"] if request.param == "short timeouts" else []
    with mounted(None, base / "mnt", base / "state",
                 ["-o", "crash_hold=60", *timeouts]) as mount:
        yield mount


def held_open(mount: MailfsMount, children: list[Child], relative: str,
              content: bytes) -> tuple[Path, Child]:
    """A file written on the mount and held open by a child; returns its folder too."""
    path = mount.mountpoint / relative
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    children.append(Child(path))
    return path.parent, children[-1]


def status(mount: MailfsMount) -> dict[str, object] | None:
    result = run_cli("status", str(mount.mountpoint), "--json")
    if result.returncode != 0:
        return None
    found: dict[str, object] = json.loads(result.stdout)
    return found


def crash(mount: MailfsMount) -> None:
    """kill -9 of the daemon alone: its keeper holds the connection."""
    assert mount.process is not None
    mount.process.send_signal(signal.SIGKILL)
    mount.process.wait(timeout=30)


def restart(mount: MailfsMount) -> dict[str, object]:
    """The next daemon of the same state directory; returns its status once it serves."""
    mount.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = status(mount)
        if found is not None:
            return found
        assert mount.process is not None and mount.process.poll() is None, mount.log()
        time.sleep(0.1)
    raise AssertionError(f"the restarted daemon never answered status:\n{mount.log()}")


def test_calls_waiting_at_the_crash_complete_and_open_files_work_on(
        index_mount: MailfsMount, children: list[Child]) -> None:
    user, child = held_open(index_mount, children, "alice/dovecot.index", b"before the crash")
    crash(index_mount)
    time.sleep(0.3)  # past the kernel's attribute timeout
    child.send("stat")
    assert child.answer(1.5) is None, "a call on the crashed mount did not wait"
    after = restart(index_mount)
    assert child.answer(30) == str(len(b"before the crash")), index_mount.log()
    assert after["connection_adopted"] is True
    assert "adopting the FUSE connection" in index_mount.log()
    assert child.ask("read") == "before the crash"
    assert child.ask("write AFTER") == "5"
    assert child.ask("fsync") == "synced"
    assert child.ask("fstat") == str(len(b"before the crash"))
    assert child.ask("list") == "dovecot.index"
    child.close()
    index_mount.stop()
    assert not is_mounted(index_mount.mountpoint), "the adopted mount was left mounted"
    index_mount.start()
    assert (user / "dovecot.index").read_bytes() == b"AFTERe the crash"
    assert index_mount.problems() == []


def test_an_unlinked_file_held_open_survives_the_takeover(
        index_mount: MailfsMount, children: list[Child]) -> None:
    user, child = held_open(index_mount, children, "bob/dovecot.index", b"the old index")
    (user / "dovecot.index.tmp").write_bytes(b"the new index, rewritten")
    os.rename(user / "dovecot.index.tmp", user / "dovecot.index")
    crash(index_mount)
    restart(index_mount)
    assert child.ask("read") == "the old index", index_mount.log()
    assert child.ask("stat") == str(len(b"the new index, rewritten"))
    assert (user / "dovecot.index").read_bytes() == b"the new index, rewritten"
    child.close()
    index_mount.stop()
    index_mount.start()
    assert sorted(os.listdir(user)) == ["dovecot.index"]
    after = status(index_mount)
    assert after is not None and after["replicated_files"] == 2  # bob/ and his index
    assert index_mount.problems() == []


def test_a_mount_already_cleared_is_mounted_afresh(
        index_mount: MailfsMount, children: list[Child]) -> None:
    """An admin (or a test rig) lazily unmounted the crashed mount: the held connection no
    longer serves the mountpoint, and the next daemon mounts a new one."""
    (index_mount.mountpoint / "carol").mkdir()
    (index_mount.mountpoint / "carol" / "dovecot.index").write_bytes(b"kept")
    crash(index_mount)
    force_unmount(index_mount.mountpoint)
    after = restart(index_mount)
    assert after["connection_adopted"] is False
    assert (index_mount.mountpoint / "carol" / "dovecot.index").read_bytes() == b"kept"


def test_a_lock_file_renamed_over_an_index_file_keeps_its_number(
        index_mount: MailfsMount, children: list[Child]) -> None:
    """Dovecot writes a new dovecot-uidlist (and a new transaction log) into a lock file,
    renames it into place and may write on through the lock's descriptor. The adopting
    daemon must find that file by the lock's number, and never give the number to
    another file: with a reused number the kernel showed two mailboxes' logs as one."""
    user = index_mount.mountpoint / "dave"
    user.mkdir()
    child = Child(user / "dovecot-uidlist.lock")
    children.append(child)
    assert child.ask("write 3 V1 N1") == "7"
    os.rename(user / "dovecot-uidlist.lock", user / "dovecot-uidlist")
    crash(index_mount)
    restart(index_mount)
    assert child.ask("write 3 V2 N2") == "7", index_mount.log()
    for name in ("a.lock", "b.lock", "c.lock"):  # new lock files: new numbers
        (user / name).write_bytes(name.encode())
    assert (user / "dovecot-uidlist").read_bytes() == b"3 V2 N2"
    assert child.ask("read") == "3 V2 N2"
    assert {name: (user / name).read_bytes() for name in ("a.lock", "b.lock", "c.lock")} == {
        "a.lock": b"a.lock", "b.lock": b"b.lock", "c.lock": b"c.lock"}
    numbers = {(user / name).stat().st_ino for name in os.listdir(user)}
    assert len(numbers) == 4, "two files of the mount share an inode number"
    child.close()
    index_mount.stop()
    index_mount.start()
    assert (user / "dovecot-uidlist").read_bytes() == b"3 V2 N2"


def test_a_lock_file_held_at_the_crash_is_there_for_its_holder(
        index_mount: MailfsMount, children: list[Child]) -> None:
    """Dovecot holds dovecot-uidlist.lock while it writes the new uidlist into it, then
    renames it into place. Lock files live in the daemon's RAM; had the lock died with the
    daemon, Dovecot's ftruncate and rename would fail with ENOENT after the takeover (a
    Dovecot error line in the daemon-crash test, one run in a few dozen)."""
    user = index_mount.mountpoint / "frank"
    user.mkdir()
    (user / "dovecot-uidlist").write_bytes(b"3 V1 N1\n1 a\n")
    child = Child(user / "dovecot-uidlist.lock")
    children.append(child)
    assert child.ask("write 3 V1 N2 with a longer line") == "26"
    crash(index_mount)
    after = restart(index_mount)
    assert after["adopted_locks"] == 1, index_mount.log()
    assert child.ask("read") == "3 V1 N2 with a longer line", index_mount.log()
    assert child.ask("truncate 7") == "truncated"
    assert child.ask("fstat") == "7"
    assert (user / "dovecot-uidlist.lock").read_bytes() == b"3 V1 N2"
    os.rename(user / "dovecot-uidlist.lock", user / "dovecot-uidlist")
    assert child.ask("write 3 V1 N3") == "7"
    assert (user / "dovecot-uidlist").read_bytes() == b"3 V1 N3"
    child.close()
    index_mount.stop()
    index_mount.start()
    assert sorted(os.listdir(user)) == ["dovecot-uidlist"]
    assert (user / "dovecot-uidlist").read_bytes() == b"3 V1 N3"
    assert index_mount.problems() == []


def test_locks_of_a_clean_stop_do_not_come_back(
        index_mount: MailfsMount, children: list[Child]) -> None:
    """Locks die with a clean stop: no process can hold one across it."""
    user = index_mount.mountpoint / "gina"
    user.mkdir()
    (user / "dovecot.index.log.lock").write_bytes(b"held")
    index_mount.stop()
    index_mount.start()
    assert os.listdir(user) == []
    crash(index_mount)
    after = restart(index_mount)
    assert after["adopted_locks"] == 0
    assert os.listdir(user) == []


@pytest.mark.parametrize("index_mount", ["default timeouts"], indirect=True)
def test_what_the_kernel_holds_is_found_by_number(
        index_mount: MailfsMount, children: list[Child]) -> None:
    """With the default timeouts the kernel asks no lookup again: it reads, lists and stats
    through the numbers the crashed daemon gave it, which the new one never handed out."""
    folder, child = held_open(index_mount, children, "erin/index/.Sent/dovecot.index.log",
                              b"log records")
    crash(index_mount)
    restart(index_mount)
    assert child.ask("read") == "log records", index_mount.log()
    assert child.ask("list") == "dovecot.index.log"
    assert child.ask("stat") == str(len(b"log records"))
    after = status(index_mount)
    assert after is not None and int(str(after["adopted_nodes"])) >= 2  # the file, .Sent
    (folder / "dovecot.index").write_bytes(b"new")
    assert sorted(os.listdir(folder)) == ["dovecot.index", "dovecot.index.log"]
    assert index_mount.problems() == []
