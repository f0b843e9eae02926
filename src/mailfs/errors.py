"""Errors that reach an admin as one clear line, never as a traceback."""


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
