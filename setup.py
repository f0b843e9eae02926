"""Only for the C part; everything else is in pyproject.toml.

mailfs.fs.session._fuse_caps is a plain shared library (no Python module init): the
daemon loads it with ctypes before pyfuse3 so that it can choose FUSE capabilities that
pyfuse3 leaves at libfuse's defaults (see src/mailfs/fs/session/fuse_caps.c).
"""

import shlex
import subprocess

from setuptools import Extension, setup


def fuse3_include_dirs() -> list[str]:
    try:
        flags = subprocess.run(["pkg-config", "--cflags-only-I", "fuse3"], check=True,
                               capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ["/usr/include/fuse3"]
    return [flag[2:] for flag in shlex.split(flags) if flag.startswith("-I")]


setup(
    ext_modules=[
        Extension(
            "mailfs.fs.session._fuse_caps",
            sources=["src/mailfs/fs/session/fuse_caps.c"],
            include_dirs=fuse3_include_dirs(),
            libraries=["dl"],
        )
    ]
)
