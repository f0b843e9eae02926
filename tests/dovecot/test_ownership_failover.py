"""kill -9 of the node serving a user, under IMAP load; Dovecot on the other node takes
over; the killed node comes back (tests/rigs/failover.py has the scenario).

With sync durability and mail_fsync=always nothing A's client was told of may be missing
on B. With async some may be: the count is printed (bench/failover.py collects it). In
both, A's return must leave B's mailbox and Dovecot untouched, and A must end with B's
bytes, knowing that it lost the user.
"""

from __future__ import annotations

import pytest

from tests.rigs.failover import failover_rig, run_failover

pytestmark = [pytest.mark.dovecot, pytest.mark.timeout(600)]


@pytest.mark.parametrize("durability", ["async", "sync"])
@pytest.mark.parametrize(("mail_format", "layout"), [
    ("maildir", "full"), ("sdbox", "full"), ("mdbox", "full"), ("sdbox", "index-only")])
def test_a_killed_owner_comes_back_fenced_and_converges(
        mail_format: str, layout: str, durability: str) -> None:
    with failover_rig(mail_format, durability, index_only=layout == "index-only") as rig:
        result = run_failover(rig)
        print(f"failover {mail_format} {layout} {durability}: {result}")
        assert result.acknowledged_appends > 0
        if durability == "sync":
            assert result.lost_appends == [] and result.lost_stores == []
        assert result.a_owner_view == ("b", 2, True)
        assert not result.b_state_changed_by_return
        assert result.dovecot_b_trouble_after_return == []
        # mailfs itself logged nothing unexpected anywhere: fencing is an ERROR by design.
        allowed = ["FENCED", "SYNC REPLICATION DEGRADED"]
        assert rig.cluster.problems(allowed=allowed) == []
