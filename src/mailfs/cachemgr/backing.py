"""Backing-store I/O on worker threads, behind a capacity limiter and a timeout.

A stalled NFS server must never block the trio loop: every call that touches the backing
path goes through `Backing.run`, so index-file requests keep being served meanwhile.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import trio

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class BackingStats:
    calls: int = 0
    errors: int = 0
    timeouts: int = 0
    last_timeout: float = 0.0
    busy_seconds: float = 0.0


class Backing:
    def __init__(self, root: Path, threads: int, timeout: float) -> None:
        self.root = os.fsencode(os.path.realpath(root))
        self.limiter = trio.CapacityLimiter(threads)
        self.timeout = timeout
        self.stats = BackingStats()

    def path(self, relative: bytes) -> bytes:
        return self.root + b"/" + relative if relative else self.root

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        self.stats.calls += 1
        started = time.monotonic()
        with trio.move_on_after(self.timeout):
            try:
                return await trio.to_thread.run_sync(
                    fn, *args, limiter=self.limiter, abandon_on_cancel=True
                )
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY):
                    self.stats.errors += 1
                raise
            finally:
                self.stats.busy_seconds += time.monotonic() - started
        self.stats.timeouts += 1
        self.stats.last_timeout = time.time()
        log.error("backing store call %s timed out after %.0fs", fn.__name__, self.timeout)
        raise OSError(errno.EIO, "backing store timed out")

    def healthy(self) -> bool:
        return time.time() - self.stats.last_timeout > 60 and os.path.isdir(self.root)
