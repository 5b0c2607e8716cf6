"""
glibc through ctypes, loaded once for the POSIX layer.

Two handles: C{libc} releases the GIL around each call (for calls that
may block or are rare), C{libcKeepingGil} does not (``ctypes.PyDLL``; for
sub-microsecond calls on the hot path, see L{txqb._posix.semaphore}).
Each user sets the argument and result types of the functions it calls.
"""

from __future__ import annotations

import ctypes

__all__ = ["libc", "libcKeepingGil"]


def _load(keepGil: bool) -> ctypes.CDLL:
    # glibc's soname first: importing ctypes.util (for find_library) costs
    # more than a short-lived client's whole request.
    kind = ctypes.PyDLL if keepGil else ctypes.CDLL
    try:
        return kind("libc.so.6", use_errno=True)
    except OSError:
        from ctypes.util import find_library

        return kind(find_library("c"), use_errno=True)


libc = _load(False)
libcKeepingGil = _load(True)
