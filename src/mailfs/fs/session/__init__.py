"""FUSE capabilities that pyfuse3 leaves at libfuse's defaults (C part: fuse_caps.c).

`load()` must run before the pyfuse3 extension is loaded, so that pyfuse3's call to
fuse_session_new binds to ours; `mailfs/__init__.py` calls it first thing. Nothing here
imports pyfuse3. If the library is missing (a source tree that was never built) or came
too late, mailfs runs with libfuse's defaults and `status()` says why.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
import sys
from pathlib import Path
from typing import Any

# From libfuse's fuse_common.h: the kernel drops a file's pages whenever its mtime changes.
AUTO_INVAL_DATA = 1 << 12
# Set by the C part in the handle number of a write whose file has O_APPEND at that
# moment; never set when the library is not loaded, and then the kernel's offset stands.
FH_APPENDING = 1 << 62
LIBRARY_STEM = "_fuse_caps"


class _Caps(ctypes.Structure):
    _fields_ = [("interposed", ctypes.c_int), ("init_seen", ctypes.c_int),
                ("capable", ctypes.c_uint), ("want", ctypes.c_uint),
                ("writes_tagged", ctypes.c_int)]


_library: ctypes.CDLL | None = None
_problem: str | None = None


def _library_path() -> Path | None:
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / f"{LIBRARY_STEM}{suffix}"
        if candidate.exists():
            return candidate
    return None


def load() -> None:
    global _library, _problem
    if _library is not None or _problem is not None:
        return
    if "pyfuse3" in sys.modules:
        _problem = "pyfuse3 was loaded before mailfs could wrap its session"
        return
    path = _library_path()
    if path is None:
        _problem = f"{LIBRARY_STEM} is not built (reinstall mailfs: pip install -e .)"
        return
    try:
        library = ctypes.CDLL(str(path), mode=os.RTLD_GLOBAL | os.RTLD_NOW)
    except OSError as exc:
        _problem = f"cannot load {path.name}: {exc}"
        return
    library.mailfs_fuse_caps_status.restype = ctypes.POINTER(_Caps)
    library.mailfs_fuse_caps_clear.argtypes = [ctypes.c_uint]
    fh_appending = getattr(library, "mailfs_fh_appending", None)  # absent in older builds
    if fh_appending is not None:
        fh_appending.restype = ctypes.c_uint64
    if fh_appending is None or fh_appending() != FH_APPENDING:
        _problem = f"{path.name} is from another version of mailfs (reinstall it)"
        return
    _library = library


def clear(flags: int) -> str | None:
    """Ask for these capabilities to be off at the next mount; why it cannot be, or None."""
    if _library is None:
        return _problem or "not loaded"
    _library.mailfs_fuse_caps_clear(flags)
    return None


def status() -> dict[str, Any]:
    """What the kernel offered and what this mount asked for (after INIT)."""
    if _library is None:
        return {"wrapped": False, "problem": _problem}
    caps = _library.mailfs_fuse_caps_status().contents
    if not caps.interposed:
        return {"wrapped": False, "problem": "pyfuse3 did not call our fuse_session_new"}
    if not caps.init_seen:
        return {"wrapped": True, "init_seen": False}
    return {"wrapped": True, "init_seen": True, "writes_tagged": bool(caps.writes_tagged),
            "auto_inval_data": bool(caps.want & AUTO_INVAL_DATA),
            "kernel_offers_auto_inval_data": bool(caps.capable & AUTO_INVAL_DATA)}
