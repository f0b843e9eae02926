"""Fixtures for real-Dovecot tests: a mail store (see tests/rigs/mailstore.py for the layouts)
and a Dovecot on it."""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rigs.dovecot import MAIL_FORMATS, Dovecot
from tests.rigs.mailstore import BACKENDS, SSHFS_BACKENDS, MailStore
from tests.rigs.mount import is_mounted
from tests.rigs.sshfs import sshfs_unusable


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Not tmp_path: /tmp/pytest-of-root is 0700, and vmail must reach the mail root.
    path = Path(tempfile.mkdtemp(prefix="mfs-dc-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    if not is_mounted(path / "mnt"):  # never rmtree through a mount that refused to go
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=MAIL_FORMATS)
def mail_format(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store(backend: str, workdir: Path) -> Iterator[MailStore]:
    # e.g. MAILFS_TEST_MOUNT_ARGS="--debug -o index_timeout=0" to rerun the suite another way
    extra_args = shlex.split(os.environ.get("MAILFS_TEST_MOUNT_ARGS", ""))
    if backend in SSHFS_BACKENDS and (reason := sshfs_unusable()) is not None:
        pytest.skip(reason)
    mail_store = MailStore(backend, workdir, extra_args)
    try:
        mail_store.start()
        yield mail_store
    finally:
        try:
            mail_store.close()
        finally:
            # pytest shows this only when the test fails.
            print(f"--- mailfs log ({backend})\n{mail_store.log()[-20000:]}")


@pytest.fixture
def dovecot(store: MailStore, workdir: Path, mail_format: str) -> Iterator[Dovecot]:
    server = Dovecot(workdir / "dovecot", store.root, mail_format, index_root=store.index_root)
    try:
        server.start()
        yield server
    finally:
        try:
            server.stop()
        finally:
            server.kill()
            print(f"--- dovecot log\n{server.log_text()[-20000:]}")
