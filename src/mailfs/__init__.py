"""mailfs: a FUSE overlay filesystem for Dovecot clusters."""

from mailfs.fs import session as _session

# Before anything imports pyfuse3: its fuse_session_new call must bind to our wrapper.
_session.load()

__version__ = "0.1.0"
