"""Regression tests for MetaStore and Journal faults, without the kernel."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

import pytest
import trio

from mailfs.cachemgr import journal as journal_module
from mailfs.cachemgr.metastore import MetaStore

MODE = stat.S_IFREG | 0o600


def open_store(path: Path) -> MetaStore:
    store = MetaStore(path, ram_budget=64 << 20, map_size=256 << 20, commit_interval=1.0,
                      commit_bytes=1 << 30)
    store.recover()
    return store


def test_failed_journal_rotate_never_writes_into_a_reused_fd(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit whose journal rotation fails (EMFILE/ENOSPC) must not leave Journal.fd
    pointing at a closed descriptor that the next open() reuses for another file."""
    store = open_store(tmp_path / "state")
    stored = store.create(b"", b"dovecot.index.log", MODE, 8, 8)
    store.write(stored, 0, b"before")
    real_open = os.open

    def failing_open(path, flags, mode=0o777):  # type: ignore[no-untyped-def]
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(journal_module.os, "open", failing_open)
    with pytest.raises(OSError):
        trio.run(store.commit)  # rotate() closed the fd, then failed to open the next one
    monkeypatch.setattr(journal_module.os, "open", real_open)

    # Some unrelated file (a maildir message opened by the backing pool) may get a freed
    # descriptor number; the journal must not be holding that number.
    mail = tmp_path / "message"
    mail_fd = os.open(mail, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            store.write(stored, 6, b"after")  # may fail; must not write elsewhere
    finally:
        os.close(mail_fd)
    assert mail.read_bytes() == b"", "a journal record was written into the mail file"
    trio.run(store.sync)
    assert bytes(store.get(stored.fid).content) == b"beforeafter"
    store.close()
