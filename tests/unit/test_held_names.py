"""HeldNames: which passthrough names the kernel may still hold, by user."""

from __future__ import annotations

from mailfs.fs.held_names import HeldNames


def test_a_users_names_are_taken_once_and_only_while_the_kernel_may_hold_them() -> None:
    held = HeldNames(ttl=10.0)
    held.handed(b"alice", 5, b"u.1", now=0.0)
    held.handed(b"alice", 5, b"u.2", now=8.0)
    held.handed(b"bob", 7, b"u.1", now=8.0)
    assert sorted(held.take_user(b"alice", now=12.0)) == [(5, b"u.2")]  # u.1: gone at 10 + GRACE
    assert held.take_user(b"alice", now=12.0) == []
    assert held.take_user(b"bob", now=12.0) == [(7, b"u.1")]
    assert len(held) == 0


def test_a_name_handed_again_counts_from_then_and_for_its_new_user() -> None:
    held = HeldNames(ttl=10.0)
    held.handed(b"alice", 5, b"x", now=0.0)
    held.handed(b"bob", 5, b"x", now=9.0)  # its directory now belongs to bob (a rename)
    assert held.take_user(b"alice", now=15.0) == []
    assert held.take_user(b"bob", now=15.0) == [(5, b"x")]


def test_the_bound_forgets_the_oldest_and_counts_names_the_kernel_may_still_hold() -> None:
    held = HeldNames(ttl=10.0, max_names=2)
    held.handed(b"alice", 1, b"a", now=0.0)
    held.handed(b"alice", 1, b"b", now=1.0)
    held.handed(b"bob", 2, b"c", now=2.0)
    assert len(held) == 2
    assert held.forgotten == 1
    assert held.take_user(b"alice", now=3.0) == [(1, b"b")]
    assert held.take_all(now=3.0) == [(2, b"c")]
    assert len(held) == 0
