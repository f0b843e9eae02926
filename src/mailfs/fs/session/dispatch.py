"""A cheaper wait for the next FUSE request than the one pyfuse3 makes.

Why: pyfuse3's request loop takes a trio.Lock and then waits for /dev/fuse with
trio.lowlevel.wait_readable before it reads each request, even when requests are already
queued, as they nearly always are under load. Both yield to trio's scheduler: the lock's
acquire ends in a checkpoint, and the wait registers the fd with epoll, parks the task and
is woken by the next epoll_wait. Profiled under IMAP load (bench/daemon_profile.py) that
machinery was about a fifth of the daemon's CPU, around as much as all of mailfs's own
code for the same requests.

How: pyfuse3 looks `trio` up as a module global at every use (pyfuse3.asyncio swaps it
the same way), so `install()` puts a stand-in there that is trio in every respect but two:
- `lowlevel.wait_readable` first asks poll(2), without blocking, whether a request is
  waiting, and if so returns at once;
- `Lock` (pyfuse3 makes one, for its readers) is taken without a checkpoint when free,
  and release() does not hand it to the spare reader parked on it (`ReadLock`). A fair
  lock made the readers take turns, one trip through the scheduler per request: 4 writers
  on index files, 30 vs 14 µs daemon CPU per request, half the throughput.
At most STREAK requests in a row take the short way; then the real wait runs, and with it
the scheduler, so the committer, replication and the control socket get their turns
however busy the mount is. Any other state of the fd (error, hang-up, closed) takes the
real wait, which reports it the way pyfuse3 expects.
"""

from __future__ import annotations

import select
import types
from typing import Any

import trio

# Requests read without a trip through the scheduler before the next real wait. A request
# costs some tens of microseconds, so the other tasks wait a millisecond at most.
STREAK = 16

_READY = select.POLLIN
_TROUBLE = select.POLLERR | select.POLLHUP | select.POLLNVAL


class FastWaits:
    """Counts for `mailfs status`: how the request loop got each request."""

    def __init__(self) -> None:
        self.immediate = 0
        self.waited = 0
        self._streak = 0
        self._pollers: dict[int, select.poll] = {}

    def ready_now(self, fd: int) -> bool:
        if self._streak >= STREAK:
            self._streak = 0
            return False
        poller = self._pollers.get(fd)
        if poller is None:
            poller = self._pollers[fd] = select.poll()
            poller.register(fd, _READY)
        events = poller.poll(0)
        if not events or events[0][1] & _TROUBLE or not events[0][1] & _READY:
            self._streak = 0
            return False
        self._streak += 1
        return True

    def status(self) -> dict[str, int]:
        return {"immediate": self.immediate, "waited": self.waited}


waits = FastWaits()


async def wait_readable(fd: Any) -> None:
    if isinstance(fd, int) and waits.ready_now(fd):
        waits.immediate += 1
        return
    waits.waited += 1
    await trio.lowlevel.wait_readable(fd)


class ReadLock:
    """Mutual exclusion for pyfuse3's readers, taken without a checkpoint when free, and
    not handed over on release.

    trio.Lock is fair: release() makes the first parked task the owner. pyfuse3 keeps a
    spare reader parked on this lock, so with a fair lock the reader that has just served a
    request finds the lock owned by the spare, parks, and every request makes a trip
    through the scheduler to switch readers. Here release() only wakes one parked reader,
    which takes the lock if it is still free when it runs and parks again otherwise; the
    reader that just served a request simply goes on. Readers are interchangeable, so
    nobody is owed the turn."""

    def __init__(self) -> None:
        self._held = False
        self._parked = trio.lowlevel.ParkingLot()

    def locked(self) -> bool:
        return self._held

    async def __aenter__(self) -> None:
        # A parked reader that is cancelled leaves the lot at once (trio aborts the park),
        # and one that was woken runs this check before anything else: no wake-up is lost.
        while self._held:
            await self._parked.park()
        self._held = True

    async def __aexit__(self, *exc_info: object) -> None:
        self._held = False
        if self._parked:
            self._parked.unpark()


class _Delegate(types.SimpleNamespace):
    """A module stand-in: what it does not define itself, the real module answers."""

    def __init__(self, real: types.ModuleType, **overrides: Any) -> None:
        super().__init__(**overrides)
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def install() -> bool:
    """Give pyfuse3 the stand-in; False if this pyfuse3 has no `trio` global to swap."""
    import pyfuse3

    if getattr(pyfuse3, "trio", None) is not trio:
        return False
    lowlevel = _Delegate(trio.lowlevel, wait_readable=wait_readable)
    pyfuse3.trio = _Delegate(trio, lowlevel=lowlevel, Lock=ReadLock)  # type: ignore[attr-defined]
    return True
