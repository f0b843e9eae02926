"""A restarted daemon takes over the FUSE connection of the crashed one (index-only mounts).

Why: when a daemon dies, its keeper holds the mount's connection so that the processes on
it wait instead of failing (session/keeper.py). Without adoption the wait can only end by
stopping them, and Dovecot then repairs whatever it was committing, as after a machine
crash. Adopted, the connection is served again by the next daemon: the waiting calls are
answered and Dovecot runs on as if the daemon had paused.

What it takes, and where each part lives:
- the connection itself: a duplicate of the keeper's /dev/fuse descriptor, taken with
  pidfd_getfd (root, same machine); the keeper is then told to exit (SIGUSR2) and is
  waited for, so that it reads no request the new daemon should answer;
- the kernel's INIT, which a connection sends once: the first daemon keeps a copy in
  the connection record below, and the next one replays it into its libfuse session
  (fuse_caps.c);
- the requests the dead daemon (or the keeper, to find who waits) read and never answered:
  FUSE_NOTIFY_RESEND asks the kernel to queue them again;
- numbers the kernel keeps: inode numbers of stored files and directories are derived from
  their fid, file handle numbers carry the inode (fs/nodes.py), so the new daemon finds
  both again (fs/indexonly.py). Lock files are RAM only and die with the daemon.

The record is JSON in the state directory, written once the kernel's INIT has come.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mailfs.fs import session
from mailfs.fs.session import keeper

log = logging.getLogger(__name__)

RECORD = "connection.json"
RECORD_VERSION = 1
SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture
# fuse_in_header, then fuse_init_in's major and minor (linux/fuse.h).
INIT_VERSION = struct.Struct("<40xII")
# FUSE_NOTIFY_RESEND came with protocol 7.40 (Linux 6.9): without it the requests the dead
# daemon had read would never be answered, and their callers would wait for ever.
RESEND_SINCE = (7, 40)


@dataclass(frozen=True)
class ConnectionRecord:
    """What a daemon needs to serve a connection it did not open."""

    mountpoint: str
    # The mount's device ("major:minor"): the connection is adoptable only while this is
    # still the mount at the mountpoint (not lazily unmounted, not mounted over).
    device: str
    init_request: bytes
    # The mountpoint directory underneath, as the index-only root shows it: once mounted,
    # a stat of the mountpoint would ask this very connection.
    root_stat: os.stat_result

    @property
    def protocol(self) -> tuple[int, int]:
        """The FUSE protocol version the kernel offered in its INIT."""
        if len(self.init_request) < INIT_VERSION.size:
            return (0, 0)
        major, minor = INIT_VERSION.unpack_from(self.init_request)
        return int(major), int(minor)

    def encode(self) -> bytes:
        st = self.root_stat
        return json.dumps({
            "version": RECORD_VERSION, "mountpoint": self.mountpoint, "device": self.device,
            "init": self.init_request.hex(),
            "root": [st.st_mode, st.st_uid, st.st_gid, st.st_atime_ns, st.st_mtime_ns,
                     st.st_ctime_ns],
        }).encode()

    @classmethod
    def decode(cls, raw: bytes) -> ConnectionRecord:
        """Raises ValueError (or KeyError, TypeError) for anything but a valid record."""
        data = json.loads(raw)
        if data.get("version") != RECORD_VERSION:
            raise ValueError(f"record version {data.get('version')!r}")
        mode, uid, gid, atime_ns, mtime_ns, ctime_ns = (int(v) for v in data["root"])
        if not stat.S_ISDIR(mode):
            raise ValueError("the root is not a directory")
        return cls(str(data["mountpoint"]), str(data["device"]), bytes.fromhex(data["init"]),
                   stat_of(mode, uid, gid, atime_ns, mtime_ns, ctime_ns))


def stat_of(mode: int, uid: int, gid: int, atime_ns: int, mtime_ns: int,
            ctime_ns: int) -> os.stat_result:
    """An os.stat_result with the fields the index-only root shows."""
    fields: list[Any] = [mode, 0, 0, 2, uid, gid, 0, atime_ns // 10**9,
                            mtime_ns // 10**9, ctime_ns // 10**9,
                            atime_ns / 1e9, mtime_ns / 1e9, ctime_ns / 1e9,
                            atime_ns, mtime_ns, ctime_ns]
    fields += [None] * (os.stat_result.n_fields - len(fields))
    return os.stat_result(fields)


def mounted_device(mountpoint: str) -> str | None:
    """The device of the mount at `mountpoint` now, from the mount table (asking the mount
    itself would wait for the held connection)."""
    with open("/proc/self/mountinfo") as mountinfo:
        found = keeper.mount_identity(mountinfo.read(), mountpoint)
    return f"{found.major}:{found.minor}" if found is not None else None


def save_record(state_dir: Path, record: ConnectionRecord) -> None:
    """Atomically, so that a crash while writing leaves the old record or none."""
    temporary = state_dir / f"{RECORD}.tmp"
    temporary.write_bytes(record.encode())
    os.replace(temporary, state_dir / RECORD)


def load_record(state_dir: Path) -> ConnectionRecord | None:
    try:
        return ConnectionRecord.decode((state_dir / RECORD).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("cannot use the connection record in %s (%s): mounting afresh",
                    state_dir, exc)
        return None


def remove_record(state_dir: Path) -> None:
    with contextlib.suppress(OSError):
        (state_dir / RECORD).unlink()


@dataclass(frozen=True)
class Adopted:
    fuse_fd: int
    record: ConnectionRecord


_libc = ctypes.CDLL(None, use_errno=True)


def duplicate_descriptor(pid: int, fd: int) -> int:
    """Another process's descriptor, duplicated into this one (pidfd_getfd, Linux 5.6)."""
    pidfd = os.pidfd_open(pid)
    try:
        duplicate = int(_libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0))
        if duplicate < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"pidfd_getfd: {os.strerror(code)}")
        return duplicate
    finally:
        os.close(pidfd)


def adopt(state_dir: Path, mountpoint: str) -> Adopted | None:
    """The held connection of this state directory's crashed daemon, if there is one to
    adopt: then its keeper has exited and no one else reads the connection."""
    pid = keeper.previous_keeper(state_dir)
    if pid is None or not keeper.is_keeper(pid, mountpoint, (keeper.HOLDING,)):
        return None
    record = load_record(state_dir)
    if record is None or record.mountpoint != mountpoint:
        return None
    if record.protocol < RESEND_SINCE:
        log.warning("cannot adopt the crashed daemon's connection: the kernel speaks FUSE "
                    "%d.%d, resending requests needs %d.%d", *record.protocol, *RESEND_SINCE)
        return None
    if record.device != mounted_device(mountpoint):
        log.warning("the crashed daemon's mount is no longer at %s: mounting afresh",
                    mountpoint)
        return None
    if not session.can_replay_init():
        log.warning("cannot adopt the crashed daemon's connection: %s", session.status())
        return None
    fd_text = keeper.keeper_argument(pid, "--fuse-fd")
    try:
        fuse_fd = duplicate_descriptor(pid, int(fd_text or ""))
    except (OSError, ValueError) as exc:
        log.warning("cannot take the crashed daemon's connection from its keeper (pid %d): "
                    "%s", pid, exc)
        return None
    # The keeper reads requests while it holds (to find who waits): it must be gone
    # before this daemon asks the kernel to send the unanswered ones again.
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGUSR2)
    if not keeper.wait_gone(pid, keeper.END_WAIT):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        keeper.wait_gone(pid, keeper.END_WAIT)
    log.warning("adopting the FUSE connection of the crashed daemon of %s (its keeper, pid "
                "%d, held it): the processes on the mount carry on", mountpoint, pid)
    return Adopted(fuse_fd, record)


def resume(adopted: Adopted) -> None:
    """After pyfuse3.init on the adopted descriptor: libfuse gets the connection's INIT,
    and the kernel sends again what nobody answered."""
    session.replay_init(adopted.record.init_request)
    os.write(adopted.fuse_fd, session.NOTIFY_RESEND)
