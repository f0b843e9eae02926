"""FUSE capabilities that pyfuse3 leaves at libfuse's defaults (C part: fuse_caps.c).

`load()` must run before the pyfuse3 extension is loaded, so that pyfuse3's call to
fuse_session_new binds to ours; `mailfs/__init__.py` calls it first thing. Nothing here
imports pyfuse3. If the library is missing (a source tree that was never built) or came
too late, mailfs runs with libfuse's defaults and `status()` says why.
"""

from __future__ import annotations

import ctypes
import errno
import importlib.machinery
import os
import struct
import sys
from pathlib import Path
from typing import Any

# From libfuse's fuse_common.h: the kernel drops a file's pages whenever its mtime changes.
AUTO_INVAL_DATA = 1 << 12
# Set by the C part in the handle number of a write whose file has O_APPEND at that
# moment; never set when the library is not loaded, and then the kernel's offset stands.
FH_APPENDING = 1 << 62
LIBRARY_STEM = "_fuse_caps"
# fuse_out_header (linux/fuse.h) of a notification: unique 0, the code in the error field.
# FUSE_NOTIFY_RESEND (7, kernel 6.9): the kernel queues again every request that was read
# off the connection and not answered, with bit 63 set in its unique.
NOTIFY_RESEND = struct.pack("<IiQ", 16, 7, 0)
INIT_REQUEST_MAX = 256


class _Caps(ctypes.Structure):
    _fields_ = [("interposed", ctypes.c_int), ("init_seen", ctypes.c_int),
                ("capable", ctypes.c_uint), ("want", ctypes.c_uint),
                ("writes_tagged", ctypes.c_int)]


_library: ctypes.CDLL | None = None
# The same library, called with the GIL held: replaying INIT calls pyfuse3's handler.
_library_with_gil: ctypes.PyDLL | None = None
_problem: str | None = None


def _library_path() -> Path | None:
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / f"{LIBRARY_STEM}{suffix}"
        if candidate.exists():
            return candidate
    return None


def load() -> None:
    global _library, _library_with_gil, _problem
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
    if (fh_appending is None or fh_appending() != FH_APPENDING
            or getattr(library, "mailfs_replay_init", None) is None):
        _problem = f"{path.name} is from another version of mailfs (reinstall it)"
        return
    library.mailfs_init_request.restype = ctypes.c_size_t
    library.mailfs_init_request.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    _library = library
    _library_with_gil = ctypes.PyDLL(str(path), mode=os.RTLD_GLOBAL | os.RTLD_NOW)
    _library_with_gil.mailfs_replay_init.restype = ctypes.c_int
    _library_with_gil.mailfs_replay_init.argtypes = [ctypes.c_char_p, ctypes.c_size_t]


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


def init_request() -> bytes | None:
    """The kernel's INIT request of this process's connection, once it has come."""
    if _library is None:
        return None
    buffer = ctypes.create_string_buffer(INIT_REQUEST_MAX)
    size = int(_library.mailfs_init_request(buffer, INIT_REQUEST_MAX))
    return buffer.raw[:size] if 0 < size <= INIT_REQUEST_MAX else None


def can_replay_init() -> bool:
    return _library_with_gil is not None


def replay_init(request: bytes) -> None:
    """Feed an earlier connection's INIT to the session pyfuse3 opened on its descriptor,
    after pyfuse3.init and before its main loop: libfuse serves nothing before an INIT."""
    if _library_with_gil is None:
        raise OSError(errno.ENOSYS, _problem or "the FUSE session library is not loaded")
    result = _library_with_gil.mailfs_replay_init(request, len(request))
    if result != 0:
        raise OSError(-result, f"replaying the connection's INIT failed: {os.strerror(-result)}")
