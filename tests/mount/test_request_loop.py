"""pyfuse3 reads requests through mailfs's cheaper wait (fs/session/dispatch.py), and
concurrent callers still get every answer right."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from tests.rigs.mount import MailfsMount, run_cli

WRITERS = 6
RECORDS = 300


def status(mountpoint: Path) -> dict:  # type: ignore[type-arg]
    result = run_cli("status", str(mountpoint), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def append_and_check(path: Path, tag: int, failures: list[str]) -> None:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for n in range(RECORDS):
                record = b"%02d:%04d\n" % (tag, n)
                os.write(fd, record)
                if os.fstat(fd).st_size != 8 * (n + 1):
                    failures.append(f"{path.name}: size {os.fstat(fd).st_size} after {n + 1}")
                    return
        finally:
            os.close(fd)
    except OSError as exc:
        failures.append(f"{path.name}: {exc}")


def test_concurrent_callers_through_the_fast_wait(mount: MailfsMount) -> None:
    before = status(mount.mountpoint)
    assert before["request_waits"]["fast"] is True
    (mount.mountpoint / "INBOX").mkdir()
    paths = [mount.mountpoint / "INBOX" / f"dovecot.index.log.{n}" for n in range(WRITERS)]
    paths += [mount.mountpoint / "INBOX" / f"u.{n}" for n in range(WRITERS)]  # passthrough
    failures: list[str] = []
    threads = [threading.Thread(target=append_and_check, args=(path, n, failures))
               for n, path in enumerate(paths)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    for n, path in enumerate(paths):
        assert path.read_bytes() == b"".join(b"%02d:%04d\n" % (n, i) for i in range(RECORDS))
    after = status(mount.mountpoint)
    requests = after["requests_total"] - before["requests_total"]
    waits = after["request_waits"]
    # Every request the loop read went through one of the two waits.
    assert (waits["immediate"] + waits["waited"]
            - before["request_waits"]["immediate"] - before["request_waits"]["waited"]
            >= requests)
