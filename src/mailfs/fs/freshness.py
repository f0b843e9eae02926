"""How long what the store said about a passthrough file may stand in for asking it again.

Pure bookkeeping, no I/O. A read-only open of a passthrough file needs the store only to
find out that the file is still there and unchanged (MailFS.open): the (mtime, size) a
lookup, getattr or open read from the store a moment ago answers that, for as long as the
kernel trusts its own copy of the same attributes (`ttl`, the passthrough timeout). What
the store said stops counting earlier:
- for one user, when a peer's change to that user's index files arrives: the peer's mail
  files changed with them (an expunge unlinks a message file);
- for everyone, when the caches are dropped (`mailfs flush --caches`, a snapshot install).
A reading counts from the moment it was asked for, so one that straddles a drop is stale.
"""

from __future__ import annotations

import math

# Users whose drop is older than the ttl are forgotten beyond this many.
MAX_USERS = 10_000


class Freshness:
    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._all_before = -math.inf
        self._user_before: dict[bytes | None, float] = {}
        self.dropped = 0

    def fresh(self, asked_at: float, user: bytes | None, now: float) -> bool:
        return (now - asked_at < self.ttl and asked_at > self._all_before
                and asked_at > self._user_before.get(user, -math.inf))

    def drop_user(self, user: bytes | None, now: float) -> None:
        self._user_before[user] = now
        self.dropped += 1
        if len(self._user_before) > MAX_USERS:
            self._user_before = {name: at for name, at in self._user_before.items()
                                 if now - at < self.ttl}
            if len(self._user_before) > MAX_USERS:
                self.drop_all(now)  # staler than needed, never fresher, and bounded

    def drop_all(self, now: float) -> None:
        self._all_before = now
        self._user_before.clear()
        self.dropped += 1
