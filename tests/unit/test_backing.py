"""The backing-store call paths: inline on the trio thread, or on the worker pool."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest
import trio

from mailfs.cachemgr.backing import INLINE_STREAK, Backing, BackingFd


def thread_of_call() -> int:
    return threading.get_ident()


@pytest.mark.parametrize("inline", [True, False])
async def test_calls_return_results_and_errors_either_way(tmp_path: Path, inline: bool
                                                          ) -> None:
    backing = Backing(tmp_path, 2, 5.0)
    backing.inline = inline
    (tmp_path / "a").write_bytes(b"hello")
    async with trio.open_nursery() as nursery:
        await nursery.start(backing.serve)
        st = await backing.run(os.lstat, backing.path(b"a"))
        assert st.st_size == 5
        with pytest.raises(FileNotFoundError):
            await backing.run(os.lstat, backing.path(b"missing"))
        fd = BackingFd(os.open(tmp_path / "a", os.O_RDONLY))
        assert await backing.run_on(fd, os.pread, 5, 0) == b"hello"
        fd.close()
        with pytest.raises(OSError) as closed:
            await backing.run_on(fd, os.pread, 5, 0)
        assert closed.value.errno == errno.EBADF
        ran_on = await backing.run(thread_of_call)
        # fsync-like calls always wait on a worker, inline or not.
        waited_on = await backing.run_waiting(thread_of_call)
        nursery.cancel_scope.cancel()
    assert (ran_on == threading.get_ident()) is inline
    assert waited_on != threading.get_ident()
    assert backing.stats.inline_calls == (5 if inline else 0)
    assert backing.stats.by_call["lstat"] == 2
    assert backing.stats.errors == 1  # the EBADF; ENOENT is an answer, not a failure
    means = backing.stats.mean_ms_by_call()
    assert set(means) == {"lstat", "pread", "thread_of_call"}
    assert all(0 <= mean < 1000 for mean in means.values())


async def test_a_run_of_inline_calls_lets_other_tasks_in(tmp_path: Path) -> None:
    """An import or a long listing makes many backing calls in a row; index requests
    (other tasks) must get the loop in between."""
    backing = Backing(tmp_path, 1, 5.0)
    backing.inline = True
    turns: list[int] = []
    calls = 0

    async def other_task() -> None:
        while True:
            turns.append(calls)
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_task)
        await trio.lowlevel.checkpoint()
        for calls in range(1, 4 * INLINE_STREAK + 1):  # noqa: B007 (read by other_task)
            await backing.run(os.lstat, backing.path(b""))
        nursery.cancel_scope.cancel()
    # The other task runs once per slice of the loop; which side of a slice it sees the
    # count from depends on trio's (randomized) batch order. Without the periodic yields
    # it would get no turn at all before the loop ends.
    before_the_end = [seen for seen in turns if seen < 4 * INLINE_STREAK]
    assert len(before_the_end) >= 3, turns



ROUND_TRIP = {"seconds": 0.005}


def round_trip_call() -> None:
    time.sleep(ROUND_TRIP["seconds"])


def cached_call() -> None:
    pass


async def test_the_fast_path_stands_aside_per_kind_of_call(tmp_path: Path) -> None:
    """On a network store a rename is a round trip and a write is not: waiting on the trio
    thread for each round trip would hold every other request behind it."""
    backing = Backing(tmp_path, 2, 5.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(backing.serve)
        for _ in range(20):
            await backing.run(round_trip_call)
            await backing.run(cached_call)
        assert not backing.quick_path("round_trip_call")
        assert backing.quick_path("cached_call")
        # Calls that no longer wait briefly are still timed: a kind that got fast (the
        # store recovered) takes the fast path again.
        ROUND_TRIP["seconds"] = 0.0
        try:
            for _ in range(60):
                await backing.run(round_trip_call)
        finally:
            ROUND_TRIP["seconds"] = 0.005
        assert backing.quick_path("round_trip_call")
        nursery.cancel_scope.cancel()


def test_derived_directory_attributes_move_forward_and_keep_link_counts_sane() -> None:
    """mailfs's own changes on a network store move a directory's times one nanosecond on
    and its link count by the subdirectories made or removed; a store that does not count
    subdirectories (sshfs and btrfs show 1) keeps its 1."""
    from mailfs.fs.core import _touched

    def directory(nlink: int) -> os.stat_result:
        ns = 10 * 10**9
        return os.stat_result((0o40755, 1, 1, nlink, 0, 0, 4096, 10, 10, 10, 10.0, 10.0, 10.0,
                               ns, ns, ns, 4096, 8, 0))

    counted = directory(3)
    after = _touched(counted, -1)
    assert after.st_nlink == 2
    assert _touched(after, -1).st_nlink == 2  # never below a directory's own two links
    assert after.st_mtime_ns == counted.st_mtime_ns + 1
    assert after.st_ctime_ns > counted.st_ctime_ns
    uncounted = directory(1)
    assert _touched(uncounted, -1).st_nlink == 1
    assert _touched(uncounted, 1).st_nlink == 1
