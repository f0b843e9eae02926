"""`mailfs flush --caches`: changes made on the backing store behind mailfs are seen at once.

Without it they are seen within the passthrough timeout (10 s by default), the time the
kernel trusts what it was told about a mail file, a directory, or a missing name.
"""

from __future__ import annotations

import os

from tests.mount.conftest import Dirs
from tests.rigs.mount import MailfsMount, run_cli


def test_flush_caches_shows_backing_changes_made_behind_the_mount(
        mount: MailfsMount, dirs: Dirs) -> None:
    folder = mount.mountpoint / "INBOX" / "new"
    folder.mkdir(parents=True)
    message = folder / "1.msg"
    message.write_bytes(b"first")
    assert message.read_bytes() == b"first"
    assert os.stat(message).st_size == 5
    later = folder / "2.msg"
    assert not later.exists()

    # Behind mailfs's back, as an MTA delivering straight to the shared store would.
    with open(dirs.backing / "INBOX" / "new" / "1.msg", "r+b") as backing_file:
        backing_file.write(b"FIRST, rewritten")
    (dirs.backing / "INBOX" / "new" / "2.msg").write_bytes(b"second")
    # The kernel still trusts what it was told: the test would prove nothing otherwise.
    assert os.stat(message).st_size == 5
    assert not later.exists()

    result = run_cli("flush", str(mount.mountpoint), "--caches")
    assert result.returncode == 0, result.stderr
    assert "caches dropped:" in result.stdout
    assert os.stat(message).st_size == len(b"FIRST, rewritten")
    assert message.read_bytes() == b"FIRST, rewritten"
    assert later.read_bytes() == b"second"

    result = run_cli("status", str(mount.mountpoint), "--json")
    assert '"caches_dropped": 1' in result.stdout
