"""Fixtures for tests against a real mailfs mount in a subprocess."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.rigs.mount import MailfsMount, force_unmount


@dataclass
class Dirs:
    backing: Path
    mnt: Path
    state: Path


@pytest.fixture
def dirs() -> Iterator[Dirs]:
    # Not pytest's tmp_path: that sits under a 0700 directory, and tests act as other users.
    base = Path(tempfile.mkdtemp(prefix="mailfs-test-"))
    base.chmod(0o755)
    result = Dirs(base / "backing", base / "mnt", base / "state")
    for path in (result.backing, result.mnt, result.state):
        path.mkdir()
        path.chmod(0o755)
    yield result
    force_unmount(result.mnt)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def make_mount(dirs: Dirs) -> Iterator[type[MailfsMount] | object]:
    """Start mounts over `dirs`; every one is taken down, and its log checked, at the end."""
    started: list[tuple[MailfsMount, bool]] = []

    def start(extra_args: tuple[str, ...] = (), expect_errors: bool = False) -> MailfsMount:
        mount = MailfsMount(dirs.backing, dirs.mnt, dirs.state, extra_args)
        started.append((mount, expect_errors))
        return mount.start()

    yield start
    problems = []
    for mount, expect_errors in started:
        try:
            mount.stop()
        except Exception as exc:  # still kill and report below
            problems.append(f"stop failed: {exc}")
        finally:
            mount.kill()
        if not expect_errors:
            problems += mount.problems()
    assert not problems, "\n".join(problems)


@pytest.fixture
def mount(make_mount):  # type: ignore[no-untyped-def]
    return make_mount()


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory other users can reach, with `local` (plain ext4, for comparisons),
    `backing` and `mnt` in it; anything still mounted at `mnt` is taken down after."""
    path = Path(tempfile.mkdtemp(prefix="mailfs-compare-"))
    path.chmod(0o755)
    for name in ("local", "backing", "mnt"):
        (path / name).mkdir()
        (path / name).chmod(0o755)
    yield path
    force_unmount(path / "mnt")
    shutil.rmtree(path, ignore_errors=True)
