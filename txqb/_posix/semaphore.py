"""
glibc's process-shared POSIX semaphore (``sem_t``), inside a shared
mapping, through ctypes.

libqb's rings count committed chunks in a ``sem_t`` embedded in the ring
header.  Python cannot perform the atomic read-modify-write the count
needs, so txqb calls glibc's own ``sem_post``/``sem_trywait``/
``sem_timedwait``/``sem_getvalue``/``sem_init`` on the address inside the
mmap.  ctypes releases the GIL during each call, so a blocking
``sem_timedwait`` in a waiter thread does not stall the reactor thread.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import time
from typing import Optional

__all__ = ["SharedSemaphore", "SEM_SIZE"]

SEM_SIZE = 32
"""``sizeof(sem_t)`` on x86-64 glibc."""


def _loadLibc() -> ctypes.CDLL:
    # glibc's soname first: importing ctypes.util (for find_library) costs
    # more than a short-lived client's whole request.
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        from ctypes.util import find_library

        return ctypes.CDLL(find_library("c"), use_errno=True)


_libc = _loadLibc()
for _name in ("sem_post", "sem_trywait", "sem_getvalue", "sem_init", "sem_timedwait", "sem_destroy"):
    getattr(_libc, _name).restype = ctypes.c_int
_libc.sem_post.argtypes = [ctypes.c_void_p]
_libc.sem_trywait.argtypes = [ctypes.c_void_p]
_libc.sem_destroy.argtypes = [ctypes.c_void_p]
_libc.sem_getvalue.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
_libc.sem_init.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc.sem_timedwait.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Timespec)]


def _raise(what: str) -> None:
    code = ctypes.get_errno()
    raise OSError(code, f"{what}: {os.strerror(code)}")


class SharedSemaphore:
    """
    A ``sem_t`` at ``offset`` inside ``buffer`` (a shared mmap).

    Holding this object pins the mapping (Python refuses to close an mmap
    with exported pointers); call L{release} before closing the map.
    """

    def __init__(self, buffer: mmap.mmap, offset: int) -> None:
        if offset < 0 or offset + SEM_SIZE > len(buffer):
            raise ValueError("semaphore lies outside the mapping")
        self._anchor: Optional[ctypes.Array[ctypes.c_char]] = (ctypes.c_char * SEM_SIZE).from_buffer(
            buffer, offset
        )
        self._address = ctypes.addressof(self._anchor)

    def initialize(self) -> None:
        """``sem_init(pshared=1, 0)``: a zeroed ``sem_t`` is process-private and loses wake-ups."""
        if _libc.sem_init(self._address, 1, 0) != 0:
            _raise("sem_init")

    def post(self) -> None:
        """Add one to the count, waking one waiter."""
        if _libc.sem_post(self._address) != 0:
            _raise("sem_post")

    def tryWait(self) -> bool:
        """Take one from the count if it is positive; never blocks."""
        while _libc.sem_trywait(self._address) != 0:
            code = ctypes.get_errno()
            if code == errno.EAGAIN:
                return False
            if code != errno.EINTR:
                _raise("sem_trywait")
        return True

    def value(self) -> int:
        """The current count."""
        result = ctypes.c_int()
        if _libc.sem_getvalue(self._address, ctypes.byref(result)) != 0:
            _raise("sem_getvalue")
        return max(result.value, 0)

    def timedWait(self, seconds: float) -> bool:
        """
        Wait up to ``seconds`` for a count and take it.  Blocks: call it
        only from a thread other than the reactor's.
        """
        deadline = time.time() + seconds
        spec = _Timespec(int(deadline), int((deadline % 1) * 1e9))
        while _libc.sem_timedwait(self._address, ctypes.byref(spec)) != 0:
            code = ctypes.get_errno()
            if code == errno.ETIMEDOUT:
                return False
            if code != errno.EINTR:
                _raise("sem_timedwait")
        return True

    def release(self) -> None:
        """Drop the pointer into the mapping so that it can be closed."""
        self._anchor = None
        self._address = 0
