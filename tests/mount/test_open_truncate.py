"""open(O_TRUNC) truncates, in every file class.

libfuse negotiates atomic O_TRUNC: the kernel sends no setattr for it and drops its own
pages and size, trusting open() to truncate. mailfs ignored the flag, so a shorter rewrite
kept the old tail, and the kernel's size disagreed with the daemon's: pages that other
processes had mapped were cut off under them (SIGBUS in Dovecot, issue 7).
"""

from __future__ import annotations

import mmap
import os

import pytest

from tests.rigs.mount import MailfsMount

NAMES = {
    "replicated": "dovecot.index.tmp",
    "volatile": "dovecot-uidlist.lock",
    "passthrough": "u.1",
}


@pytest.mark.parametrize("file_class", sorted(NAMES))
def test_open_with_o_trunc_truncates(mount: MailfsMount, file_class: str) -> None:
    path = mount.mountpoint / NAMES[file_class]
    path.write_bytes(b"old index content " * 1000)
    fd = os.open(path, os.O_RDWR | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
        os.write(fd, b"new")
    finally:
        os.close(fd)
    assert path.read_bytes() == b"new"
    assert path.stat().st_size == 3


def test_a_mapping_reads_what_a_truncating_rewrite_wrote(mount: MailfsMount) -> None:
    """Another process's map of an index file sees the rewrite, never stale or cut pages."""
    path = mount.mountpoint / "dovecot.index.cache"
    path.write_bytes(b"a" * 16384)  # the rewrite is shorter: an ignored O_TRUNC shows
    reader = os.open(path, os.O_RDONLY)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, b"b" * 8192)
        finally:
            os.close(fd)
        with mmap.mmap(reader, 8192, prot=mmap.PROT_READ) as mapped:
            assert mapped[:] == b"b" * 8192
        assert os.fstat(reader).st_size == 8192
    finally:
        os.close(reader)
