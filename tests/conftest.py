"""Shared test setup. Rig code lives in tests/rigs/; fixtures for one suite live next to it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.rigs.dovecot import dovecot_available


def _dovecot_unusable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (Dovecot drops to vmail, mailfs mounts with allow_other)"
    if not dovecot_available():
        return "Dovecot is not installed (run `make setup`)"
    if not Path("/dev/fuse").exists():
        return "/dev/fuse is missing"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _dovecot_unusable()
    # In CI a missing prerequisite is a broken setup, which must fail rather than hide.
    if reason is None or os.environ.get("CI"):
        return
    for item in items:
        if item.get_closest_marker("dovecot"):
            item.add_marker(pytest.mark.skip(reason=reason))
