"""Configuration: a TOML file, then command-line overrides, validated with clear errors."""

from __future__ import annotations

import hashlib
import math
import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from mailfs.errors import UserError
from mailfs.fs.classifier import DEFAULT_REPLICATED, DEFAULT_VOLATILE, validate_patterns

SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(value: object, key: str) -> int:
    if isinstance(value, bool):
        raise UserError(f"config: {key} must be a size like 256M, not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise UserError(f"config: {key} must not be negative")
        return value
    if isinstance(value, str):
        match = SIZE_RE.match(value)
        if match:
            return int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])
    raise UserError(f"config: {key} must be a size like 256M, not {value!r}")


@dataclass(frozen=True)
class Config:
    backing: Path = Path()
    mountpoint: Path = Path()
    state_dir: Path = Path("/var/lib/mailfs")
    run_dir: Path = Path("/run/mailfs")
    # RAM is a cache over LMDB: index files beyond this budget are read back on demand.
    ram_budget: int = 256 << 20
    lmdb_map_size: int = 64 << 30
    commit_interval: float = 1.0
    commit_bytes: int = 16 << 20
    # Index files change only through mailfs, which invalidates explicitly: cache long.
    index_timeout: float = 300.0
    # Passthrough entries may change behind our back (other writers on the shared path).
    passthrough_timeout: float = 10.0
    backing_threads: int = 16
    backing_timeout: float = 60.0
    import_on_access: bool = True
    allow_other: bool = True
    log_level: str = "INFO"
    metrics_port: int = 0
    replicated: tuple[str, ...] = DEFAULT_REPLICATED
    volatile: tuple[str, ...] = DEFAULT_VOLATILE
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def control_socket(self) -> Path:
        return control_socket_for(self.run_dir, self.mountpoint)


def control_socket_for(run_dir: Path, mountpoint: Path) -> Path:
    """One socket per mountpoint: a readable name plus a hash, so that no two collide."""
    real = os.path.realpath(mountpoint)
    tag = hashlib.sha256(os.fsencode(real)).hexdigest()[:16]
    name = os.path.basename(real)[:40] or "root"
    return run_dir / f"{name}-{tag}.sock"


# TOML layout: [mount] [cache] [commit] [backing] [classify] [log]
SECTIONS: dict[str, dict[str, str]] = {
    "mount": {"backing": "path", "mountpoint": "path", "state_dir": "path", "run_dir": "path",
              "allow_other": "bool", "import_on_access": "bool"},
    "cache": {"ram_budget": "size", "lmdb_map_size": "size", "index_timeout": "seconds",
              "passthrough_timeout": "seconds"},
    "commit": {"interval": "seconds", "max_pending": "size"},
    "backing": {"threads": "count", "timeout": "seconds"},
    "classify": {"replicated": "patterns", "volatile": "patterns"},
    "log": {"level": "level", "metrics_port": "port"},
}

RENAMES = {
    ("commit", "interval"): "commit_interval",
    ("commit", "max_pending"): "commit_bytes",
    ("backing", "threads"): "backing_threads",
    ("backing", "timeout"): "backing_timeout",
    ("log", "level"): "log_level",
}

LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR"}


def convert(kind: str, key: str, value: object) -> object:
    if kind == "path":
        if not isinstance(value, str) or not value:
            raise UserError(f"config: {key} must be a path string")
        return Path(value)
    if kind == "bool":
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false",
                                                         "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        if not isinstance(value, bool):
            raise UserError(f"config: {key} must be true or false")
        return value
    if kind == "size":
        return parse_size(value, key)
    if kind in ("seconds", "count", "port"):
        what = "a number of seconds" if kind == "seconds" else "a whole number"
        if isinstance(value, bool) or (kind != "seconds" and isinstance(value, float)):
            raise UserError(f"config: {key} must be {what}, not {value!r}")
        try:
            number = float(value) if kind == "seconds" else int(value)  # type: ignore[arg-type,call-overload]
        except (TypeError, ValueError):
            raise UserError(f"config: {key} must be {what}, not {value!r}") from None
        if not math.isfinite(number) or number < 0:
            raise UserError(f"config: {key} must be a finite, non-negative number")
        if kind == "port" and number > 65535:
            raise UserError(f"config: {key} must be a TCP port (0 to 65535), not {value!r}")
        return number
    if kind == "patterns":
        if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
            raise UserError(f"config: {key} must be a list of file-name patterns")
        bad = validate_patterns(value)
        if bad is not None:
            raise UserError(f"config: {key} has an invalid pattern {bad!r}")
        return tuple(value)
    if kind == "level":
        if not isinstance(value, str) or value.upper() not in LEVELS:
            raise UserError(f"config: {key} must be one of {', '.join(sorted(LEVELS))}")
        return value.upper()
    raise AssertionError(kind)


def field_name(section: str, key: str) -> str:
    return RENAMES.get((section, key), key)


def load_file(path: Path) -> dict[str, object]:
    if not str(path):
        raise UserError("config file path is empty")
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except PermissionError:
        raise UserError(f"config file {path} is not readable") from None
    except IsADirectoryError:
        raise UserError(f"config file {path} is a directory") from None
    except OSError as exc:
        raise UserError(f"config file {path} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config file {path} is not valid TOML: {exc}") from None
    values: dict[str, object] = {}
    for section, body in raw.items():
        if section not in SECTIONS:
            raise UserError(f"config file {path}: unknown section [{section}] "
                            f"(known: {', '.join(SECTIONS)})")
        if not isinstance(body, dict):
            raise UserError(f"config file {path}: [{section}] must be a table")
        for key, value in body.items():
            kind = SECTIONS[section].get(key)
            if kind is None:
                raise UserError(f"config file {path}: unknown key {key!r} in [{section}]")
            values[field_name(section, key)] = convert(kind, f"{section}.{key}", value)
    return values


# Flat names accepted on the command line (--set key=value) and in fstab -o options.
FLAT_KINDS = {field_name(s, k): kind for s, keys in SECTIONS.items() for k, kind in keys.items()}


def split_patterns(raw: str) -> list[str]:
    """Colon-separated patterns; "re:" glues to the regular expression after it."""
    patterns: list[str] = []
    glue = False
    for part in raw.split(":"):
        if glue:
            patterns[-1] += part
            glue = False
        elif part == "re":
            patterns.append("re:")
            glue = True
        elif part:
            patterns.append(part)
    return patterns


def apply_overrides(values: dict[str, object], overrides: dict[str, str]) -> None:
    for key, raw in overrides.items():
        name = key.replace("-", "_")
        kind = FLAT_KINDS.get(name)
        if kind is None:
            raise UserError(f"unknown option {key!r}")
        if kind == "patterns":
            values[name] = convert(kind, key, split_patterns(raw))
        else:
            values[name] = convert(kind, key, raw)


def build(config_file: Path | None, overrides: dict[str, object]) -> Config:
    values: dict[str, object] = {}
    if config_file is not None:
        values.update(load_file(config_file))
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(Config)}
    chosen: dict[str, Any] = {k: v for k, v in values.items() if k in known}
    config = replace(Config(), **chosen)
    validate(config)
    return config


def validate(config: Config) -> None:
    if config.commit_interval <= 0:
        raise UserError("config: commit.interval must be above 0")
    if config.backing_threads < 1:
        raise UserError("config: backing.threads must be at least 1")
    if config.ram_budget < 1 << 20:
        raise UserError("config: cache.ram_budget must be at least 1M")
    if config.lmdb_map_size < 16 << 20:
        raise UserError("config: cache.lmdb_map_size must be at least 16M")
    if config.commit_bytes < 64 << 10:
        raise UserError("config: commit.max_pending must be at least 64K")
    if config.backing_threads > 1024:
        raise UserError("config: backing.threads must be at most 1024")
    for name in ("state_dir", "run_dir"):
        if not str(getattr(config, name)) or str(getattr(config, name)) == ".":
            raise UserError(f"config: {name} must not be empty")
