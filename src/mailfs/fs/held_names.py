"""The passthrough names this mount handed to the kernel, by user, for the kernel's timeout.

The kernel keeps every passthrough name it was given, found or missing, for the passthrough
timeout, and answers lookups from it without asking. A peer's change to a user's index files
says that the user's mail files changed on the shared store (Dovecot changes both together):
from then on the kernel must not answer from those names. MailFS.peer_changed takes the
user's names from here and has the kernel forget them, their files' attributes and their
directories' attributes. Without this, a message the peer delivered stayed missing here,
and one it expunged stayed present, until the timeout ran out
(`tests/cluster/test_two_mounts_over_sshfs.py`).

Kept only where lookups go to the worker threads (network stores), as the listings are.
Pure bookkeeping: the caller keeps time and tells the kernel.
"""

from __future__ import annotations

from collections import OrderedDict

# Names remembered in all (the oldest are forgotten first; the kernel may still hold them,
# and then a peer's change is seen at the timeout, as without this).
MAX_NAMES = 200_000

Name = tuple[int, bytes]  # (parent inode, name)

# A listing's names are noted when it is read and reach the kernel with the readdir replies
# that follow, a little later: they count as held this much longer than the timeout.
GRACE = 1.0


class HeldNames:
    def __init__(self, ttl: float, max_names: int = MAX_NAMES) -> None:
        self.ttl = ttl
        self.max_names = max_names
        self._names: OrderedDict[Name, tuple[bytes | None, float]] = OrderedDict()
        self._by_user: dict[bytes | None, set[Name]] = {}
        self.forgotten = 0  # pushed out by the bound while the kernel may still hold them

    def __len__(self) -> int:
        return len(self._names)

    def handed(self, user: bytes | None, parent: int, name: bytes, now: float) -> None:
        """The kernel was given `name` in `parent` (an entry or a missing name) at `now`."""
        key = (parent, name)
        old = self._names.pop(key, None)
        if old is not None and old[0] != user:
            self._discard(old[0], key)
        self._names[key] = (user, now)
        self._by_user.setdefault(user, set()).add(key)
        while len(self._names) > self.max_names:
            oldest, (owner, at) = self._names.popitem(last=False)
            self._discard(owner, oldest)
            if now - at < self.ttl + GRACE:
                self.forgotten += 1

    def take_user(self, user: bytes | None, now: float) -> list[Name]:
        """The user's names that the kernel may still hold; forgets all of the user's."""
        taken = []
        for key in self._by_user.pop(user, ()):
            _, at = self._names.pop(key)
            if now - at < self.ttl + GRACE:
                taken.append(key)
        return taken

    def take_all(self, now: float) -> list[Name]:
        taken = [key for key, (_, at) in self._names.items() if now - at < self.ttl + GRACE]
        self.clear()
        return taken

    def clear(self) -> None:
        self._names.clear()
        self._by_user.clear()

    def _discard(self, user: bytes | None, key: Name) -> None:
        keys = self._by_user.get(user)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_user[user]
