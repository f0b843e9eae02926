"""A file exerciser in the manner of fsx: random operations on one file, checked against a
model of what its content must be after each of them.

fsx (from xfstests and LTP) is how filesystem data paths are usually shaken out: writes at
any offset, reads, shared mappings written and read, truncates up and down, appends from a
second descriptor, in-kernel copies, O_DIRECT reads and writes (fsx -Z) and reopens, each
checked byte for byte. Dovecot does most of these to its index files (pwrite into
dovecot.index.cache, MAP_SHARED reads of dovecot.index, O_APPEND to dovecot.index.log,
ftruncate on rewrites), and the kernel's page cache sits between it and mailfs, so a size
or a page that the kernel and the daemon see differently shows up here as a wrong byte.

The sequence is fixed by the seed; a failure names the seed, the operation number and the
operations before it.
"""

from __future__ import annotations

import mmap
import os
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

PAGE = mmap.PAGESIZE


class Mismatch(AssertionError):
    pass


@dataclass
class Exerciser:
    path: Path
    seed: int
    max_size: int = 192 * 1024
    max_io: int = 24 * 1024
    # Also O_DIRECT reads and writes (fsx -Z) from a second descriptor, mixed with the rest.
    direct: bool = True
    done: int = 0
    model: bytearray = field(default_factory=bytearray)
    history: deque[str] = field(default_factory=lambda: deque(maxlen=12))

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.operations: list[tuple[int, Callable[[], str]]] = [
            (30, self.write), (20, self.read), (10, self.map_read), (10, self.map_write),
            (10, self.truncate), (6, self.append), (5, self.copy_range), (5, self.reopen),
            (3, self.fsync),
        ]
        if self.direct:
            self.operations += [(5, self.direct_write), (5, self.direct_read)]

    def close(self) -> None:
        os.close(self.fd)

    def run(self, count: int) -> None:
        weights = [weight for weight, _ in self.operations]
        actions = [action for _, action in self.operations]
        for _ in range(count):
            action = self.rng.choices(actions, weights)[0]
            self.history.append(action())
            self.done += 1
            self.check_size()
        self.check_whole_file()

    # -- checks --------------------------------------------------------------------------

    def fail(self, what: str) -> Mismatch:
        return Mismatch(f"{self.path.name}, seed {self.seed}, operation {self.done}: {what}\n"
                        "last operations:\n  " + "\n  ".join(self.history))

    def check_size(self) -> None:
        size = os.fstat(self.fd).st_size
        if size != len(self.model):
            raise self.fail(f"fstat size {size}, expected {len(self.model)}")

    def compare(self, got: bytes, offset: int, how: str) -> None:
        want = bytes(self.model[offset:offset + len(got)])
        if got == want:
            return
        first = next(i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b) \
            if len(got) == len(want) else min(len(got), len(want))
        raise self.fail(f"{how} at {offset}+{len(got)}: first wrong byte at "
                        f"{offset + first} (got {got[first:first + 8].hex()}, "
                        f"expected {want[first:first + 8].hex()})")

    def check_whole_file(self) -> None:
        self.check_size()
        with open(self.path, "rb") as fresh:
            content = fresh.read()
        if len(content) != len(self.model):
            raise self.fail(f"a fresh open reads {len(content)} bytes, expected {len(self.model)}")
        self.compare(content, 0, "whole-file read through a fresh open")

    # -- operations ----------------------------------------------------------------------

    def _data(self, length: int) -> bytes:
        # Fresh random bytes each time, so a stale page shows up as a wrong byte.
        return self.rng.randbytes(length)

    def _extend_to(self, size: int) -> None:
        if size > len(self.model):
            self.model.extend(bytes(size - len(self.model)))

    def _range(self) -> tuple[int, int]:
        """Where to write: anywhere below max_size, holes included."""
        offset = self.rng.randrange(0, self.max_size - 1)
        length = self.rng.randrange(1, self.max_io + 1)
        return offset, min(length, self.max_size - offset)

    def _wrote(self, how: str, offset: int, data: bytes, written: int) -> str:
        """Check a write's count and apply it to the model."""
        if written != len(data):
            raise self.fail(f"{how} of {len(data)} at {offset} wrote {written}")
        self._extend_to(offset + len(data))
        self.model[offset:offset + len(data)] = data
        return f"{how} {offset}+{len(data)}"

    def write(self) -> str:
        offset, length = self._range()
        data = self._data(length)
        return self._wrote("pwrite", offset, data, os.pwrite(self.fd, data, offset))

    def read(self) -> str:
        if not self.model:
            return "read skipped (empty)"
        # Sometimes past the end: a short read there must be exactly as short.
        offset = self.rng.randrange(0, len(self.model) + 1024)
        length = self.rng.randrange(1, self.max_io + 1)
        got = os.pread(self.fd, length, offset)
        expected = max(0, min(length, len(self.model) - offset))
        if len(got) != expected:
            raise self.fail(f"pread {offset}+{length} returned {len(got)} bytes, "
                            f"expected {expected}")
        self.compare(got, offset, "pread")
        return f"pread {offset}+{length}"

    def map_read(self) -> str:
        if not self.model:
            return "mapread skipped (empty)"
        size = len(self.model)
        offset = self.rng.randrange(0, size)
        length = self.rng.randrange(1, min(self.max_io, size - offset) + 1)
        with mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as mapped:
            got = mapped[offset:offset + length]
        self.compare(got, offset, "read through a shared mapping")
        return f"mapread {offset}+{length}"

    def map_write(self) -> str:
        offset, length = self._range()
        end = offset + length
        if end > len(self.model):
            os.ftruncate(self.fd, end)
            self._extend_to(end)
        data = self._data(length)
        with mmap.mmap(self.fd, len(self.model), mmap.MAP_SHARED,
                       mmap.PROT_READ | mmap.PROT_WRITE) as mapped:
            mapped[offset:end] = data
            mapped.flush()
        self.model[offset:end] = data
        return f"mapwrite {offset}+{length}"

    def truncate(self) -> str:
        size = self.rng.randrange(0, self.max_size)
        os.ftruncate(self.fd, size)
        if size < len(self.model):
            del self.model[size:]
        else:
            self._extend_to(size)
        return f"truncate {size}"

    def append(self) -> str:
        length = self.rng.randrange(1, min(self.max_io, self.max_size - len(self.model)) + 1) \
            if len(self.model) < self.max_size else 0
        if not length:
            return "append skipped (full)"
        data = self._data(length)
        appender = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            written = os.write(appender, data)
        finally:
            os.close(appender)
        if written != len(data):
            raise self.fail(f"append of {len(data)} wrote {written}")
        self.model.extend(data)
        return f"append {length} at {len(self.model) - length}"

    def copy_range(self) -> str:
        if not self.model:
            return "copy skipped (empty)"
        source = self.rng.randrange(0, len(self.model))
        length = self.rng.randrange(1, min(self.max_io, len(self.model) - source) + 1)
        # The kernel refuses overlapping ranges within one file.
        target = self.rng.randrange(0, self.max_size - length)
        if target < source + length and source < target + length:
            return "copy skipped (overlap)"
        copied = os.copy_file_range(self.fd, self.fd, length, source, target)
        chunk = bytes(self.model[source:source + copied])
        self._extend_to(target + copied)
        self.model[target:target + copied] = chunk
        return f"copy_file_range {source}+{length} -> {target} ({copied} copied)"

    def _direct_range(self, limit: int) -> tuple[int, int]:
        pages = max(limit // PAGE, 1)
        offset = self.rng.randrange(0, pages) * PAGE
        length = self.rng.randrange(1, 5) * PAGE
        return offset, min(length, (self.max_size // PAGE) * PAGE - offset)

    def direct_write(self) -> str:
        offset, length = self._direct_range(self.max_size - 4 * PAGE)
        data = self._data(length)
        direct = os.open(self.path, os.O_RDWR | os.O_DIRECT)
        try:
            with mmap.mmap(-1, length) as aligned:  # O_DIRECT wants page-aligned memory
                aligned[:] = data
                written = os.pwritev(direct, [aligned], offset)
        finally:
            os.close(direct)
        return self._wrote("O_DIRECT write", offset, data, written)

    def direct_read(self) -> str:
        if not self.model:
            return "direct read skipped (empty)"
        offset, length = self._direct_range(len(self.model))
        direct = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
        try:
            with mmap.mmap(-1, length) as aligned:
                count = os.preadv(direct, [aligned], offset)
                got = aligned[:count]
        finally:
            os.close(direct)
        expected = max(0, min(length, len(self.model) - offset))
        if count != expected:
            raise self.fail(f"O_DIRECT read {offset}+{length} returned {count} bytes, "
                            f"expected {expected}")
        self.compare(got, offset, "O_DIRECT read")
        return f"direct read {offset}+{length}"

    def reopen(self) -> str:
        os.close(self.fd)
        self.fd = os.open(self.path, os.O_RDWR)
        return "close and reopen"

    def fsync(self) -> str:
        os.fsync(self.fd)
        return "fsync"


def exercise(path: Path, seed: int, count: int) -> None:
    exerciser = Exerciser(path, seed)
    try:
        exerciser.run(count)
    finally:
        exerciser.close()
