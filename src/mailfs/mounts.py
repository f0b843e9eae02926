"""What the kernel's mount table says about a mountpoint, for admin commands."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
from pathlib import Path

from mailfs.fs.session.keeper import mountinfo_escaped

log = logging.getLogger(__name__)


def mount_type(mountpoint: Path) -> str | None:
    """The filesystem type mounted exactly at mountpoint ("fuse.mailfs", ...), or None."""
    target = mountinfo_escaped(os.path.abspath(mountpoint))
    try:
        with open("/proc/self/mountinfo") as table:
            for line in table:
                fields = line.split()
                if fields[4] == target:
                    return fields[fields.index("-") + 1]
    except OSError:
        return None
    return None


def real_mountpoint(path: Path | str) -> str:
    """os.path.realpath of a mountpoint, without asking the filesystem mounted there.

    Resolving the last component would ask that filesystem for its root's attributes; a
    crashed mailfs whose connection is held (crash_hold) would make that wait. A mount's
    target in the mount table is already resolved."""
    parent, name = os.path.split(os.path.abspath(path))
    candidate = os.path.join(os.path.realpath(parent), name)
    if mount_type(Path(candidate)) is not None:
        return candidate
    return os.path.realpath(path)


def is_dead_mailfs_mount(mountpoint: Path, control_socket: Path) -> bool:
    """A mailfs mount whose daemon is gone.

    Asking the mount itself can be answered from the kernel's attribute cache, and a live
    daemon on a stalled backing store could make us wait; a live daemon always accepts on
    its control socket, a dead one cannot.
    """
    if mount_type(Path(real_mountpoint(mountpoint))) != "fuse.mailfs":
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(5)
        try:
            probe.connect(str(control_socket))
        except (FileNotFoundError, ConnectionRefusedError):
            return True
        except OSError:
            return False
    return False


def detach(mountpoint: str) -> None:
    """Lazily unmount `mountpoint`, if it is still mounted (an adopted connection's mount,
    which libfuse did not make and so does not unmount)."""
    subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True, check=False)


def clear_dead_mount(mountpoint: Path) -> None:
    subprocess.run(["fusermount3", "-u", "-z", os.path.abspath(mountpoint)],
                   capture_output=True, check=False)
