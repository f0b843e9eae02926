"""What the store said about a passthrough file stands in for asking again only while fresh."""

from __future__ import annotations

from mailfs.fs.freshness import MAX_USERS, Freshness


def test_a_reading_is_fresh_for_the_ttl_from_when_it_was_asked() -> None:
    freshness = Freshness(ttl=10.0)
    assert freshness.fresh(100.0, b"alice", 109.9)
    assert not freshness.fresh(100.0, b"alice", 110.0)


def test_a_drop_for_one_user_stales_only_that_users_earlier_readings() -> None:
    freshness = Freshness(ttl=10.0)
    freshness.drop_user(b"alice", 105.0)
    assert not freshness.fresh(104.0, b"alice", 106.0)
    assert not freshness.fresh(105.0, b"alice", 106.0)  # asked at the drop: may straddle it
    assert freshness.fresh(105.5, b"alice", 106.0)
    assert freshness.fresh(104.0, b"bob", 106.0)


def test_a_drop_of_everything_stales_every_earlier_reading() -> None:
    freshness = Freshness(ttl=10.0)
    freshness.drop_user(b"alice", 101.0)
    freshness.drop_all(105.0)
    assert not freshness.fresh(104.0, b"bob", 106.0)
    assert not freshness.fresh(104.0, None, 106.0)
    assert freshness.fresh(105.5, b"bob", 106.0)
    assert freshness.dropped == 2


def test_many_users_are_pruned_without_making_any_stale_reading_fresh() -> None:
    freshness = Freshness(ttl=10.0)
    for number in range(MAX_USERS):
        freshness.drop_user(b"old%d" % number, 100.0)
    freshness.drop_user(b"alice", 115.0)  # past the bound: drops older than the ttl go
    freshness.drop_user(b"bob", 116.0)
    assert len(freshness._user_before) == 2
    assert not freshness.fresh(114.0, b"alice", 116.0)
    # A reading from before the forgotten drops is past the ttl anyway.
    assert not freshness.fresh(99.0, b"old1", 116.0)


def test_more_users_within_the_ttl_than_the_bound_drop_everything() -> None:
    freshness = Freshness(ttl=10.0)
    for number in range(MAX_USERS + 1):
        freshness.drop_user(b"user%d" % number, 100.0)
    assert len(freshness._user_before) == 0
    assert not freshness.fresh(99.5, b"someone else", 100.5)
    assert freshness.fresh(100.2, b"someone else", 100.5)
