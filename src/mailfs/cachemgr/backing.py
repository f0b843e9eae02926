"""Backing-store I/O on worker threads, with a bounded pool and a timeout.

A stalled NFS server must never block the trio loop: every call that touches the backing
path goes through `Backing.run`, so index-file requests keep being served meanwhile.

Why not trio.to_thread.run_sync: it costs a cancel scope, a limiter acquisition, a context
copy and two thread renames per call, and a maildir IMAP operation makes a dozen backing
calls; profiling showed that overhead above the cost of the syscalls themselves. Here a
fixed pool takes jobs from one queue and hands results back with run_sync_soon, and one
watchdog task fails calls that exceed the timeout, so the common path has no per-call
scope or deadline bookkeeping.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import outcome
import trio

log = logging.getLogger(__name__)

T = TypeVar("T")
WATCHDOG_PERIOD = 0.5


@dataclass
class BackingStats:
    calls: int = 0
    errors: int = 0
    timeouts: int = 0
    last_timeout: float = 0.0
    in_flight: int = 0
    by_call: Counter[str] = field(default_factory=Counter)


class _Job:
    __slots__ = ("abandoned", "args", "fn", "started", "task")

    def __init__(self, fn: Callable[..., Any], args: tuple[object, ...],
                 task: trio.lowlevel.Task | None) -> None:
        self.fn = fn
        self.args = args
        self.task = task
        self.started = time.monotonic()
        self.abandoned = False


class Backing:
    def __init__(self, root: Path, threads: int, timeout: float) -> None:
        self.root = os.fsencode(os.path.realpath(root))
        self.threads = threads
        self.timeout = timeout
        self.stats = BackingStats()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._in_flight: set[_Job] = set()
        self._workers: list[threading.Thread] = []
        self._token: trio.lowlevel.TrioToken | None = None

    def path(self, relative: bytes) -> bytes:
        return self.root + b"/" + relative if relative else self.root

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Start the pool and watch for calls that hang; runs for the life of the mount."""
        self._token = trio.lowlevel.current_trio_token()
        for number in range(self.threads):
            worker = threading.Thread(target=self._work, name=f"mailfs-backing-{number}",
                                      daemon=True)
            worker.start()
            self._workers.append(worker)
        task_status.started()
        try:
            while True:
                await trio.sleep(WATCHDOG_PERIOD)
                self._expire(time.monotonic() - self.timeout)
        finally:
            for _ in self._workers:
                self._jobs.put(None)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            result = outcome.capture(job.fn, *job.args)
            token = self._token
            assert token is not None
            try:
                token.run_sync_soon(self._deliver, job, result)
            except trio.RunFinishedError:
                return

    def _deliver(self, job: _Job, result: outcome.Outcome[Any]) -> None:
        self._in_flight.discard(job)
        if job.task is None:
            if isinstance(result, outcome.Error):
                self.stats.errors += 1
                log.warning("backing store call %s failed: %s", job.fn.__name__, result.error)
        elif not job.abandoned:
            trio.lowlevel.reschedule(job.task, result)

    def _expire(self, cutoff: float) -> None:
        for job in [j for j in self._in_flight if j.started < cutoff]:
            self._in_flight.discard(job)
            job.abandoned = True
            self.stats.timeouts += 1
            self.stats.last_timeout = time.time()
            log.error("backing store call %s did not return within %.0fs; failing it with "
                      "EIO (the thread stays blocked until the backing store answers)",
                      job.fn.__name__, self.timeout)
            if job.task is not None:
                trio.lowlevel.reschedule(
                    job.task, outcome.Error(OSError(errno.EIO, "backing store timed out")))

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        self.stats.calls += 1
        self.stats.by_call[fn.__name__] += 1
        job = _Job(fn, args, trio.lowlevel.current_task())
        self._in_flight.add(job)
        self._jobs.put(job)

        def abort(_raise_cancel: object) -> trio.lowlevel.Abort:
            job.abandoned = True
            self._in_flight.discard(job)
            return trio.lowlevel.Abort.SUCCEEDED

        try:
            result: T = await trio.lowlevel.wait_task_rescheduled(abort)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY):
                self.stats.errors += 1
            raise
        return result

    def submit(self, fn: Callable[..., object], *args: object) -> None:
        """Run a call whose result nobody waits for (closing a file at release)."""
        self.stats.calls += 1
        self.stats.by_call[fn.__name__] += 1
        job = _Job(fn, args, None)
        self._in_flight.add(job)
        self._jobs.put(job)

    def healthy(self) -> bool:
        return time.time() - self.stats.last_timeout > 60 and os.path.isdir(self.root)

    def stalled_calls(self) -> int:
        cutoff = time.monotonic() - min(self.timeout, 5.0)
        return sum(1 for job in self._in_flight if job.started < cutoff)
