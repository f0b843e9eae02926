"""Errors that reach an admin as one clear line, never as a traceback."""


import os
import stat
from pathlib import Path


class UserError(Exception):
    """A problem the admin can fix: bad config, missing path, busy mountpoint, ..."""


def ensure_directory(path: Path, what: str) -> None:
    """Create a directory mailfs owns (0700), or say in one line why it cannot."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise UserError(f"cannot create {what} {path}: {exc.strerror}") from None


def read_small_file(what: str, path: Path) -> bytes:
    """The bytes of a config, key or certificate file, or one line saying why not."""
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise UserError(f"{what} {path} is a directory")
        if not stat.S_ISREG(mode):  # a FIFO would block the read
            raise UserError(f"{what} {path} is not a regular file")
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except PermissionError:
        raise UserError(f"{what} {path} is not readable") from None
    except OSError as exc:
        raise UserError(f"{what} {path} cannot be read: {exc.strerror}") from None
