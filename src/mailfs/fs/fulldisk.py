"""Changes held while the state disk is full, instead of failing at once.

Dovecot takes ENOSPC on an index file as an error, and often as corruption: it drops its
cache file, rebuilds indexes, and its clients get NO [SERVERBUG] (the soak run counted
thousands of such lines in a 30 s full-disk spell, as many as on a full tmpfs without
mailfs). A full state disk is usually brief: a burst of logs, a copy, a snapshot, until
the admin or logrotate frees space. So a change refused for want of space waits for room,
at most `wait` seconds, and then runs again from the start.

A disk that stays full behaves like one: once a change has waited `wait` seconds in vain,
every change refused in the same spell fails at once with ENOSPC, so that Dovecot is not
slowed to a crawl for as long as the disk stays full. The next spell (after the journal
has found room again) holds changes anew.

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
from mailfs.cachemgr.journal import APPENDED_BY_TASK, Journal

log = logging.getLogger(__name__)

T = TypeVar("T")
# How often a held change looks for room; the journal looks at the disk at most once a
# second anyway (Journal.short_of_space).
POLL_INTERVAL = 0.25


def _task_effects() -> tuple[int, int]:
    return APPENDED_BY_TASK.get(), CALLS_BY_TASK.get()


class FullDiskHold:
    def __init__(self, journal: Journal, wait: float) -> None:
        self.journal = journal
        self.wait = wait
        self.holding = 0  # changes waiting for room now
        self.held = 0  # changes that have waited, ever
        self.went_on = 0  # of those, run again once there was room
        self.refused = 0  # failed with ENOSPC after waiting, or at once after a spell's wait
        self.longest_hold = 0.0
        self._spell_logged = 0
        self._spell_given_up = 0  # a spell in which a change has waited in vain

    async def run(self, attempt: Callable[[], Awaitable[T]]) -> T:
        deadline: float | None = None
        while True:
            before = _task_effects()
            try:
                return await attempt()
            except OSError as exc:
                if (exc.errno != errno.ENOSPC or not self.journal.out_of_space
                        or _task_effects() != before):
                    raise
                if deadline is None:
                    deadline = trio.current_time() + self.wait
                if not await self._room_before(deadline):
                    raise

    def refusing(self) -> bool:
        """Whether changes refused now fail at once: this spell has outlasted a wait."""
        return self.journal.out_of_space and self._spell_given_up == self.journal.full_spells

    async def _room_before(self, deadline: float) -> bool:
        if self.wait <= 0:
            return False
        if self.refusing():
            self.refused += 1
            return False
        spell = self.journal.full_spells
        if self._spell_logged != spell:
            self._spell_logged = spell
            log.warning("state disk full: changes to index files wait up to %.0f s for room "
                        "(full_disk_wait)", self.wait)
        started = trio.current_time()
        self.holding += 1
        self.held += 1
        try:
            while self.journal.short_of_space():
                now = trio.current_time()
                if now >= deadline:
                    if self._spell_given_up != spell:
                        self._spell_given_up = spell
                        log.error("state disk still full after %.0f s: changes to index "
                                  "files fail with ENOSPC until there is room", self.wait)
                    self.refused += 1
                    return False
                await trio.sleep(min(POLL_INTERVAL, deadline - now))
        finally:
            self.holding -= 1
            self.longest_hold = max(self.longest_hold, trio.current_time() - started)
        self.went_on += 1
        return True

    def counts(self) -> dict[str, object]:
        return {
            "state_disk_full": self.journal.out_of_space,
            "full_disk_holding": self.holding,
            "full_disk_held": self.held,
            "full_disk_went_on": self.went_on,
            "full_disk_refused": self.refused,
            "full_disk_longest_hold_s": round(self.longest_hold, 3),
        }
