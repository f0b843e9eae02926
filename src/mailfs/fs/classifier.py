"""Sort every file name into the class that decides where the file lives."""

from __future__ import annotations

import enum
import fnmatch
import re
from collections.abc import Sequence


class FileClass(enum.Enum):
    REPLICATED = "replicated"  # RAM + LMDB, streamed to peers
    VOLATILE = "volatile"      # RAM on this node only (dot-locks)
    PASSTHROUGH = "passthrough"  # the backing path


# Dovecot's index and control files, and the temp names it writes them under.
DEFAULT_REPLICATED: tuple[str, ...] = (
    "dovecot.index",
    "dovecot.index.*",
    "dovecot.list.index",
    "dovecot.list.index.*",
    "dovecot.mailbox.log",
    "dovecot.mailbox.log.*",
    "dovecot.map.index",
    "dovecot.map.index.*",
    "dovecot-uidlist",
    "dovecot-uidlist.tmp",  # maildir rewrites the uidlist as .tmp and renames it over
    "dovecot-keywords",
    "dovecot-keywords.tmp",
    "dovecot-uidvalidity",
    "dovecot-uidvalidity.*",
    "subscriptions",
    "subscriptions.tmp",
    "dovecot-acl-list",
    "dovecot-acl-list.tmp",
)

# Checked before the replicated patterns: dovecot.index.log.newlock is a lock, not an index.
# file_create_locked() (mailbox list locks, ...) writes "<name>.lock<random hex>" and
# link()s it to "<name>.lock", so that temp name must be in the lock's class too.
DEFAULT_VOLATILE: tuple[str, ...] = (
    "*.lock",
    "*.newlock",
    r"re:.*\.lock[0-9a-f]{1,16}",
)


REGEX_PREFIX = "re:"


def _translate(pattern: str) -> str:
    """A shell glob, or with a "re:" prefix a regular expression matching the whole name."""
    if pattern.startswith(REGEX_PREFIX):
        return rf"(?:{pattern[len(REGEX_PREFIX):]})\Z"
    return fnmatch.translate(pattern)


def _compile(patterns: Sequence[str]) -> re.Pattern[str] | None:
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{_translate(p)})" for p in patterns), re.DOTALL)


def validate_patterns(patterns: Sequence[str]) -> str | None:
    """The first pattern that is not a valid expression, or None."""
    for pattern in patterns:
        try:
            re.compile(_translate(pattern))
        except re.error:
            return pattern
    return None


class Classifier:
    """Name -> FileClass from patterns on the file name (not the path).

Patterns are shell globs ("dovecot.index.*"), or regular expressions with a "re:" prefix.
"""

    def __init__(
        self,
        replicated: Sequence[str] = DEFAULT_REPLICATED,
        volatile: Sequence[str] = DEFAULT_VOLATILE,
    ) -> None:
        self.replicated = tuple(replicated)
        self.volatile = tuple(volatile)
        self._replicated = _compile(self.replicated)
        self._volatile = _compile(self.volatile)
        self._memo: dict[bytes, FileClass] = {}

    def classify(self, name: bytes) -> FileClass:
        cached = self._memo.get(name)
        if cached is not None:
            return cached
        text = name.decode("utf-8", "surrogateescape")
        if self._volatile is not None and self._volatile.match(text):
            result = FileClass.VOLATILE
        elif self._replicated is not None and self._replicated.match(text):
            result = FileClass.REPLICATED
        else:
            result = FileClass.PASSTHROUGH
        if len(self._memo) < 100_000:  # message file names are unique; don't grow forever
            self._memo[name] = result
        return result
