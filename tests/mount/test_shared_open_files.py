"""Several processes holding one mail file open: what Dovecot does with a shared mailbox.

Pins the root cause of Dovecot panics with 3-4 clients per mdbox mailbox (issue 7):
getattr of an open passthrough file fstat()ed the descriptor of *any* open handle of the
file on a worker thread, while release closed that descriptor. An open() in between reused
the number, so the fstat described another file (a wrong size made the kernel cut its page
cache: `i_stream_read_memarea` panics, SIGBUS) or failed with EBADF (`stat(m.5) failed:
Bad file descriptor`).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.rigs.mount import MailfsMount

HAMMER_SECONDS = 5.0
CONTENDED_CPU = 0


@contextlib.contextmanager
def contended_cpu(pid: int) -> Iterator[None]:
    """Every thread of the daemon shares one CPU with two busy loops.

    Dovecot hit the race on a loaded 2-core machine: a worker thread that is slow to run
    leaves the trio thread time to serve a release and an open in between. Crowding one
    CPU reproduces that load on purpose instead of by chance.
    """
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), {CONTENDED_CPU})
    hogs = [subprocess.Popen(["taskset", "-c", str(CONTENDED_CPU), "sh", "-c",
                              "while :; do :; done"]) for _ in range(2)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def test_fstat_never_sees_another_file_while_handles_come_and_go(
        make_mount) -> None:  # type: ignore[no-untyped-def]
    # Zero attribute timeout: every fstat reaches the daemon, as it does for Dovecot
    # after each append invalidates the kernel's attributes.
    mount: MailfsMount = make_mount(("-o", "passthrough_timeout=0"))
    storage = mount.mountpoint / "storage"
    storage.mkdir()
    appended = storage / "m.1"
    others = [storage / f"m.{n}" for n in range(2, 6)]
    appended.write_bytes(b"")
    for n, other in enumerate(others):
        other.write_bytes(b"o" * (100_000 + n))

    stop = threading.Event()
    problems: list[str] = []

    def churn(path: os.PathLike[str]) -> None:
        """Hold short-lived handles of m.1 (the ones getattr may pick) and of other files,
        so descriptor numbers are closed and reused all the time."""
        while not stop.is_set():
            opened = [os.open(path, os.O_RDONLY)]
            try:
                opened += [os.open(other, os.O_RDONLY) for other in others]
            finally:
                for number in opened:
                    os.close(number)

    def append_and_fstat() -> None:
        size = 0
        while not stop.is_set():
            fd = os.open(appended, os.O_WRONLY | os.O_APPEND)
            try:
                size += os.write(fd, b"x" * 17)
                seen = os.fstat(fd).st_size
                if seen != size:
                    problems.append(f"fstat said {seen} bytes, the file has {size}")
            finally:
                os.close(fd)

    def recorded(work: Callable[..., None], *args: object) -> threading.Thread:
        def run() -> None:
            try:
                work(*args)
            except OSError as exc:
                problems.append(f"{work.__name__}: {exc}")
                stop.set()
        return threading.Thread(target=run)

    threads = [recorded(churn, appended) for _ in range(3)]
    threads.append(recorded(append_and_fstat))
    assert mount.process is not None
    with contended_cpu(mount.process.pid):
        for thread in threads:
            thread.start()
        time.sleep(HAMMER_SECONDS)
        stop.set()
        for thread in threads:
            thread.join()
    assert problems == [], f"{len(problems)} wrong answers, first: {problems[:3]}"
    assert appended.stat().st_size > 0
