"""The names a passthrough directory holds, kept to answer lookups of missing names.

Dovecot looks up a name before every create and rename: the temp file of a save, the u.N or
maildir name it renames to. The kernel sends those lookups even when it holds the name as
missing (it always asks again for O_EXCL creates and rename targets), and on a network store
each one is a round trip that finds nothing. With the directory's names known, mailfs
answers them from memory.

Only "missing" is answered from a listing; a listed name is still looked up on the store.
A listing is trusted for `ttl` seconds after it was read (the passthrough timeout, for which
the kernel caches missing names anyway). Within that time it follows this mount's own
changes, and it is dropped when:
- a peer's change to the user's index files arrives (its mail files changed with them);
- a change of ours in the directory ended in an error (it may have happened anyway);
- `mailfs flush --caches` asks for it.
A listing read while a change of ours in that directory was under way is not kept: it may
have been read before the change, and nothing would add the change's name to it.

Pure bookkeeping; the caller reads directories and keeps time.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

# Bounds on memory: names kept in all listings, and in one (a bigger directory is not kept).
MAX_NAMES = 200_000
MAX_NAMES_PER_DIR = 20_000


@dataclass(slots=True)
class Listing:
    names: set[bytes]
    read_at: float
    user: bytes | None


@dataclass
class ListingStats:
    missing_answered: int = 0  # lookups answered "missing" from a listing
    listings_read: int = 0
    listings_discarded: int = 0  # read while the directory changed, or too big
    listings_dropped: int = 0


class ListingCache:
    def __init__(self, ttl: float, max_names: int = MAX_NAMES,
                 max_names_per_dir: int = MAX_NAMES_PER_DIR) -> None:
        self.ttl = ttl
        self.max_names = max_names
        self.max_names_per_dir = max_names_per_dir
        self.stats = ListingStats()
        self.names = 0
        self._listings: OrderedDict[int, Listing] = OrderedDict()
        self._by_user: dict[bytes | None, set[int]] = {}
        # Directories being read: inode -> [reads under way, changes seen meanwhile].
        self._reading: dict[int, list[int]] = {}
        # Bumped by every drop, so a read that straddles one is not kept either.
        self._drops = 0

    def __len__(self) -> int:
        return len(self._listings)

    @property
    def idle(self) -> bool:
        """Nothing kept and nothing being read: a drop would change nothing."""
        return not self._listings and not self._reading

    def is_missing(self, inode: int, name: bytes, now: float) -> bool | None:
        """True if a fresh listing lacks `name`, False if it has it, None without one."""
        listing = self._listings.get(inode)
        if listing is None:
            return None
        if now - listing.read_at > self.ttl:
            self._drop(inode)
            return None
        self._listings.move_to_end(inode)
        if name in listing.names:
            return False
        self.stats.missing_answered += 1
        return True

    def fresh(self, inode: int, now: float) -> bool:
        listing = self._listings.get(inode)
        return listing is not None and now - listing.read_at <= self.ttl

    def begin_read(self, inode: int) -> tuple[int, int]:
        """Before reading a directory; pass the result to `finish_read`."""
        reading = self._reading.setdefault(inode, [0, 0])
        reading[0] += 1
        return self._drops, reading[1]

    def finish_read(self, inode: int, token: tuple[int, int], names: set[bytes] | None,
                    user: bytes | None, read_at: float) -> None:
        """After reading (names None: the read failed). `read_at`: when the read began."""
        reading = self._reading[inode]
        reading[0] -= 1
        unchanged = token == (self._drops, reading[1])
        if reading[0] == 0:
            del self._reading[inode]
        if names is None:
            return
        if not unchanged or len(names) > self.max_names_per_dir:
            self.stats.listings_discarded += 1
            return
        self._drop(inode)
        self._listings[inode] = Listing(names, read_at, user)
        self._by_user.setdefault(user, set()).add(inode)
        self.names += len(names)
        self.stats.listings_read += 1
        while self.names > self.max_names and self._listings:
            self._drop(next(iter(self._listings)))

    def added(self, inode: int, name: bytes) -> None:
        self._changed(inode)
        listing = self._listings.get(inode)
        if listing is not None and name not in listing.names:
            listing.names.add(name)
            self.names += 1

    def removed(self, inode: int, name: bytes) -> None:
        self._changed(inode)
        listing = self._listings.get(inode)
        if listing is not None and name in listing.names:
            listing.names.discard(name)
            self.names -= 1

    def uncertain(self, inode: int) -> None:
        """A change in the directory failed: it may or may not have happened."""
        self._changed(inode)
        self._drop(inode)

    def drop_user(self, user: bytes) -> None:
        self._drops += 1
        for inode in list(self._by_user.get(user, ())):
            self._drop(inode)

    def drop_all(self) -> None:
        self._drops += 1
        for inode in list(self._listings):
            self._drop(inode)

    def _changed(self, inode: int) -> None:
        reading = self._reading.get(inode)
        if reading is not None:
            reading[1] += 1

    def _drop(self, inode: int) -> None:
        listing = self._listings.pop(inode, None)
        if listing is None:
            return
        self.names -= len(listing.names)
        self.stats.listings_dropped += 1
        same_user = self._by_user.get(listing.user)
        if same_user is not None:
            same_user.discard(inode)
            if not same_user:
                del self._by_user[listing.user]
