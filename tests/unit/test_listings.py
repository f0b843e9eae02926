"""The listing cache: when a directory's names may answer "missing", and when not."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mailfs.fs.listings import ListingCache

DIR, OTHER = 10, 11


def cached(names: set[bytes], ttl: float = 10.0, user: bytes | None = b"alice"
           ) -> ListingCache:
    cache = ListingCache(ttl)
    token = cache.begin_read(DIR)
    cache.finish_read(DIR, token, set(names), user, read_at=0.0)
    return cache


def test_a_fresh_listing_answers_missing_names_only() -> None:
    cache = cached({b"a", b"b"})
    assert cache.is_missing(DIR, b"c", 1.0) is True
    assert cache.is_missing(DIR, b"a", 1.0) is False
    assert cache.is_missing(OTHER, b"c", 1.0) is None
    assert cache.stats.missing_answered == 1


def test_a_listing_expires_from_when_its_read_began() -> None:
    cache = cached({b"a"}, ttl=5.0)
    assert cache.is_missing(DIR, b"c", 5.0) is True
    assert cache.is_missing(DIR, b"c", 5.1) is None
    assert len(cache) == 0 and cache.names == 0


def test_own_changes_keep_a_listing_right() -> None:
    cache = cached({b"tmp"})
    cache.added(DIR, b"u.1")
    cache.removed(DIR, b"tmp")
    assert cache.is_missing(DIR, b"u.1", 1.0) is False
    assert cache.is_missing(DIR, b"tmp", 1.0) is True
    assert cache.names == 1


def test_a_read_that_a_change_overlapped_is_not_kept() -> None:
    """The read may have seen the directory before the change; nothing would add the
    change's name to it afterwards."""
    cache = ListingCache(10.0)
    token = cache.begin_read(DIR)
    cache.added(DIR, b"new")  # our create returned while the read was under way
    cache.finish_read(DIR, token, {b"old"}, None, read_at=0.0)
    assert cache.is_missing(DIR, b"new", 1.0) is None
    assert cache.stats.listings_discarded == 1
    # A change in another directory does not matter.
    token = cache.begin_read(DIR)
    cache.added(OTHER, b"x")
    cache.finish_read(DIR, token, {b"old"}, None, read_at=0.0)
    assert cache.is_missing(DIR, b"new", 1.0) is True


def test_a_drop_during_a_read_discards_it() -> None:
    cache = ListingCache(10.0)
    token = cache.begin_read(DIR)
    cache.drop_user(b"bob")  # a peer's change to some user: can't tell which dirs
    cache.finish_read(DIR, token, {b"old"}, b"bob", read_at=0.0)
    assert cache.is_missing(DIR, b"new", 1.0) is None


def test_a_failed_change_drops_the_listing() -> None:
    cache = cached({b"a"})
    cache.uncertain(DIR)
    assert cache.is_missing(DIR, b"b", 1.0) is None


def test_peer_changes_drop_that_users_listings_or_all() -> None:
    cache = cached({b"a"}, user=b"alice")
    token = cache.begin_read(OTHER)
    cache.finish_read(OTHER, token, {b"b"}, b"bob", read_at=0.0)
    cache.drop_user(b"alice")
    assert cache.is_missing(DIR, b"x", 1.0) is None
    assert cache.is_missing(OTHER, b"x", 1.0) is True
    cache.drop_all()
    assert cache.is_missing(OTHER, b"x", 1.0) is None
    assert cache.names == 0


def test_memory_stays_within_its_bounds() -> None:
    cache = ListingCache(10.0, max_names=5, max_names_per_dir=3)
    token = cache.begin_read(DIR)
    cache.finish_read(DIR, token, {b"1", b"2", b"3", b"4"}, None, read_at=0.0)
    assert len(cache) == 0  # too big to keep
    for inode in range(3):
        token = cache.begin_read(inode)
        cache.finish_read(inode, token, {b"1", b"2"}, None, read_at=0.0)
    assert cache.names <= 5
    assert cache.is_missing(0, b"x", 1.0) is None  # the oldest went first
    assert cache.is_missing(2, b"x", 1.0) is True


@settings(max_examples=300)
@given(st.lists(st.tuples(st.sampled_from(["add", "remove", "read", "fail", "drop"]),
                          st.sampled_from([b"a", b"b", b"c"])), max_size=40))
def test_a_listing_never_says_missing_for_a_name_that_exists(
        steps: list[tuple[str, bytes]]) -> None:
    """Model: the directory's real names; reads may begin before and end after changes."""
    real: set[bytes] = set()
    cache = ListingCache(100.0)
    pending: list[tuple[tuple[int, int], set[bytes]]] = []
    for action, name in steps:
        if action == "add":
            real.add(name)
            cache.added(DIR, name)
        elif action == "remove":
            real.discard(name)
            cache.removed(DIR, name)
        elif action == "read":
            if pending:  # finish the oldest read, with what it saw when it began
                token, seen = pending.pop(0)
                cache.finish_read(DIR, token, seen, None, read_at=0.0)
            else:
                pending.append((cache.begin_read(DIR), set(real)))
        elif action == "fail":
            if name in real:  # a failed unlink that happened anyway
                real.discard(name)
            else:
                real.add(name)
            cache.uncertain(DIR)
        else:
            cache.drop_all()
        for candidate in (b"a", b"b", b"c"):
            if cache.is_missing(DIR, candidate, 1.0):
                assert candidate not in real, (steps, candidate)


def test_idle_only_while_nothing_is_kept_or_read() -> None:
    """Peers' changes skip the listing work while idle; a read under way is not idle (a
    drop must still discard it)."""
    cache = ListingCache(10.0)
    assert cache.idle
    token = cache.begin_read(DIR)
    assert not cache.idle
    cache.finish_read(DIR, token, {b"a"}, None, read_at=0.0)
    assert not cache.idle
    cache.drop_all()
    assert cache.idle
