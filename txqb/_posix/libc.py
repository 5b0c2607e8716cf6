"""
glibc through ctypes, loaded once for the POSIX layer.

Two handles: C{libc} releases the GIL around each call (for calls that
may block or are rare), C{libcKeepingGil} does not (``ctypes.PyDLL``; for
sub-microsecond calls on the hot path, see L{txqb._posix.semaphore}).
Each user sets the argument and result types of the functions it calls.
"""

from __future__ import annotations

import ctypes

__all__ = ["libc", "libcKeepingGil", "preciseSleeps"]


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

_PR_SET_TIMERSLACK = 29


def preciseSleeps() -> bool:
    """
    Make this thread's timed sleeps end when asked (a timer slack of one
    nanosecond): Linux lets a sleep run up to 50 us late by default, which
    turns a 25 us look into 80.  For threads that poll on a short period.
    Returns whether the kernel took it.
    """
    return bool(libc.prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0) == 0)
