"""Config parsing: the shipped example is valid, and overrides win."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailfs.config import apply_overrides, build, load_file, parse_size, split_patterns
from mailfs.errors import UserError
from mailfs.fs.classifier import Classifier, FileClass

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "mailfs.example.toml"


def test_example_config_is_valid() -> None:
    values = load_file(EXAMPLE)
    config = build(EXAMPLE, {"backing": Path("/b"), "mountpoint": Path("/m")})
    assert values["ram_budget"] == config.ram_budget == 256 << 20
    assert config.commit_interval == 1.0


def test_overrides_beat_the_file(tmp_path: Path) -> None:
    config = build(EXAMPLE, {"ram_budget": 8 << 20})
    assert config.ram_budget == 8 << 20


@pytest.mark.parametrize(("text", "size"), [("256M", 256 << 20), ("1g", 1 << 30),
                                            ("512KiB", 512 << 10), (4096, 4096)])
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text, "x") == size


@pytest.mark.parametrize("bad", ["lots", "-1M", True, -5, "1.5.5M"])
def test_bad_sizes(bad: object) -> None:
    with pytest.raises(UserError):
        parse_size(bad, "x")


@pytest.mark.parametrize(("name", "cls"), [
    (b"dovecot.index", FileClass.REPLICATED),
    (b"dovecot.index.log", FileClass.REPLICATED),
    (b"dovecot.index.log.2", FileClass.REPLICATED),
    (b"dovecot.index.tmp", FileClass.REPLICATED),
    (b"dovecot.index.cache", FileClass.REPLICATED),
    (b"dovecot.list.index.log", FileClass.REPLICATED),
    (b"dovecot.map.index", FileClass.REPLICATED),
    (b"dovecot-uidlist", FileClass.REPLICATED),
    (b"dovecot-uidvalidity.5f3a2b1c", FileClass.REPLICATED),
    (b"subscriptions", FileClass.REPLICATED),
    (b"dovecot.index.log.newlock", FileClass.VOLATILE),
    (b"dovecot-uidlist.lock", FileClass.VOLATILE),
    (b"mailboxes.lock9c1d576f25952f83", FileClass.VOLATILE),
    (b"dovecot-uidlist.tmp", FileClass.REPLICATED),
    (b"x.lockfile", FileClass.PASSTHROUGH),
    (b"u.1", FileClass.PASSTHROUGH),
    (b"m.3", FileClass.PASSTHROUGH),
    (b"1700000000.M1P2.host,S=100:2,S", FileClass.PASSTHROUGH),
    (b".temp.host.12345.abc", FileClass.PASSTHROUGH),
    (b"maildirfolder", FileClass.PASSTHROUGH),
])
def test_default_classes(name: bytes, cls: FileClass) -> None:
    assert Classifier().classify(name) is cls


def test_pattern_overrides_split_on_colons() -> None:
    assert split_patterns("*.lock:re:.*\\.lock[0-9a-f]+:dovecot.index") == [
        "*.lock", "re:.*\\.lock[0-9a-f]+", "dovecot.index"]
    with pytest.raises(UserError, match="invalid pattern"):
        apply_overrides({}, {"volatile": "re:("})
