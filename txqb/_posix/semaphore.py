"""
glibc's process-shared POSIX semaphore (``sem_t``), inside a shared
mapping, through ctypes.

libqb's rings count committed chunks in a ``sem_t`` embedded in the ring
header.  Python cannot perform the atomic read-modify-write the count
needs, so txqb calls glibc's own ``sem_post``/``sem_trywait``/
``sem_timedwait``/``sem_getvalue``/``sem_init`` on the address inside the
mmap.

Only the blocking ``sem_timedwait`` releases the GIL (so a waiter thread
does not stall the reactor thread).  The others never block and keep it
(``ctypes.PyDLL``): releasing it around a sub-microsecond call would hand
it to any thread waiting for it, and the caller would then wait to get it
back, several microseconds per message under load.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys
import time
from typing import Optional

from txqb._posix.libc import libc as _libc
from txqb._posix.libc import libcKeepingGil as _libcKeepingGil

__all__ = ["SharedSemaphore", "SEM_SIZE"]

SEM_SIZE = 32
"""``sizeof(sem_t)`` on x86-64 glibc."""


def _knownLayout() -> bool:
    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError):
        glibc = False
    return (glibc and sys.byteorder == "little" and ctypes.sizeof(ctypes.c_void_p) == 8
            and os.uname().machine in ("x86_64", "aarch64"))


GLIBC_LAYOUT = _knownLayout()
"""
Whether ``sem_t`` is glibc's 64-bit layout here: the count in the low 32
bits of its first 64-bit word, the number of sleeping waiters in the high
32 (x86-64 and aarch64).  Then the count is read from memory, with no
call, as ``sem_getvalue`` itself reads it.
"""


for _lib in (_libc, _libcKeepingGil):
    for _name in ("sem_post", "sem_trywait", "sem_getvalue", "sem_init", "sem_timedwait",
                  "sem_destroy"):
        getattr(_lib, _name).restype = ctypes.c_int
    _lib.sem_post.argtypes = [ctypes.c_void_p]
    _lib.sem_trywait.argtypes = [ctypes.c_void_p]
    _lib.sem_destroy.argtypes = [ctypes.c_void_p]
    _lib.sem_getvalue.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
    _lib.sem_init.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc.sem_timedwait.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Timespec)]
_post = _libcKeepingGil.sem_post
_tryWait = _libcKeepingGil.sem_trywait
_getValue = _libcKeepingGil.sem_getvalue
_timedWait = _libc.sem_timedwait


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
        # A ready-made pointer argument: ctypes passes it as is, where an
        # int would be converted on every call (these run per message).
        self._pointer: Optional[ctypes.c_void_p] = ctypes.c_void_p(self._address)
        self._timespec = _Timespec()
        self._value = ctypes.c_int()
        # glibc's 64-bit sem_t: the count in the low 32 bits of its first
        # word, the number of sleeping waiters in the high 32 (see
        # setWaiting); only used where txqb._posix.futex says so.
        self._words: Optional[ctypes.Array[ctypes.c_uint32]] = (
            ctypes.c_uint32 * 2
        ).from_buffer(buffer, offset)
        self.countAddress = self._address
        """Where the count is: the futex ``sem_post`` wakes."""

    def initialize(self) -> None:
        """``sem_init(pshared=1, 0)``: a zeroed ``sem_t`` is process-private and loses wake-ups."""
        if _libc.sem_init(self._address, 1, 0) != 0:
            _raise("sem_init")

    def post(self) -> None:
        """Add one to the count, waking one waiter."""
        if _post(self._pointer) != 0:
            _raise("sem_post")

    def tryWait(self) -> bool:
        """Take one from the count if it is positive; never blocks."""
        if GLIBC_LAYOUT and not self._words[0]:  # type: ignore[index]
            return False  # as sem_trywait would say, without the call
        if _tryWait(self._pointer) == 0:
            return True
        while True:
            code = ctypes.get_errno()
            if code == errno.EAGAIN:
                return False
            if code != errno.EINTR:
                _raise("sem_trywait")
            if _tryWait(self._pointer) == 0:
                return True

    def value(self) -> int:
        """The current count."""
        if GLIBC_LAYOUT:
            return self._words[0]  # type: ignore[index]
        result = self._value
        if _getValue(self._pointer, result) != 0:
            _raise("sem_getvalue")
        return max(result.value, 0)

    def timedWait(self, seconds: float) -> bool:
        """
        Wait up to ``seconds`` for a count and take it.  Blocks: call it
        only from a thread other than the reactor's.
        """
        deadline = time.time() + seconds
        spec = self._timespec
        spec.tv_sec = int(deadline)
        spec.tv_nsec = int((deadline % 1) * 1e9)
        while _timedWait(self._pointer, spec) != 0:
            code = ctypes.get_errno()
            if code == errno.ETIMEDOUT:
                return False
            if code != errno.EINTR:
                _raise("sem_timedwait")
        return True

    def count(self) -> int:
        """
        The count, read from memory (no call, and nothing is taken): for a
        watcher that only needs to know whether a count is there.
        """
        assert self._words is not None
        return self._words[0]

    def setWaiting(self, waiting: bool) -> None:
        """
        Say whether a thread sleeps on L{countAddress} with ``futex_waitv``
        (see L{txqb._posix.futex}): ``sem_post`` wakes the count's futex
        only while the waiter count is not 0, which ``sem_wait`` keeps by
        atomic increments of its own.  Here one thread of this process is
        the semaphore's only waiter (no ``sem_wait`` runs on it: a
        response semaphore has one client), so the word is simply stored,
        with one aligned 4-byte write: a peer's atomic add to the whole
        64-bit word sees it before or after, never torn, and a
        ``sem_trywait`` keeps it.
        """
        assert self._words is not None
        self._words[1] = 1 if waiting else 0

    def release(self) -> None:
        """Drop the pointer into the mapping so that it can be closed."""
        self._anchor = None
        self._words = None
        self._address = 0
        self._pointer = None
