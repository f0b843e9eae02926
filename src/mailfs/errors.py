"""Errors that reach an admin as one clear line, never as a traceback."""


class UserError(Exception):
    """A problem the admin can fix: bad config, missing path, busy mountpoint, ..."""
