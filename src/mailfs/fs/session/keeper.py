"""Keeps a mount's FUSE connection open for a bounded time after its daemon dies.

Why: the kernel ends a FUSE connection when the last descriptor of /dev/fuse closes. If
that is the crashed daemon's, every process on the mount gets ENOTCONN at once, while
the shared mail store still works. Dovecot then runs on with half its files failing: it
saves mail without index records, falls back to in-memory indexes and recreates logs
(soak run: "indexid changed", "already exists, rebuilding index" on every kill). A
machine crash stops both at once and Dovecot recovers from that cleanly.

How: the daemon starts this process right after mounting and hands it the /dev/fuse
descriptor. While the daemon lives, the keeper only waits for it. If the daemon dies
without saying "unmounted", the keeper holds the connection: requests on the mount wait
(no one reads them) instead of failing. The hold ends:
- once no process uses the mount any more (its files open or mapped, its directories as
  cwd or root), or every one left is already being killed: the supervisor stopped
  Dovecot;
- when a restarted daemon of an index-only mount takes the connection over (SIGUSR2,
  mailfs/adoption.py): the keeper exits at once, and the processes carry on;
- when told to (SIGUSR1 from `mailfs umount` of the dead mount, which systemd's ExecStop
  runs after the crash), or after `hold` seconds at the latest (never freeze). With
  `fence`, the processes still using the mount are then killed, as a machine crash would:
  each holds index state the next mount does not know, and nothing it would do after an
  error reaches the indexes. Without, they get ENOTCONN.
Then the keeper exits and its descriptor, the connection's last, closes.

A new mount of the same state directory that does not adopt the connection waits for a
keeper that still holds (`wait_for_previous`), so the new daemon never serves beside
processes of the old one.

This file runs as its own process (`python -I keeper.py`), so it imports only the
standard library; `mailfs.fs.session.keeper` is the daemon's side of it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

UNMOUNTED = b"unmounted\n"
PIDFILE = "keeper.pid"
SIGKILL_BIT = 1 << (signal.SIGKILL - 1)
POLL_SECONDS = 0.2


# -- reading /proc and the FUSE device (pure parsing, no I/O) ------------------------------


@dataclass(frozen=True)
class MountIdentity:
    """One mount's device (what maps, statx and mountinfo show)."""

    major: int
    minor: int

    @property
    def maps_device(self) -> str:
        return f"{self.major:02x}:{self.minor:02x}"


def mountinfo_escaped(path: str) -> str:
    """A path as mountinfo writes it: space, tab, newline and backslash in octal."""
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in path)


def mount_identity(mountinfo: str, mountpoint: str) -> MountIdentity | None:
    """The last mount at `mountpoint` in a /proc/self/mountinfo text (the newest one)."""
    found = None
    target = mountinfo_escaped(mountpoint)
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[4] == target:
            major, _, minor = fields[2].partition(":")
            found = MountIdentity(int(major), int(minor))
    return found


def maps_device(maps: str, device: str) -> bool:
    """Whether any mapping in a /proc/PID/maps text is of a file on `device`."""
    return any(len(fields) > 5 and fields[3] == device
               for fields in (line.split() for line in maps.splitlines()))


PF_EXITING = 0x4


def being_killed(status: str, stat: str = "") -> bool:
    """A process with SIGKILL pending, or one already exiting (/proc/PID/status and
    /proc/PID/stat texts): it runs no more code of its own once its current call returns."""
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("SigPnd", "ShdPnd") and int(value.strip(), 16) & SIGKILL_BIT:
            return True
        if key == "State" and value.split()[:1] in (["Z"], ["X"]):
            return True
    fields = stat.rpartition(")")[2].split()
    return len(fields) > 6 and bool(int(fields[6]) & PF_EXITING)


# fuse_in_header (linux/fuse.h): len, opcode, unique, nodeid, uid, gid, pid, extlen, pad.
FUSE_IN_HEADER = struct.Struct("<IIQQIIIHH")
# Requests without a caller waiting for an answer.
FUSE_FORGET, FUSE_INTERRUPT, FUSE_BATCH_FORGET = 2, 36, 42


def requester(request: bytes) -> int | None:
    """The pid of the process waiting for a FUSE request, if one is."""
    if len(request) < FUSE_IN_HEADER.size:
        return None
    _, opcode, _, _, _, _, pid, _, _ = FUSE_IN_HEADER.unpack_from(request)
    if opcode in (FUSE_FORGET, FUSE_INTERRUPT, FUSE_BATCH_FORGET) or pid <= 0:
        return None
    return int(pid)


# -- the processes using a mount ---------------------------------------------------------


def _read(path: str) -> str:
    with open(path) as handle:
        return handle.read()


class Users:
    """Finds the processes that use one mount, through /proc only: a stat through the held
    mount would wait as long as the hold."""

    def __init__(self, mount: MountIdentity, fuse_fd: int) -> None:
        self.mount = mount
        self.fuse_fd = fuse_fd
        self.waiting: set[int] = set()  # callers of requests read off the connection
        self._buffer = bytearray(REQUEST_BUFFER)

    def connection_alive(self) -> bool:
        """False once the kernel ended the connection (unmounted, aborted): then the
        mount's device number may already name a newer mount, whose users are not ours."""
        poller = select.poll()
        poller.register(self.fuse_fd, select.POLLIN)
        return not any(events & (select.POLLERR | select.POLLHUP)
                       for _, events in poller.poll(0))

    def take_waiting_requests(self) -> None:
        """Reads the requests nobody served, for their callers' pids: a process waiting in
        a path call (open, stat) has no file of the mount to be found by. They are never
        answered; the end of the connection fails them."""
        while True:
            try:
                size = os.readv(self.fuse_fd, [self._buffer])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ENODEV: the connection ended
                return
            pid = requester(bytes(self._buffer[:FUSE_IN_HEADER.size])) if size else None
            if pid is not None and pid != os.getpid():
                self.waiting.add(pid)

    def uses(self, pid: int) -> bool:
        """Whether `pid` has a file of the mount open or mapped, or a directory of it as
        cwd or root. By device, not by mount id: in another mount namespace (systemd's
        PrivateTmp= for Dovecot) or after a lazy unmount the mount has other ids."""
        base = f"/proc/{pid}"
        device = (self.mount.major, self.mount.minor)
        for link in ("cwd", "root"):
            if cached_device(f"{base}/{link}") == device:
                return True
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"{base}/fd"):
                if cached_device(f"{base}/fd/{fd}") == device:
                    return True
        with contextlib.suppress(OSError):
            return maps_device(_read(f"{base}/maps"), self.mount.maps_device)
        return False

    def find(self) -> list[int]:
        """The users that are not already dying."""
        self.take_waiting_requests()
        found = {pid for pid in processes() if self.uses(pid)}
        return still_running(found | self.waiting)


_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
AT_STATX_DONT_SYNC = 0x4000
STATX_SIZE = 256
STATX_DEVICE_OFFSET = 136  # stx_dev_major, stx_dev_minor (linux/stat.h)


def cached_device(path: str) -> tuple[int, int] | None:
    """The device of what `path` (a /proc magic link) points at, from the kernel's cached
    attributes: AT_STATX_DONT_SYNC sends the filesystem no request, so a file of the held
    mount answers too. None if there is nothing there."""
    buffer = ctypes.create_string_buffer(STATX_SIZE)
    if _libc.statx(AT_FDCWD, os.fsencode(path), AT_STATX_DONT_SYNC, 0, buffer) != 0:
        return None
    major, minor = struct.unpack_from("<II", buffer, STATX_DEVICE_OFFSET)
    return int(major), int(minor)


def processes() -> Iterator[int]:
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != me:
            yield int(entry)


def still_running(pids: Iterable[int]) -> list[int]:
    """Those of `pids` that are not already dying."""
    running = []
    for pid in sorted(pids):
        try:
            if not being_killed(_read(f"/proc/{pid}/status"), _read(f"/proc/{pid}/stat")):
                running.append(pid)
        except OSError:
            continue
    return running


def command_of(pid: int) -> str:
    try:
        return _read(f"/proc/{pid}/comm").strip()
    except OSError:
        return "?"


# -- the keeper process ------------------------------------------------------------------

# What /proc/PID/comm says of a keeper: `mailfs umount` finds a holding one by this alone
# (reading other processes' cmdline takes their mm lock, which a fault on the held mount
# can keep).
WATCHING, HOLDING = "mailfs-keeper", "mailfs-holding"
# Large enough for any request (header, write header, max_write): a shorter read fails it.
REQUEST_BUFFER = (4 << 20) + 4096


def set_name(name: str) -> None:
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as comm:
        comm.write(name)


def say(level: str, message: str) -> None:
    now = time.time()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
    with contextlib.suppress(OSError, ValueError):  # a closed stderr must not end the hold
        print(f"{stamp},{int(now % 1 * 1000):03d} {level} mailfs.keeper: {message}",
              file=sys.stderr, flush=True)


def wait_for_daemon(watch_fd: int) -> bool:
    """Until the daemon closes its end of the pipe: whether it said it unmounted."""
    said = b""
    while True:
        try:
            chunk = os.read(watch_fd, 64)
        except InterruptedError:
            continue
        if not chunk:
            return said.startswith(UNMOUNTED)
        said += chunk


class EndRequest:
    """SIGUSR1 ends the hold early (`mailfs umount` of the dead mount)."""

    asked = threading.Event()

    @classmethod
    def handle(cls, _signum: int, _frame: object) -> None:
        cls.asked.set()


class Adopted:
    """SIGUSR2: a restarted daemon has taken the connection (mailfs/adoption.py). The
    keeper exits at once, holding nothing and fencing no one; the daemon waits for that
    before it asks the kernel to resend the requests read here."""

    @staticmethod
    def handle(_signum: int, _frame: object) -> None:
        os._exit(0)


class Scanner(threading.Thread):
    """Looks for the mount's users over and over. On a thread: a /proc read can wait on a
    process's mm lock, held by its fault on the held mount, and the hold must still end
    on time."""

    def __init__(self, users: Users) -> None:
        super().__init__(daemon=True)
        self.users = users
        # The users the last scan found, each with the time it started: the fence must
        # reach these processes, not later ones that got a pid of theirs after they exited.
        # One dict, replaced whole, so that the main thread never sees half a scan.
        self.found: dict[int, str | None] | None = None
        self.connection_ended = False
        self.changed = threading.Event()

    def run(self) -> None:
        while True:
            if not self.users.connection_alive():
                self.connection_ended = True
                self.changed.set()
                return
            self.found = {pid: start_time(pid) for pid in self.users.find()}
            self.changed.set()
            time.sleep(POLL_SECONDS)


def hold(users: Users, mountpoint: str, seconds: float, fence: bool) -> None:
    say("WARNING", f"the mailfs daemon of {mountpoint} died; holding its FUSE connection "
                   f"for up to {seconds:g} s, so that processes on it wait instead of "
                   f"failing until they are stopped")
    deadline = time.monotonic() + seconds
    scanner = Scanner(users)
    scanner.start()
    while not EndRequest.asked.is_set() and time.monotonic() < deadline:
        if not scanner.changed.wait(min(POLL_SECONDS, max(0.0, deadline - time.monotonic()))):
            continue
        scanner.changed.clear()
        if scanner.connection_ended:
            say("WARNING", f"the FUSE connection of {mountpoint} has ended; nothing to hold")
            return
        if scanner.found == {}:
            say("WARNING", f"no process uses {mountpoint} any more; releasing its FUSE "
                           f"connection")
            return
    found = scanner.found or {}
    left = list(found)
    why = "when told to unmount" if EndRequest.asked.is_set() else f"after {seconds:g} s"
    named = ", ".join(f"{pid} ({command_of(pid)})" for pid in left[:20])
    if not left:
        say("WARNING", f"releasing the FUSE connection of {mountpoint} {why}")
    elif fence:
        killed = fence_processes(found)
        say("WARNING", f"{len(left)} processes still used {mountpoint} {why}; killed them "
                       f"({len(left) - len(killed)} had exited meanwhile), as a crash of "
                       f"their machine would (they hold index state the next mount does "
                       f"not know): {named}")
    else:
        say("WARNING", f"{len(left)} processes still use {mountpoint} {why}; releasing its "
                       f"FUSE connection, they get ENOTCONN: {named}")


def fence_processes(started: dict[int, str | None]) -> list[int]:
    """SIGKILL each process through a pidfd, if it is still the one that started at the
    given time: a pid whose process exited after the scan may be another's by now. The
    pidfd is opened before the start time is read, so a pid reused after that check names
    a process the pidfd does not refer to, and the signal fails instead of hitting it."""
    killed = []
    for pid, when in started.items():
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue  # gone already
        try:
            if when is not None and start_time(pid) == when:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                killed.append(pid)
        except OSError:
            pass  # exited meanwhile
        finally:
            os.close(pidfd)
    return killed


def keeper_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fuse-fd", type=int, required=True)
    parser.add_argument("--watch-fd", type=int, required=True)
    parser.add_argument("--mountpoint", required=True)
    parser.add_argument("--hold", type=float, required=True)
    parser.add_argument("--fence", action="store_true")
    args = parser.parse_args(argv)
    set_name(WATCHING)
    # systemd's stop and a terminal's ^C reach the whole group: only the daemon's end of
    # the pipe, the hold's end or SIGKILL end the keeper.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, EndRequest.handle)
    signal.signal(signal.SIGUSR2, Adopted.handle)
    mount = mount_identity(_read("/proc/self/mountinfo"), args.mountpoint)
    if mount is None:
        say("WARNING", f"{args.mountpoint} is not in the mount table; nothing to hold")
        return 0
    if wait_for_daemon(args.watch_fd):
        return 0
    set_name(HOLDING)
    os.set_blocking(args.fuse_fd, False)
    hold(Users(mount, args.fuse_fd), args.mountpoint, args.hold, args.fence)
    # Not a return: the scanner thread may be stuck in a /proc read. Exiting closes the
    # connection's last descriptor, and the kernel ends it.
    os._exit(0)


# -- the daemon's side -------------------------------------------------------------------


def fuse_device_fds() -> set[int]:
    """This process's descriptors of /dev/fuse."""
    found = set()
    for entry in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{entry}") == "/dev/fuse":
                found.add(int(entry))
    return found


def start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat: tells a process from a later one with the same pid."""
    try:
        stat = _read(f"/proc/{pid}/stat")
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


class Keeper:
    """The daemon's handle on its keeper process."""

    def __init__(self, process: subprocess.Popen[bytes], watch_fd: int) -> None:
        self.process = process
        self._watch_fd: int | None = watch_fd

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    def start(cls, fuse_fd: int, mountpoint: Path, state_dir: Path, seconds: float,
              fence: bool) -> Keeper:
        read_end, write_end = os.pipe()
        try:
            command = [sys.executable, "-I", __file__, "--fuse-fd", str(fuse_fd),
                       "--watch-fd", str(read_end), "--mountpoint", str(mountpoint),
                       "--hold", str(seconds)] + (["--fence"] if fence else [])
            # Its own session: a kill of the daemon's process group is a crash the keeper
            # must outlive.
            process = subprocess.Popen(command, pass_fds=(fuse_fd, read_end),
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        # Only for the next mount's wait; a full state disk must not cost the hold itself.
        with contextlib.suppress(OSError):
            (state_dir / PIDFILE).write_text(f"{process.pid} {start_time(process.pid)}\n")
        return cls(process, write_end)

    def unmounted(self) -> None:
        """The daemon unmounted cleanly: the keeper exits without holding anything."""
        if self._watch_fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(self._watch_fd, UNMOUNTED)
        os.close(self._watch_fd)
        self._watch_fd = None
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def is_keeper(pid: int, mountpoint: str | None = None, names: Sequence[str] = (WATCHING, HOLDING)
              ) -> bool:
    """Whether `pid` is a keeper process (of `mountpoint`, if given) whose name is one of
    `names`. The name comes first: it takes no lock of the other process."""
    if command_of(pid) not in names:
        return False
    try:
        command = _read(f"/proc/{pid}/cmdline").split("\0")
    except OSError:
        return False
    if not any(part.endswith("keeper.py") for part in command[:3]):
        return False
    return mountpoint is None or argument(command, "--mountpoint") == mountpoint


def argument(command: Sequence[str], option: str) -> str | None:
    with contextlib.suppress(ValueError, IndexError):
        return command[list(command).index(option) + 1]
    return None


def keeper_argument(pid: int, option: str) -> str | None:
    """The value a keeper was started with for `option`."""
    try:
        return argument(_read(f"/proc/{pid}/cmdline").split("\0"), option)
    except OSError:
        return None


def hold_seconds(pid: int) -> float | None:
    """The --hold a keeper was started with."""
    value = keeper_argument(pid, "--hold")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def end_holds(mountpoint: str) -> list[int]:
    """Ends the hold of every keeper still holding the crashed `mountpoint` now (with its
    fence) and waits for them to let go; returns their pids. A keeper whose daemon lives
    is left alone."""
    ended = []
    for pid in processes():
        if is_keeper(pid, mountpoint, (HOLDING,)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)
                ended.append(pid)
    for pid in ended:
        if not wait_gone(pid, END_WAIT):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return ended


def wait_for_keeper(pid: int, timeout: float) -> None:
    """Until a crashed daemon's keeper has let go, up to `timeout` s; then it is told to end
    its hold (its fence still runs), and only if that does not end it, killed."""
    if wait_gone(pid, timeout):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGUSR1)
    if not wait_gone(pid, END_WAIT):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_gone(pid, END_WAIT)


def wait_gone(pid: int, timeout: float) -> bool:
    """Until `pid` has exited, up to `timeout` s: whether it has."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError:  # no pidfd_open (before Linux 5.3): look now and then
        started, deadline = start_time(pid), time.monotonic() + timeout
        while (started is not None and start_time(pid) == started
               and time.monotonic() < deadline):
            time.sleep(0.05)
        return started is None or start_time(pid) != started
    try:
        return bool(select.select([pidfd], [], [], timeout)[0])
    finally:
        os.close(pidfd)


# How long a keeper told to end its hold may take (its fence, its last scan).
END_WAIT = 10.0


def previous_keeper(state_dir: Path) -> int | None:
    """The pid of a keeper that an earlier daemon of this state directory left running."""
    try:
        pid_text, _, started = (state_dir / PIDFILE).read_text().partition(" ")
        pid = int(pid_text)
    except (OSError, ValueError):
        return None
    if start_time(pid) != started.strip() or not is_keeper(pid):
        return None
    return pid


if __name__ == "__main__":
    sys.exit(keeper_main())
