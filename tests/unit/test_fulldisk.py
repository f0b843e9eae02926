"""FullDiskHold over a real MetaStore and Backing, with the state disk's answers faked: which
refused changes wait and run again, and which must not (the mount tests fill a real disk)."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio

from mailfs.cachemgr import journal as journal_module
from mailfs.cachemgr.backing import Backing
from mailfs.cachemgr.metastore import MetaStore
from mailfs.fs.fulldisk import MAX_HOLDING, FullDiskHold

MODE = stat.S_IFREG | 0o600


class Disk:
    """The state disk as the journal sees it: full or not. `lucky`: full, but a write
    still fits (the last page of the journal file, say)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.full = False
        self.lucky = False
        real_write, real_statvfs = os.write, os.statvfs

        def write(fd: int, data: bytes) -> int:
            if self.full and not self.lucky:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(fd, data)

        def statvfs(path: object) -> os.statvfs_result:
            result = real_statvfs(path)  # type: ignore[arg-type]
            if not self.full:
                return result
            values = list(result)
            values[4] = 0  # f_bavail
            return os.statvfs_result(values)

        monkeypatch.setattr(journal_module.os, "write", write)
        monkeypatch.setattr(journal_module.os, "statvfs", statvfs)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MetaStore]:
    store = MetaStore(tmp_path / "state", ram_budget=64 << 20, map_size=256 << 20,
                      commit_interval=1.0, commit_bytes=1 << 30)
    store.recover()
    yield store
    store.close()


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Disk:
    return Disk(monkeypatch)


@pytest.fixture
def hold(store: MetaStore) -> FullDiskHold:
    return FullDiskHold(store, wait=30)


async def run_held_until_room(hold: FullDiskHold, disk: Disk,
                              attempt: Callable[[], Awaitable[object]]) -> None:
    """Run `attempt` on a full disk, see it held, then make room and let it finish."""
    disk.full = True
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold.run, attempt)
        await trio.sleep(0.2)
        assert hold.holding == 1
        disk.full = False


async def test_a_refused_change_waits_for_room_and_runs_again(
        store: MetaStore, hold: FullDiskHold, disk: Disk) -> None:
    stored = store.create(b"", b"dovecot.index.log", MODE, 8, 8)
    attempts = 0

    async def append() -> int:
        nonlocal attempts
        attempts += 1
        store.write(stored, stored.size, b"record")
        return stored.size

    await run_held_until_room(hold, disk, append)
    assert attempts == 2
    assert bytes(store.get(stored.fid).content) == b"record"
    assert (hold.held, hold.went_on, hold.refused, hold.holding) == (1, 1, 0, 0)


async def test_a_change_that_journaled_a_record_is_not_run_again(
        store: MetaStore, hold: FullDiskHold, disk: Disk) -> None:
    """Running it again would apply its first record twice."""
    first = store.create(b"", b"dovecot.index", MODE, 8, 8)
    second = store.create(b"", b"dovecot.index.log", MODE, 8, 8)
    attempts = 0

    async def two_writes() -> None:
        nonlocal attempts
        attempts += 1
        store.write(first, first.size, b"once")
        disk.full = True
        store.write(second, 0, b"never")

    with pytest.raises(OSError) as refused:
        await hold.run(two_writes)
    assert refused.value.errno == errno.ENOSPC
    assert attempts == 1
    assert hold.held == 0
    assert bytes(store.get(first.fid).content) == b"once"


async def test_a_change_that_called_the_backing_store_is_not_run_again(
        store: MetaStore, hold: FullDiskHold, disk: Disk, tmp_path: Path) -> None:
    """A passthrough mkdir, say, then its store record: run again, it would find EEXIST."""
    backing = Backing(tmp_path, 1, 5.0)
    backing.inline = True
    attempts = 0

    async def mkdir_then_record() -> None:
        nonlocal attempts
        attempts += 1
        await backing.run(os.mkdir, str(tmp_path / f"made-{attempts}"))
        disk.full = True
        store.create(b"", b"dovecot.index", MODE, 8, 8)

    with pytest.raises(OSError) as refused:
        await hold.run(mkdir_then_record)
    assert refused.value.errno == errno.ENOSPC
    assert attempts == 1
    assert hold.held == 0


async def test_other_errors_and_other_enospc_are_not_held(
        store: MetaStore, hold: FullDiskHold, disk: Disk) -> None:
    """ENOSPC from anything but the state disk (a full backing store) fails at once."""
    disk.full = True

    async def fail(code: int) -> None:
        raise OSError(code, os.strerror(code))

    for code in (errno.ENOSPC, errno.EIO):
        with pytest.raises(OSError) as refused:
            await hold.run(lambda code=code: fail(code))
        assert refused.value.errno == code
    assert hold.held == 0


async def test_a_spell_that_outlasts_the_wait_refuses_at_once_until_room(
        store: MetaStore, disk: Disk) -> None:
    hold = FullDiskHold(store, wait=0.3)
    stored = store.create(b"", b"dovecot.index.cache", MODE, 8, 8)

    async def append() -> None:
        store.write(stored, stored.size, b"x" * 100)

    disk.full = True
    for _ in range(3):
        with pytest.raises(OSError):
            await hold.run(append)
    assert (hold.held, hold.refused) == (1, 3)
    assert hold.waited_in_vain
    # A small write that happens to fit ends the journal's spell, not the disk's.
    disk.lucky = True
    await hold.run(append)
    assert not store.journal.out_of_space
    disk.lucky = False
    with pytest.raises(OSError):
        await hold.run(append)
    assert (hold.held, hold.refused) == (1, 4)
    disk.full = False
    await hold.run(append)  # no refusal, so nothing looks at the disk...
    await store.commit()  # ...but the committer gets through, as it does within a second
    await run_held_until_room(hold, disk, append)  # room was seen: a new spell holds again
    assert not hold.waited_in_vain
    assert (hold.held, hold.went_on) == (2, 1)
    assert bytes(store.get(stored.fid).content) == b"x" * 300


async def test_no_more_than_max_holding_requests_wait(
        store: MetaStore, hold: FullDiskHold, disk: Disk) -> None:
    """Each held request keeps one of pyfuse3's worker tasks: the others must stay free
    for reads, lookups and releases."""
    stored = store.create(b"", b"dovecot.index.cache", MODE, 8, 8)

    async def append() -> None:
        store.write(stored, stored.size, b"y")

    disk.full = True
    async with trio.open_nursery() as nursery:
        for _ in range(MAX_HOLDING):
            nursery.start_soon(hold.run, append)
        await trio.sleep(0.2)
        assert hold.holding == MAX_HOLDING
        with pytest.raises(OSError) as refused:
            await hold.run(append)
        assert refused.value.errno == errno.ENOSPC
        disk.full = False
    assert (hold.held, hold.went_on, hold.refused) == (MAX_HOLDING, MAX_HOLDING, 1)
    assert stored.size == MAX_HOLDING


async def test_stopping_fails_held_requests_at_once(
        store: MetaStore, hold: FullDiskHold, disk: Disk) -> None:
    """A held request must not delay the daemon's stop: its process cannot even be killed
    while the kernel waits for the answer."""
    stored = store.create(b"", b"dovecot.index.cache", MODE, 8, 8)
    failures: list[int] = []

    async def held_append() -> None:
        try:
            await hold.run(lambda: _write(store, stored))
        except OSError as exc:
            failures.append(exc.errno or 0)

    disk.full = True
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(held_append)
            await trio.sleep(0.2)
            assert hold.holding == 1
            hold.stop()
    assert failures == [errno.ENOSPC]
    with pytest.raises(OSError):
        await hold.run(lambda: _write(store, stored))
    assert hold.held == 1


async def test_no_wait_configured_means_enospc_at_once(
        store: MetaStore, disk: Disk) -> None:
    hold = FullDiskHold(store, wait=0)
    stored = store.create(b"", b"dovecot.index.cache", MODE, 8, 8)
    disk.full = True
    with pytest.raises(OSError) as refused:
        await hold.run(lambda: _write(store, stored))
    assert refused.value.errno == errno.ENOSPC
    assert hold.held == 0


async def _write(store: MetaStore, stored: object) -> None:
    store.write(stored, 0, b"data")  # type: ignore[arg-type]
