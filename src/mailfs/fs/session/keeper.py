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
- when told to (SIGUSR1 from `mailfs umount` of the dead mount, which systemd's ExecStop
  runs after the crash), or after `hold` seconds at the latest (never freeze). With
  `fence`, the processes still using the mount are then killed, as a machine crash would:
  each holds index state the next mount does not know, and nothing it would do after an
  error reaches the indexes. Without, they get ENOTCONN.
Then the keeper exits and its descriptor, the connection's last, closes.

A new mount of the same state directory waits for a keeper that still holds
(`wait_for_previous`), so the new daemon never serves beside processes of the old one.

This file runs as its own process (`python -I keeper.py`), so it imports only the
standard library; `mailfs.fs.session.keeper` is the daemon's side of it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

UNMOUNTED = b"unmounted\n"
PIDFILE = "keeper.pid"
SIGKILL_BIT = 1 << (signal.SIGKILL - 1)
POLL_SECONDS = 0.2


# -- reading /proc (pure parsing, no I/O) ------------------------------------------------


@dataclass(frozen=True)
class MountIdentity:
    """How /proc names one mount: its id (fdinfo's mnt_id) and device (maps' dev)."""

    mount_id: int
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
            found = MountIdentity(int(fields[0]), int(major), int(minor))
    return found


def fdinfo_mount_id(fdinfo: str) -> int | None:
    for line in fdinfo.splitlines():
        if line.startswith("mnt_id:"):
            return int(line.split()[1])
    return None


def maps_device(maps: str, device: str) -> bool:
    """Whether any mapping in a /proc/PID/maps text is of a file on `device`."""
    return any(len(fields) > 5 and fields[3] == device
               for fields in (line.split() for line in maps.splitlines()))


def being_killed(status: str) -> bool:
    """A /proc/PID/status text of a process with SIGKILL pending, or one already exiting:
    it runs no more code of its own once its current call returns."""
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("SigPnd", "ShdPnd") and int(value.strip(), 16) & SIGKILL_BIT:
            return True
        if key == "State" and value.split()[:1] in (["Z"], ["X"]):
            return True
    return False


def under(path: str, mountpoint: str) -> bool:
    return path == mountpoint or path.startswith(mountpoint.rstrip("/") + "/")


# -- the processes using a mount ---------------------------------------------------------


def _read(path: str) -> str:
    with open(path) as handle:
        return handle.read()


def uses_mount(pid: int, mount: MountIdentity, mountpoint: str) -> bool:
    """Whether process `pid` has a file of the mount open or mapped, or a directory of it
    as cwd or root. Reads only /proc: a stat through the held mount would wait forever."""
    base = f"/proc/{pid}"
    with contextlib.suppress(OSError):
        for link in ("cwd", "root"):
            if under(os.readlink(f"{base}/{link}"), mountpoint):
                return True
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"{base}/fdinfo"):
            with contextlib.suppress(OSError, ValueError):
                if fdinfo_mount_id(_read(f"{base}/fdinfo/{fd}")) == mount.mount_id:
                    return True
    with contextlib.suppress(OSError):
        return maps_device(_read(f"{base}/maps"), mount.maps_device)
    return False


def processes() -> Iterator[int]:
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != me:
            yield int(entry)


def users(mount: MountIdentity, mountpoint: str) -> list[int]:
    return [pid for pid in processes() if uses_mount(pid, mount, mountpoint)]


def still_running(pids: Iterable[int]) -> list[int]:
    """Those of `pids` that are not already dying."""
    running = []
    for pid in pids:
        try:
            if not being_killed(_read(f"/proc/{pid}/status")):
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


def say(level: str, message: str) -> None:
    now = time.time()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
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

    asked = False

    @classmethod
    def handle(cls, _signum: int, _frame: object) -> None:
        cls.asked = True


def hold(mount: MountIdentity, mountpoint: str, seconds: float, fence: bool) -> None:
    say("WARNING", f"the mailfs daemon of {mountpoint} died; holding its FUSE connection "
                   f"for up to {seconds:g} s, so that processes on it wait instead of "
                   f"failing until they are stopped")
    began = time.monotonic()
    while True:
        left = still_running(users(mount, mountpoint))
        if not left:
            say("WARNING", f"no process uses {mountpoint} any more; releasing its FUSE "
                           f"connection")
            return
        if EndRequest.asked or time.monotonic() - began >= seconds:
            break
        time.sleep(POLL_SECONDS)
    why = "when told to unmount" if EndRequest.asked else f"after {seconds:g} s"
    named = ", ".join(f"{pid} ({command_of(pid)})" for pid in left[:20])
    if fence:
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        say("WARNING", f"{len(left)} processes still used {mountpoint} {why}; killed them, "
                       f"as a crash of their machine would (they hold index state the next "
                       f"mount does not know): {named}")
    else:
        say("WARNING", f"{len(left)} processes still use {mountpoint} {why}; releasing its "
                       f"FUSE connection, they get ENOTCONN: {named}")


def keeper_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fuse-fd", type=int, required=True)
    parser.add_argument("--watch-fd", type=int, required=True)
    parser.add_argument("--mountpoint", required=True)
    parser.add_argument("--hold", type=float, required=True)
    parser.add_argument("--fence", action="store_true")
    args = parser.parse_args(argv)
    # systemd's stop and a terminal's ^C reach the whole group: only the daemon's end of
    # the pipe, the hold's end or SIGKILL end the keeper.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, EndRequest.handle)
    mount = mount_identity(_read("/proc/self/mountinfo"), args.mountpoint)
    if mount is None:
        say("WARNING", f"{args.mountpoint} is not in the mount table; nothing to hold")
        return 0
    if wait_for_daemon(args.watch_fd):
        return 0
    hold(mount, args.mountpoint, args.hold, args.fence)
    os.close(args.fuse_fd)
    return 0


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


def is_keeper(pid: int, mountpoint: str | None = None) -> bool:
    """Whether `pid` is a keeper process (of `mountpoint`, if given)."""
    try:
        command = _read(f"/proc/{pid}/cmdline").split("\0")
    except OSError:
        return False
    if not any(part.endswith("keeper.py") for part in command[:3]):
        return False
    if mountpoint is None:
        return True
    with contextlib.suppress(ValueError, IndexError):
        return command[command.index("--mountpoint") + 1] == mountpoint
    return False


def end_holds(mountpoint: str, timeout: float = 10.0) -> list[int]:
    """Ends the hold of every keeper of `mountpoint` now (with its fence) and waits for
    them to let go; returns their pids."""
    ended = []
    for pid in processes():
        if is_keeper(pid, mountpoint):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)
                ended.append(pid)
    for pid in ended:
        wait_gone(pid, timeout)
    return ended


def wait_gone(pid: int, timeout: float) -> None:
    """Until `pid` exits, up to `timeout` s; then SIGKILL it."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if not select.select([pidfd], [], [], timeout)[0]:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    finally:
        os.close(pidfd)


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
