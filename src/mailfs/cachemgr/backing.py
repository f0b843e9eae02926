"""Backing-store I/O on worker threads, with a bounded pool and a timeout.

A stalled NFS server must never block the trio loop: every call that touches the backing
path goes through `Backing.run`, so index-file requests keep being served meanwhile.

Why not trio.to_thread.run_sync: it costs a cancel scope, a limiter acquisition, a context
copy and two thread renames per call, and a maildir IMAP operation makes a dozen backing
calls; measured, a hop cost several times the syscall it carried. Here a fixed pool takes
jobs from one queue, and one watchdog task fails calls that exceed the timeout.

Fast path: a local or healthy backing store answers most calls in microseconds, and
suspending the trio task, waking the loop through its wakeup socket and rescheduling costs
far more than that. So the trio thread first waits up to SYNC_WAIT for the worker (the GIL
is released meanwhile) and takes the result directly. Only a call that is still running
then is handed back through run_sync_soon. The trio thread is thus held for at most
SYNC_WAIT per call, and not at all for a kind of call (lstat, rename, ...) that has been
slow lately: on a network store a rename or a lookup of a missing name is a round trip while
a write or an fstat is answered from the client's cache, and waiting 2 ms for each round
trip would serialize every request behind it. During a stall the fast path stands aside
entirely. Index-file requests never wait behind the backing store for longer than that.

Inline calls: even the fast path costs a queue, a lock and two GIL handovers, measured at
about 100 µs per call, which is most of a passthrough request over a local disk. A backing
store on a local filesystem (`inline_calls`) cannot stall the way a network server can, so
there the trio thread makes the system call itself. Calls that wait for the disk (fsync)
and the root probe still go to the pool.
"""

from __future__ import annotations

import contextvars
import errno
import logging
import os
import queue
import re
import stat
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import outcome
import trio

log = logging.getLogger(__name__)

T = TypeVar("T")
WATCHDOG_PERIOD = 0.5
SYNC_WAIT = 0.002
# Calls slower than this on average make the fast path stand aside.
SLOW_CALL = SYNC_WAIT / 2
# A probe of the backing root unanswered for this long means the store is stalled.
STALL_AFTER = 2.0


# FUSE stores that number files as they meet them and renumber those their kernel side
# forgot. GlusterFS, MooseFS and ceph-fuse are FUSE too but keep the store's own numbers.
RENUMBERING_TYPES = frozenset({"fuse.sshfs", "fuse.rclone", "fuse.s3fs", "fuse.curlftpfs"})
_MOUNTINFO_ESCAPE = re.compile(rb"\\([0-7]{3})")


def _unescape(field: bytes) -> bytes:
    return _MOUNTINFO_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field)


def filesystem_type(path: Path | str) -> str:
    """The type of the filesystem `path` is on ("nfs4", "fuse.sshfs", ...): the mount in
    /proc/self/mountinfo with the path's device whose mount point holds it most closely
    (the last one of those, when mounts are stacked). "" if none is found."""
    try:
        real = os.fsencode(os.path.realpath(path))
        device = os.stat(real).st_dev
        with open("/proc/self/mountinfo", "rb") as mountinfo:
            lines = mountinfo.read().splitlines()
    except OSError:
        return ""
    wanted = f"{os.major(device)}:{os.minor(device)}".encode()
    best, found = -1, ""
    for line in lines:
        fields, _, rest = line.partition(b" - ")
        parts, tail = fields.split(), rest.split()
        if len(parts) < 5 or not tail or parts[2] != wanted:
            continue
        point = _unescape(parts[4])
        inside = real == point or real.startswith(point.rstrip(b"/") + b"/")
        if inside and len(point) >= best:
            best, found = len(point), os.fsdecode(tail[0])
    return found


# Filesystems on a local block device or in RAM: a system call on them returns as soon as
# the disk does, never after a network timeout. Anything else (nfs, cifs, ceph, glusterfs,
# every FUSE store, unknown types) is treated as able to stall.
LOCAL_TYPES = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "jfs", "reiserfs",
                         "nilfs2", "bcachefs", "zfs", "tmpfs", "ramfs"})
# Every this many inline calls, the caller first yields to the other trio tasks, so that a
# long run of backing calls (an import, a big scan) never starves index requests.
INLINE_STREAK = 32

# Backing-store calls made by the current trio task (see journal.APPENDED_BY_TASK): a
# request that has called the store may have changed it, and must not simply run again.
CALLS_BY_TASK: contextvars.ContextVar[int] = contextvars.ContextVar("calls_by_task", default=0)


def inline_calls(setting: str, fs_type: str) -> bool:
    """Whether backing calls run on the trio thread itself (see the module docstring)."""
    if setting != "auto":
        return setting == "inline"
    return fs_type in LOCAL_TYPES


def stable_inodes(setting: str, fs_type: str) -> bool:
    """Whether the backing store keeps inode numbers for a file's life."""
    if setting != "auto":
        return setting == "stable"
    return fs_type not in RENUMBERING_TYPES


@dataclass
class BackingStats:
    calls: int = 0
    inline_calls: int = 0
    errors: int = 0
    timeouts: int = 0
    last_timeout: float = 0.0
    in_flight: int = 0
    by_call: Counter[str] = field(default_factory=Counter)
    # Wall time spent per call type: on a network store, where the round trips go.
    seconds_by_call: defaultdict[str, float] = field(
        default_factory=lambda: defaultdict(float))

    def mean_ms_by_call(self) -> dict[str, float]:
        return {name: round(1000 * self.seconds_by_call[name] / count, 3)
                for name, count in self.by_call.most_common() if count}


class BackingFd:
    """A backing file descriptor that is closed only once no worker call is using it.

    Requests that share one file (getattr picks any open handle of the node) race with
    release: if release closed the descriptor between another request choosing its number
    and the worker making the syscall, the next open() could reuse that number, and the
    fstat, pread or pwrite would act on an unrelated file. Wrong sizes then make the
    kernel cut its page cache under Dovecot's mmap (SIGBUS, short reads), and a pwrite
    would corrupt another message. So every call on the descriptor runs through `call`,
    on the worker, and the number is released to the kernel only after the last one.
    """

    __slots__ = ("_closing", "_lock", "_users", "number")

    def __init__(self, number: int) -> None:
        self.number = number
        self._lock = threading.Lock()
        self._users = 0
        self._closing = False

    @property
    def closing(self) -> bool:
        return self._closing

    def call(self, fn: Callable[..., T], *args: object) -> T:
        """fn(number, *args), or EBADF once close() has been asked for."""
        with self._lock:
            if self._closing:
                raise OSError(errno.EBADF, "backing file already closed")
            self._users += 1
        try:
            return fn(self.number, *args)
        finally:
            with self._lock:
                self._users -= 1
                last = self._closing and self._users == 0
            if last:
                os.close(self.number)

    def close(self) -> None:
        """Close now, or when the last call using the descriptor returns."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            last = self._users == 0
        if last:
            os.close(self.number)


class _Job:
    __slots__ = ("abandoned", "args", "cleanup", "done", "fn", "name", "rated", "result",
                 "started", "task", "waiting")

    def __init__(self, fn: Callable[..., Any], args: tuple[object, ...],
                 task: trio.lowlevel.Task | None,
                 cleanup: Callable[[Any], object] | None = None, name: str = "") -> None:
        self.fn = fn
        self.name = name or fn.__name__  # the syscall, also when it runs through a BackingFd
        self.args = args
        self.task = task
        # Undoes a result that arrives after its caller was failed (closes an opened fd).
        self.cleanup = cleanup
        self.started = time.monotonic()
        self.abandoned = False
        # While `waiting` is True the trio thread blocks on `done` for the result; None
        # marks a call that never took the fast path.
        self.waiting: bool | None = None
        # Whether its time counts for the fast path of its kind (fsyncs are slow by nature).
        self.rated = True
        self.done: Any = None
        self.result: outcome.Outcome[Any] | None = None


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
        # Decides between the two ways of handing a result back (see the module docstring).
        self._handoff = threading.Lock()
        # Recent time per kind of call (exponential average), for the fast path.
        self._recent: dict[str, float] = {}
        self._probe_job: _Job | None = None
        self.root_ok = True
        # The backing root as mounted: an NFS mount that went away leaves an empty
        # directory with another identity, and serving indexes without mail is wrong.
        try:
            root_stat = os.stat(self.root)
            self.root_identity: tuple[int, int] | None = (root_stat.st_dev, root_stat.st_ino)
        except OSError:
            self.root_identity = None
        self._root_swap_logged = False
        self._relative = False
        self.inline = False
        self._inline_streak = 0

    def enter_root(self) -> None:
        """Make the backing root the daemon's working directory, and every backing path
        relative to it from now on.

        A path the kernel hands us can be up to PATH_MAX (4095 bytes) long; prefixed with
        the backing root, it would be longer than any system call takes. Relative to the
        working directory (the AT_FDCWD of every *at call), the prefix costs nothing. The
        working directory also pins the directory mailfs mounted over: if the backing
        filesystem goes away, calls keep reaching it (or fail) instead of landing in an
        empty directory left at the same path, which the root probe reports.
        """
        os.chdir(self.root)
        self._relative = True

    def path(self, relative: bytes) -> bytes:
        if self._relative:
            return relative or b"."
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
                self._probe()
        finally:
            for _ in self._workers:
                self._jobs.put(None)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            result = outcome.capture(job.fn, *job.args)
            with self._handoff:
                job.result = result
                waiting = job.waiting
                abandoned = job.abandoned
            if abandoned:
                self._undo(job, result)
                continue
            if waiting is True:
                job.done.release()
                continue
            token = self._token
            assert token is not None
            try:
                token.run_sync_soon(self._deliver, job, result)
            except trio.RunFinishedError:
                return

    @staticmethod
    def _undo(job: _Job, result: outcome.Outcome[Any]) -> None:
        if job.cleanup is None or not isinstance(result, outcome.Value):
            return
        try:
            job.cleanup(result.value)
        except OSError as exc:
            log.warning("cleaning up after the late %s failed: %s", job.name, exc)

    def _deliver(self, job: _Job, result: outcome.Outcome[Any]) -> None:
        self._in_flight.discard(job)
        if job.abandoned:
            # Only when the watchdog or a cancel got there first; runs on the trio thread,
            # so cleanups must not touch the backing store (closing an fd is fine).
            self._undo(job, result)
            return
        elapsed = time.monotonic() - job.started
        self.stats.seconds_by_call[job.name] += elapsed
        if job.rated:
            self._note_time(job.name, elapsed)
        if not job.abandoned and job.task is not None:
            trio.lowlevel.reschedule(job.task, result)

    def _expire(self, cutoff: float) -> None:
        for job in [j for j in self._in_flight if j.started < cutoff]:
            self._in_flight.discard(job)
            with self._handoff:
                job.abandoned = True
            self.stats.timeouts += 1
            self.stats.last_timeout = time.time()
            log.error("backing store call %s did not return within %.0fs; failing it with "
                      "EIO (the thread stays blocked until the backing store answers)",
                      job.name, self.timeout)
            if job.task is not None:
                trio.lowlevel.reschedule(
                    job.task, outcome.Error(OSError(errno.EIO, "backing store timed out")))

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run fn(*args) on a worker; quick calls come back without leaving the task."""
        if self.inline:
            return await self._run_inline(fn, args, "")
        return await self._run(fn, args, self.quick_path(fn.__name__))

    async def run_waiting(self, fn: Callable[..., T], *args: object) -> T:
        """For calls that wait for the disk (fsync): the loop keeps serving meanwhile."""
        return await self._run(fn, args, False, rated=False)

    async def run_undoable(self, cleanup: Callable[[T], object], fn: Callable[..., T],
                           *args: object) -> T:
        """Like run; if the caller has been failed by then, cleanup(result) runs instead."""
        if self.inline:
            return await self._run_inline(fn, args, "")
        return await self._run(fn, args, self.quick_path(fn.__name__), cleanup)

    async def run_on(self, fd: BackingFd, fn: Callable[..., T], *args: object,
                     waiting: bool = False) -> T:
        """fn(fd number, *args) on a worker; the number cannot be reused meanwhile."""
        if self.inline and not waiting:
            return await self._run_inline(fd.call, (fn, *args), fn.__name__)
        quick = not waiting and self.quick_path(fn.__name__)
        return await self._run(fd.call, (fn, *args), quick, name=fn.__name__,
                               rated=not waiting)

    async def _run(self, fn: Callable[..., T], args: tuple[object, ...], quick: bool,
                   cleanup: Callable[[T], object] | None = None, name: str = "",
                   rated: bool = True) -> T:
        job = _Job(fn, args, trio.lowlevel.current_task(), cleanup, name)
        job.rated = rated
        self.stats.calls += 1
        CALLS_BY_TASK.set(CALLS_BY_TASK.get() + 1)
        self.stats.by_call[job.name] += 1
        if quick:
            answer = self._wait_briefly(job)
            if answer is not None:
                await trio.lowlevel.checkpoint_if_cancelled()
                return self._unwrap(answer)  # type: ignore[no-any-return]
        else:
            self._in_flight.add(job)
            self._jobs.put(job)

        def abort(_raise_cancel: object) -> trio.lowlevel.Abort:
            with self._handoff:
                job.abandoned = True
            self._in_flight.discard(job)
            return trio.lowlevel.Abort.SUCCEEDED

        try:
            result: T = await trio.lowlevel.wait_task_rescheduled(abort)
        except OSError as exc:
            self._count_error(exc)
            raise
        return result

    async def _run_inline(self, fn: Callable[..., T], args: tuple[object, ...],
                          name: str) -> T:
        # Yield before the call, never after it: a cancel arriving after an open would
        # lose the descriptor it returned.
        self._inline_streak += 1
        if self._inline_streak >= INLINE_STREAK:
            self._inline_streak = 0
            await trio.lowlevel.checkpoint()
        name = name or fn.__name__
        self.stats.calls += 1
        CALLS_BY_TASK.set(CALLS_BY_TASK.get() + 1)
        self.stats.inline_calls += 1
        self.stats.by_call[name] += 1
        started = time.monotonic()
        result = outcome.capture(fn, *args)
        self.stats.seconds_by_call[name] += time.monotonic() - started
        return self._unwrap(result)  # type: ignore[no-any-return]

    def _wait_briefly(self, job: _Job) -> outcome.Outcome[Any] | None:
        """Queue the job and block up to SYNC_WAIT for it; None if it is still running."""
        job.waiting = True
        job.done = threading.Lock()
        job.done.acquire()
        self._jobs.put(job)
        finished = job.done.acquire(timeout=SYNC_WAIT)
        if not finished:
            with self._handoff:
                finished = job.result is not None
                job.waiting = finished
            if not finished:
                self._in_flight.add(job)
                self._recent[job.name] = SYNC_WAIT
                return None
        elapsed = time.monotonic() - job.started
        self.stats.seconds_by_call[job.name] += elapsed
        self._note_time(job.name, elapsed)
        return job.result

    def quick_path(self, name: str) -> bool:
        """Whether a call of this kind waits briefly on the trio thread (module docstring)."""
        return self._recent.get(name, 0.0) < SLOW_CALL and not self.stalled()

    def _note_time(self, name: str, elapsed: float) -> None:
        self._recent[name] = 0.9 * self._recent.get(name, 0.0) + 0.1 * elapsed

    def _unwrap(self, result: outcome.Outcome[Any]) -> Any:
        try:
            return result.unwrap()
        except OSError as exc:
            self._count_error(exc)
            raise

    def _count_error(self, exc: OSError) -> None:
        if exc.errno not in (errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY):
            self.stats.errors += 1

    def _probe(self) -> None:
        """Keep one stat of the backing root in flight: an unanswered one means a stall.

        Health is judged from this, never by touching the backing store on the trio thread
        (status would hang with the store, and with it the whole mount).
        """
        if self._probe_job is not None and self._probe_job.result is None:
            return
        if self._probe_job is not None:
            result = self._probe_job.result
            self.root_ok = isinstance(result, outcome.Value) and stat.S_ISDIR(
                result.value.st_mode)
            if self.root_ok and isinstance(result, outcome.Value):
                identity = (result.value.st_dev, result.value.st_ino)
                if self.root_identity is not None and identity != self.root_identity:
                    self.root_ok = False
                    if not self._root_swap_logged:
                        self._root_swap_logged = True
                        log.error("the backing path %s is no longer the directory mailfs "
                                  "mounted over (was its filesystem unmounted?)",
                                  os.fsdecode(self.root))
        self._probe_job = _Job(os.stat, (self.root,), None)
        self._probe_job.waiting = True  # the worker stores the result; nobody is woken
        self._probe_job.done = threading.Lock()
        self._probe_job.done.acquire()
        self._jobs.put(self._probe_job)

    def stalled(self) -> bool:
        """The backing store has not answered for a while (judged without touching it)."""
        probe = self._probe_job
        if probe is not None and probe.result is None and (
                time.monotonic() - probe.started > STALL_AFTER):
            return True
        return time.time() - self.stats.last_timeout < STALL_AFTER

    def healthy(self) -> bool:
        return (self.root_ok and not self.stalled()
                and time.time() - self.stats.last_timeout > 60)

    def stalled_calls(self) -> int:
        cutoff = time.monotonic() - min(self.timeout, 5.0)
        return sum(1 for job in self._in_flight if job.started < cutoff)
