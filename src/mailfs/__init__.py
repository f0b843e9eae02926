"""mailfs: a FUSE overlay filesystem for Dovecot clusters."""

__version__ = "0.1.0"
