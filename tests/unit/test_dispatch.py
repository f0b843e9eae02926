"""The request loop's cheaper wait: when it may skip trio's scheduler, and when it must not."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from mailfs.fs.session import dispatch


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_end, write_end = os.pipe()
    yield read_end, write_end
    for fd in (read_end, write_end):
        with contextlib.suppress(OSError):  # the test closed it already
            os.close(fd)


def test_a_waiting_request_is_taken_at_once_but_not_forever(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    waits = dispatch.FastWaits()
    assert not waits.ready_now(read_end)  # nothing queued: the real wait
    os.write(write_end, b"x")
    taken = [waits.ready_now(read_end) for _ in range(dispatch.STREAK + 1)]
    # The streak ends with one real wait, which lets trio's other tasks run.
    assert taken == [True] * dispatch.STREAK + [False]
    assert waits.ready_now(read_end)


def test_a_hung_up_or_closed_fd_takes_the_real_wait(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    waits = dispatch.FastWaits()
    os.write(write_end, b"x")
    os.close(write_end)  # readable and hung up: pyfuse3 must hear of it the usual way
    assert not waits.ready_now(read_end)
    os.close(read_end)
    assert not waits.ready_now(read_end)


async def test_the_wait_returns_without_yielding_only_when_a_request_is_waiting(
        pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    before = dispatch.waits.status()
    other_ran = False

    async def other() -> None:
        nonlocal other_ran
        other_ran = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        os.write(write_end, b"x")
        await dispatch.wait_readable(read_end)
        assert not other_ran  # no scheduler pass
        os.read(read_end, 1)
        with trio.move_on_after(0.05):
            await dispatch.wait_readable(read_end)  # nothing there: it parks
        assert other_ran
    after = dispatch.waits.status()
    assert after["immediate"] == before["immediate"] + 1
    assert after["waited"] == before["waited"] + 1


async def test_the_read_lock_excludes_like_trio_lock() -> None:
    lock = dispatch.ReadLock()
    order: list[str] = []

    async def holder(name: str, hold: float) -> None:
        async with lock:
            order.append(f"{name} in")
            await trio.sleep(hold)
            order.append(f"{name} out")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(holder, "a", 0.05)
        await trio.sleep(0.01)
        nursery.start_soon(holder, "b", 0)
        nursery.start_soon(holder, "c", 0)
    # trio starts b and c in either order (it shuffles each batch of runnable tasks), so
    # what must hold is that no two holds overlap and that a, holding first, went first.
    holds = [(order[i], order[i + 1]) for i in range(0, len(order), 2)]
    assert all(came.split()[0] == went.split()[0] and came.endswith(" in")
               and went.endswith(" out") for came, went in holds), order
    holders = [came.split()[0] for came, _ in holds]
    assert holders[0] == "a"
    assert sorted(holders) == ["a", "b", "c"]


async def test_the_reader_that_releases_may_take_the_lock_straight_back() -> None:
    # The shape of pyfuse3's loop under load: a spare reader parks on the lock while the
    # busy one waits for the fd; the busy one must then go on reading without a switch.
    lock = dispatch.ReadLock()
    spare_got_it = trio.Event()
    switches = 0

    async def spare() -> None:
        async with lock:
            spare_got_it.set()

    async def count_switches() -> None:
        nonlocal switches
        while True:
            await trio.lowlevel.checkpoint()
            switches += 1

    async with trio.open_nursery() as nursery:
        await lock.__aenter__()
        nursery.start_soon(spare)
        await trio.testing.wait_all_tasks_blocked()
        assert not spare_got_it.is_set()
        nursery.start_soon(count_switches)
        before = switches
        for _ in range(dispatch.STREAK):  # release and take again, as each request does
            await lock.__aexit__(None, None, None)
            await lock.__aenter__()
        assert switches == before  # nobody else ran: no trip through the scheduler
        assert not spare_got_it.is_set()  # woken each time, but never given the lock
        await lock.__aexit__(None, None, None)
        with trio.fail_after(5):
            await spare_got_it.wait()
        nursery.cancel_scope.cancel()


async def test_a_reader_cancelled_while_parked_leaves_the_lock_to_the_others() -> None:
    lock = dispatch.ReadLock()
    got_it: list[str] = []

    async def reader(name: str, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            async with lock:
                got_it.append(name)

    async with trio.open_nursery() as nursery:
        await lock.__aenter__()
        first = await nursery.start(reader, "first")
        await trio.testing.wait_all_tasks_blocked()
        await nursery.start(reader, "second")
        await trio.testing.wait_all_tasks_blocked()
        first.cancel()
        await trio.testing.wait_all_tasks_blocked()
        await lock.__aexit__(None, None, None)
        with trio.fail_after(5):
            while not got_it:
                await trio.sleep(0.01)
    assert got_it == ["second"]
    assert not lock.locked()


def test_pyfuse3_takes_the_stand_in() -> None:
    import pyfuse3

    try:
        assert dispatch.install()
        stand_in = pyfuse3.trio  # type: ignore[attr-defined]
        assert stand_in.lowlevel.wait_readable is dispatch.wait_readable
        assert stand_in.Lock is dispatch.ReadLock
        # Everything else pyfuse3 uses is trio's own.
        assert stand_in.open_nursery is trio.open_nursery
        assert stand_in.lowlevel.current_task is trio.lowlevel.current_task
        assert stand_in.ClosedResourceError is trio.ClosedResourceError
        assert not dispatch.install()  # twice is harmless
    finally:
        pyfuse3.trio = trio  # type: ignore[attr-defined]
