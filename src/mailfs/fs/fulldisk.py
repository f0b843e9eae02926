"""Changes held while the state disk is full, instead of failing at once.

Dovecot takes ENOSPC on an index file as an error, and often as corruption: it drops its
cache file, rebuilds indexes, and its clients get NO [SERVERBUG] (the soak run counted
thousands of such lines in a 30 s full-disk spell, as many as on a full tmpfs without
mailfs). A full state disk is usually brief: a burst of logs, a copy, a snapshot, until
the admin or logrotate frees space. So a change refused for want of space waits for room,
at most `wait` seconds, and then runs again from the start.

A disk that stays full behaves like one: once a change has waited `wait` seconds in vain,
every change refused until the disk has had room fails at once with ENOSPC, so that
Dovecot is not slowed to a crawl for as long as the disk stays full. "Room" is statvfs's
word (`Journal.has_room`) or a commit that got through, not a small append that happened
to fit. A change refused while MAX_HOLDING others wait, or while the daemon stops, fails
at once too.

Only a request that changed nothing runs again: its task appended no journal record and
made no call on the backing store before it was refused (journal.APPENDED_BY_TASK,
backing.CALLS_BY_TASK). Everything else fails with ENOSPC as before.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from mailfs.cachemgr.backing import CALLS_BY_TASK
from mailfs.cachemgr.journal import APPENDED_BY_TASK
from mailfs.cachemgr.metastore import MetaStore

log = logging.getLogger(__name__)

T = TypeVar("T")
# How often a held change looks for room.
POLL_INTERVAL = 0.25
# pyfuse3 serves requests with at most 99 worker tasks (pyfuse3.main's max_tasks), and a
# held request keeps its worker: beyond this many held at once, refusals fail at once, so
# that reads, lookups and releases always find a worker.
MAX_HOLDING = 32
# While a spell refuses at once, the disk is looked at no more often than this.
REFUSING_CHECK_INTERVAL = 0.1


def task_effects() -> tuple[int, int]:
    return APPENDED_BY_TASK.get(), CALLS_BY_TASK.get()


class FullDiskHold:
    def __init__(self, store: MetaStore, wait: float) -> None:
        self.store = store
        self.journal = store.journal
        self.wait = wait
        self.holding = 0  # requests waiting for room now
        self.held = 0  # requests that have waited, ever
        self.went_on = 0  # of those, done once there was room
        self.refused = 0  # requests that failed with ENOSPC instead of waiting (more)
        self.longest_hold = 0.0
        # The store's commit count when a wait ran out. Until the disk has had room since
        # (statvfs says so, or a commit got through), refusals fail at once.
        self._given_up_at_commit: int | None = None
        self._spell_logged = False
        self._room_checked = -1.0
        self._stopping = trio.Event()

    def stop(self) -> None:
        """The daemon is stopping: held requests fail now instead of delaying it (and
        their processes, which nobody can kill while the kernel waits for the answer)."""
        self._stopping.set()

    async def run(self, attempt: Callable[[], Awaitable[T]]) -> T:
        before = task_effects()
        try:
            return await attempt()
        except OSError as exc:
            return await self.after_refusal(exc, before, attempt)

    async def after_refusal(self, refusal: OSError, before: tuple[int, int],
                            attempt: Callable[[], Awaitable[T]]) -> T:
        """`attempt` failed with `refusal`, having had `before` as its task's effects when
        it began: wait for room and run it again if it may be, else raise `refusal`.
        Callers on the hot path try first themselves, so that a request that was not
        refused costs no closure (Operations' held_on_full_disk)."""
        if not self._may_hold(refusal, before) or not self._hold_begins():
            raise refusal
        started = trio.current_time()
        deadline = started + self.wait
        self.holding += 1
        self.held += 1
        try:
            while await self._room_before(deadline):
                before = task_effects()
                try:
                    result = await attempt()
                except OSError as exc:
                    if not self._may_hold(exc, before):
                        raise
                    refusal = exc
                    if trio.current_time() >= deadline:
                        break
                    # Refused although statvfs shows room (a lock file's check looks at
                    # the disk at most once a second): never again without a pause.
                    await self._pause(deadline)
                    continue
                self.went_on += 1
                return result
            self.refused += 1
            raise refusal
        finally:
            self.holding -= 1
            self.longest_hold = max(self.longest_hold, trio.current_time() - started)

    def _may_hold(self, exc: OSError, before: tuple[int, int]) -> bool:
        """Refused for want of room on the state disk, having changed nothing."""
        return (exc.errno == errno.ENOSPC and self.journal.out_of_space
                and task_effects() == before)

    @property
    def waited_in_vain(self) -> bool:
        return self._given_up_at_commit is not None

    def _refusing(self) -> bool:
        if self._given_up_at_commit is None:
            return False
        if self.store.stats.commits != self._given_up_at_commit or self._room():
            self._given_up_at_commit = None  # the disk has had room since
            return False
        return True

    def _hold_begins(self) -> bool:
        """Whether a request just refused may wait; counts it as refused if not."""
        if (self.wait > 0 and not self._stopping.is_set() and not self._refusing()
                and self.holding < MAX_HOLDING):
            if not self._spell_logged:
                self._spell_logged = True
                log.warning("state disk full: changes to index files wait up to %.0f s "
                            "for room (full_disk_wait)", self.wait)
            return True
        self.refused += 1
        return False

    def _room(self) -> bool:
        now = trio.current_time()
        if self.waited_in_vain and now - self._room_checked < REFUSING_CHECK_INTERVAL:
            return False
        self._room_checked = now
        if not self.journal.has_room():
            return False
        if self._spell_logged:
            self._spell_logged = False
            log.warning("room on the state disk again: held changes go on")
        return True

    async def _room_before(self, deadline: float) -> bool:
        """Wait until the disk has room (True), or the deadline or a stop comes, or another
        request's wait ran out (False)."""
        while not self._room():
            now = trio.current_time()
            if now >= deadline or self._stopping.is_set() or self.waited_in_vain:
                if not self.waited_in_vain and not self._stopping.is_set():
                    self._given_up_at_commit = self.store.stats.commits
                    log.error("state disk still full after %.0f s: changes to index "
                              "files fail with ENOSPC until there is room", self.wait)
                return False
            await self._pause(deadline)
        return True

    async def _pause(self, deadline: float) -> None:
        with trio.move_on_at(min(trio.current_time() + POLL_INTERVAL, deadline)):
            await self._stopping.wait()

    def counts(self) -> dict[str, object]:
        return {
            "state_disk_full": self.journal.out_of_space,
            "full_disk_holding": self.holding,
            "full_disk_held": self.held,
            "full_disk_went_on": self.went_on,
            "full_disk_refused": self.refused,
            "full_disk_longest_hold_s": round(self.longest_hold, 3),
        }
