"""Prometheus gauges from the status, including one labelled family per peer field."""

from __future__ import annotations

from mailfs.metrics import StatusCollector


def test_replication_status_becomes_gauges_with_a_peer_label() -> None:
    status = {
        "pid": 1, "commits": 3, "healthy": True, "mountpoint": "/srv/mail",
        "replication": {
            "seq": 42, "degraded": False, "node_id": "a",
            "peers": {
                "b": {"acked_seq": 40, "connected": True, "last_error": ""},
                "c": {"acked_seq": 7, "connected": False, "last_error": "refused"},
            },
        },
    }
    families = {family.name: family for family in StatusCollector(lambda: status).collect()}
    assert "mailfs_pid" not in families and "mailfs_mountpoint" not in families
    assert families["mailfs_commits"].samples[0].value == 3
    assert families["mailfs_healthy"].samples[0].value == 1
    assert families["mailfs_replication_seq"].samples[0].value == 42
    acked = {s.labels["peer"]: s.value for s in families["mailfs_peer_acked_seq"].samples}
    assert acked == {"b": 40, "c": 7}
    connected = {s.labels["peer"]: s.value for s in families["mailfs_peer_connected"].samples}
    assert connected == {"b": 1, "c": 0}
    assert "mailfs_peer_last_error" not in families
