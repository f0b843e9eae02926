"""The kernel invalidator's scheduling: every name goes to the kernel twice, not more.

The kernel calls themselves need a mount (the cluster tests make them); here `_notify` only
records what it was given.
"""

from __future__ import annotations

import trio

from mailfs.fs.invalidation import ENTRY_RECHECK, KernelInvalidator


class Recording(KernelInvalidator):
    def __init__(self) -> None:
        super().__init__()
        self.batches: list[tuple[set[int], set[tuple[int, bytes]]]] = []

    def _notify(self, inodes: set[int], entries: set[tuple[int, bytes]]) -> None:
        self.batches.append((set(inodes), set(entries)))


def sent_entries(invalidator: Recording) -> list[tuple[int, bytes]]:
    return [entry for _, entries in invalidator.batches for entry in sorted(entries)]


async def test_each_name_is_invalidated_again_once_a_late_lookup_reply_has_landed() -> None:
    invalidator = Recording()
    async with trio.open_nursery() as nursery:
        await nursery.start(invalidator.run)
        invalidator.entry(1, b"dovecot-uidlist")
        invalidator.inode(7)
        await trio.sleep(ENTRY_RECHECK / 4)
        assert sent_entries(invalidator) == [(1, b"dovecot-uidlist")]
        await trio.sleep(ENTRY_RECHECK * 3)
        assert sent_entries(invalidator) == [(1, b"dovecot-uidlist")] * 2
        # Inodes once: the kernel drops attributes from replies older than an invalidation.
        assert sum(7 in inodes for inodes, _ in invalidator.batches) == 1
        # A new change to a name waiting for its second pass gets two passes of its own.
        invalidator.entry(2, b"a")
        await trio.sleep(ENTRY_RECHECK / 2)
        invalidator.entry(2, b"a")
        await trio.sleep(ENTRY_RECHECK * 3)
        assert sent_entries(invalidator).count((2, b"a")) >= 3
        nursery.cancel_scope.cancel()
