"""Configuration: a TOML file, then command-line overrides, validated with clear errors."""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from mailfs.errors import UserError, read_small_file
from mailfs.fs.classifier import DEFAULT_REPLICATED, DEFAULT_VOLATILE, validate_patterns
from mailfs.mounts import real_mountpoint
from mailfs.replication.identity import node_namespace

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


# Node ids and cluster names: also a DNS name in the node's TLS certificate.
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
HOST_RE = re.compile(r"[A-Za-z0-9._-]+")
NAME_RULE = "1 to 64 letters, digits, '.', '_' or '-'"


def is_name(value: object) -> bool:
    return isinstance(value, str) and NAME_RE.fullmatch(value) is not None


def parse_address(value: str, key: str) -> tuple[str, int]:
    """Split "host:port" or "[v6 address]:port" into (host without brackets, port)."""
    host, _, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            host = ""
    elif not HOST_RE.fullmatch(host):
        host = ""
    valid_port = port.isascii() and port.isdigit() and 1 <= int(port) <= 65535
    if not host or not valid_port:
        raise UserError(f"config: {key} must look like host:port or [v6 address]:port "
                        f"with a port from 1 to 65535, not {value!r}")
    return host, int(port)


@dataclass(frozen=True)
class Peer:
    node_id: str
    host: str
    port: int


def parse_peer(value: object, key: str) -> Peer:
    """Parse one "id@host:port" entry of replication.peers."""
    if not isinstance(value, str) or "@" not in value:
        raise UserError(f"config: {key} entries must look like id@host:port, not {value!r}")
    node_id, _, address = value.partition("@")
    if not is_name(node_id):
        raise UserError(f"config: {key} has an invalid node id {node_id!r} ({NAME_RULE})")
    host, port = parse_address(address, f"{key} entry {node_id!r}")
    return Peer(node_id, host, port)


@dataclass(frozen=True)
class Config:
    # "full": the whole mail_location, mail passed through to `backing`. "index-only":
    # Dovecot's INDEX/CONTROL only; every file and directory in the meta store, no backing.
    mode: str = "full"
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
    # libfuse's default makes the kernel re-read a page after every write to it (about one
    # READ and one GETATTR per IMAP operation). mailfs invalidates what changes behind the
    # kernel itself, and a passthrough file whose size or mtime changed at open is not
    # served from the page cache, so the default is off.
    auto_inval_data: bool = False
    backing_threads: int = 16
    backing_timeout: float = 60.0
    # Whether the backing store keeps a file's inode number for the file's life (NFS,
    # GlusterFS, MooseFS, CephFS, AFS do; sshfs renumbers files it forgot). "auto":
    # unstable on the FUSE stores known to renumber (backing.RENUMBERING_TYPES).
    backing_inodes: str = "auto"
    # Where backing system calls run: "inline" on the trio thread (no handoff, but a call
    # that hangs freezes the mount), "threads" on the worker pool with `backing_timeout`.
    # "auto": inline on local filesystems (backing.LOCAL_TYPES), threads otherwise.
    backing_calls: str = "auto"
    import_on_access: bool = True
    allow_other: bool = True
    # After a daemon crash, processes on the mount wait up to this long (instead of getting
    # ENOTCONN) for their supervisor to stop them; 0: the connection dies with the daemon.
    crash_hold: float = 30.0
    # Kill the processes still on the mount when the hold ends, as a machine crash would.
    crash_fence: bool = True
    # Index-only mounts: a restarted daemon takes over the held connection of the crashed
    # one, and the processes on the mount carry on (adoption.py).
    adopt_connection: bool = True
    log_level: str = "INFO"
    metrics_port: int = 0
    replicated: tuple[str, ...] = DEFAULT_REPLICATED
    volatile: tuple[str, ...] = DEFAULT_VOLATILE
    # Replication: off unless peers or listen is set. Empty node_id: the host name.
    node_id: str = ""
    cluster: str = "mailfs"
    listen: str = ""
    peers: tuple[Peer, ...] = ()
    tls_cert: Path = Path()
    tls_key: Path = Path()
    tls_ca: Path = Path()
    durability: str = "async"
    quorum: int = 0  # peers that must have a change before it counts as durable; 0: all
    sync_timeout: float = 5.0
    log_limit: int = 256 << 20
    reconnect_interval: float = 1.0
    # Local changes wait this long while a peer's snapshot is installed, then get EAGAIN.
    install_wait: float = 30.0
    # A change refused because the state disk is full waits this long for room, then gets
    # ENOSPC; 0: at once, as on a full local disk (fs/fulldisk.py).
    full_disk_wait: float = 60.0
    # Each user directory (the first `ownership_depth` path components; 0: no ownership)
    # has one owner node; see cachemgr/ownership.py. "availability": any node may take a
    # user over; "consistency": no writes without a majority of the cluster.
    ownership_depth: int = 1
    ownership_policy: str = "availability"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def control_socket(self) -> Path:
        return control_socket_for(self.run_dir, self.mountpoint)

    @property
    def replication_enabled(self) -> bool:
        return bool(self.peers) or bool(self.listen)


def control_socket_for(run_dir: Path, mountpoint: Path) -> Path:
    """One socket per mountpoint: a readable name plus a hash, so that no two collide."""
    real = real_mountpoint(mountpoint)
    tag = hashlib.sha256(os.fsencode(real)).hexdigest()[:16]
    name = os.path.basename(real)[:40] or "root"
    return run_dir / f"{name}-{tag}.sock"


# TOML layout: [mount] [cache] [commit] [backing] [classify] [log] [replication] [ownership]
SECTIONS: dict[str, dict[str, str]] = {
    "mount": {"mode": "choice", "backing": "path", "mountpoint": "path", "state_dir": "path",
              "run_dir": "path",
              "allow_other": "bool", "import_on_access": "bool",
              "crash_hold": "seconds", "crash_fence": "bool", "adopt_connection": "bool"},
    "cache": {"ram_budget": "size", "lmdb_map_size": "size", "index_timeout": "seconds",
              "passthrough_timeout": "seconds", "auto_inval_data": "bool"},
    "commit": {"interval": "seconds", "max_pending": "size", "full_disk_wait": "seconds"},
    "backing": {"threads": "count", "timeout": "seconds", "inodes": "choice",
                "calls": "choice"},
    "classify": {"replicated": "patterns", "volatile": "patterns"},
    "log": {"level": "level", "metrics_port": "port"},
    "replication": {"node_id": "name", "cluster": "name", "listen": "address",
                    "peers": "peers", "tls_cert": "path", "tls_key": "path", "tls_ca": "path",
                    "durability": "choice", "quorum": "count", "sync_timeout": "seconds",
                    "log_limit": "size", "reconnect_interval": "seconds",
                    "install_wait": "seconds"},
    "ownership": {"depth": "count", "policy": "choice"},
}

RENAMES = {
    ("commit", "interval"): "commit_interval",
    ("commit", "max_pending"): "commit_bytes",
    ("backing", "threads"): "backing_threads",
    ("backing", "timeout"): "backing_timeout",
    ("backing", "inodes"): "backing_inodes",
    ("backing", "calls"): "backing_calls",
    ("log", "level"): "log_level",
    ("ownership", "depth"): "ownership_depth",
    ("ownership", "policy"): "ownership_policy",
}

LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR"}
# Allowed values of "choice" keys, by field name.
CHOICES = {"durability": ("async", "sync"), "mode": ("full", "index-only"),
           "backing_inodes": ("auto", "stable", "unstable"),
           "backing_calls": ("auto", "inline", "threads"),
           "ownership_policy": ("availability", "consistency")}


def convert(kind: str, key: str, value: object, name: str = "") -> object:
    """`key` is the name shown in errors, `name` the field (needed for kind "choice")."""
    if kind == "path":
        if not isinstance(value, str) or not value:
            raise UserError(f"config: {key} must be a path string")
        # Absolute now: the daemon works from inside the backing directory (see Backing).
        return Path(os.path.abspath(value))
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
    if kind == "name":
        if not is_name(value):
            raise UserError(f"config: {key} must be {NAME_RULE}, not {value!r}")
        return value
    if kind == "address":
        if not isinstance(value, str):
            raise UserError(f"config: {key} must be a host:port string")
        if value:
            parse_address(value, key)
        return value
    if kind == "peers":
        if not isinstance(value, list):
            raise UserError(f"config: {key} must be a list of \"id@host:port\" strings")
        return tuple(parse_peer(peer, key) for peer in value)
    if kind == "choice":
        choices = CHOICES[name]
        if value not in choices:
            raise UserError(f"config: {key} must be one of {', '.join(choices)}, not {value!r}")
        return value
    raise AssertionError(kind)


def field_name(section: str, key: str) -> str:
    return RENAMES.get((section, key), key)


def load_file(path: Path) -> dict[str, object]:
    if not str(path):
        raise UserError("config file path is empty")
    data = read_small_file("config file", path)
    try:
        raw = tomllib.loads(data.decode("utf-8"))
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
            name = field_name(section, key)
            values[name] = convert(kind, f"{section}.{key}", value, name)
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
        elif kind == "peers":  # commas separate -o options, so peers are ';'-separated
            values[name] = convert(kind, key, [p.strip() for p in raw.split(";") if p.strip()])
        else:
            values[name] = convert(kind, key, raw, name)


def build(config_file: Path | None, overrides: dict[str, object]) -> Config:
    values: dict[str, object] = {}
    if config_file is not None:
        values.update(load_file(config_file))
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(Config)}
    chosen: dict[str, Any] = {k: v for k, v in values.items() if k in known}
    config = replace(Config(), **chosen)
    if config.replication_enabled and not config.node_id:
        host = socket.gethostname()
        if not is_name(host):
            raise UserError(f"config: replication.node_id is not set and the host name "
                            f"{host!r} is not a valid node id ({NAME_RULE}); set node_id")
        config = replace(config, node_id=host)
    validate(config)
    return config


def validate(config: Config) -> None:
    if config.mode == "index-only" and str(config.backing) not in ("", "."):
        raise UserError("config: an index-only mount has no backing path; give only the "
                        "mountpoint")
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
    if config.sync_timeout <= 0:
        raise UserError("config: replication.sync_timeout must be above 0")
    if config.reconnect_interval <= 0:
        raise UserError("config: replication.reconnect_interval must be above 0")
    if config.log_limit < 1 << 20:
        raise UserError("config: replication.log_limit must be at least 1M")
    if config.replication_enabled:
        validate_replication(config)


def validate_replication(config: Config) -> None:
    if not is_name(config.node_id):
        raise UserError(f"config: replication.node_id must be {NAME_RULE}, "
                        f"not {config.node_id!r}")
    for name in ("tls_cert", "tls_key", "tls_ca"):
        check_readable_file(f"replication.{name}", getattr(config, name))
    seen: set[str] = set()
    for peer in config.peers:
        if peer.node_id == config.node_id:
            raise UserError(f"config: replication.peers includes this node's own node_id "
                            f"{peer.node_id!r}")
        if peer.node_id in seen:
            raise UserError(f"config: replication.peers lists node id {peer.node_id!r} twice")
        seen.add(peer.node_id)
    if config.quorum > len(config.peers):
        raise UserError(f"config: replication.quorum ({config.quorum}) is more than the "
                        f"number of peers ({len(config.peers)})")
    owners: dict[int, str] = {}
    for node_id in (config.node_id, *(peer.node_id for peer in config.peers)):
        other = owners.setdefault(node_namespace(node_id), node_id)
        if other != node_id:
            raise UserError(f"config: replication: node ids {other!r} and {node_id!r} map to "
                            f"the same file-id namespace; rename one")


def check_readable_file(key: str, path: Path) -> None:
    if not str(path) or str(path) == ".":
        raise UserError(f"config: {key} must be set when replication is on "
                        f"(peers or listen given)")
    read_small_file(f"config: {key}", path)
