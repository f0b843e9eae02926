"""Regression tests for replication bugs found on real clusters (each failed before its fix)."""

from __future__ import annotations

import os
import threading
import time

from tests.cluster.conftest import MakeCluster
from tests.rigs.cluster import wait_for


def test_restarted_peer_never_pushes_a_snapshot_over_a_writing_node(
        make_cluster: MakeCluster) -> None:
    """A peer that restarted treated a writer-only node (nothing applied from others) as a
    new, empty peer and sent it its whole state; the writer installed it and lost the
    appends it made while the snapshot travelled."""
    cluster = make_cluster()
    a, b = cluster[0], cluster[1]
    box = a.path("box")
    box.mkdir()
    (box / "dovecot.index.cache").write_bytes(os.urandom(4 << 20))
    log_path = box / "dovecot.index.log"
    fd = os.open(log_path, os.O_RDWR | os.O_CREAT, 0o600)
    stop = threading.Event()
    written = 0
    errors: list[OSError] = []

    def writer() -> None:
        nonlocal written
        while not stop.is_set():
            try:
                os.pwrite(fd, b"%09d\n" % written, written * 10)
            except OSError as exc:
                errors.append(exc)
                return
            written += 1
            time.sleep(0.001)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        wait_for(lambda: written >= 100 or bool(errors), what="the writer to get going")
        b.stop()
        b.start()
        wait_for(lambda: a.replication()["peers"]["b"]["connected"], what="b reconnected")
        time.sleep(2)
    finally:
        stop.set()
        thread.join()
        os.close(fd)
    assert not errors, errors
    expected = b"".join(b"%09d\n" % i for i in range(written))
    assert log_path.read_bytes() == expected
    # b was away for a moment, well within the log: no snapshot in either direction.
    assert "snapshot" not in a.log()
    assert "sending a snapshot" not in b.log()
    cluster.wait_converged()
    assert cluster.problems() == []
