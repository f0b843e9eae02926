"""Which set-user-ID and set-group-ID bits a truncate by an unprivileged caller clears.

Linux clears them when a process without CAP_FSETID truncates or writes a regular file
(`setattr_should_drop_suidgid`): set-user-ID always, set-group-ID if the file is group
executable or the caller is not in the file's group. For writes and truncate(2) the kernel
sends a FUSE filesystem that mode change itself. For open(O_TRUNC) it does not: with atomic
O_TRUNC the truncation happens in the filesystem's open, and the kernel drops the setattr
that would carry the mode. The daemon's own calls on the store run as root, which keeps
the bits, so mailfs applies the rule itself. Root stands in for CAP_FSETID: FUSE tells a
filesystem the caller's ids, not its capabilities.
"""

from __future__ import annotations

import stat
from collections.abc import Callable


def set_id_bits_to_drop(mode: int, uid: int, in_group: Callable[[int], bool],
                        file_gid: int) -> int:
    """The bits of `mode` that a truncate by `uid` clears; `in_group(gid)` is asked only
    when the answer depends on it."""
    if uid == 0 or not stat.S_ISREG(mode):
        return 0
    drop = mode & stat.S_ISUID
    if mode & stat.S_ISGID and (mode & stat.S_IXGRP or not in_group(file_gid)):
        drop |= stat.S_ISGID
    return drop


def process_groups(pid: int) -> set[int]:
    """The filesystem group and supplementary groups of a process, from /proc; empty if it
    is gone (then it is in no group, and the stricter rule applies)."""
    groups: set[int] = set()
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Gid:"):
                    fields = line.split()
                    if len(fields) > 4:
                        groups.add(int(fields[4]))  # real, effective, saved, filesystem
                elif line.startswith("Groups:"):
                    groups.update(int(gid) for gid in line.split()[1:])
    except (OSError, ValueError):
        return set()
    return groups
