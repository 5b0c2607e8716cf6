"""
Linux's ``futex_waitv`` (5.16 and later), through ctypes: one thread
sleeps until any of up to 128 futexes is woken.

txqb uses it to wait for responses on many SHM connections at once.  A
libqb server announces a response only by posting the response ring's
semaphore (a futex in the shared header); with ``futex_waitv`` one thread
per process watches every connection's semaphore, where ``sem_timedwait``
needs a thread per connection, all of them contending for the GIL.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
import time
from typing import Any, Optional

from txqb._posix.libc import libc as _libc
from txqb._posix.libc import libcKeepingGil as _libcKeepingGil
from txqb._posix.semaphore import GLIBC_LAYOUT

__all__ = ["WAITV_MAX", "WaitList", "waitvAvailable"]

WAITV_MAX = 128
"""The kernel's limit on futexes per ``futex_waitv`` call."""

_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}
# futex_waitv has one number on every architecture (it came after the
# tables were unified).
_SYS_FUTEX_WAITV = 449
_FUTEX_WAKE = 1
_FUTEX_PRIVATE_FLAG = 128
_FUTEX2_SIZE_U32 = 0x02
_FUTEX2_PRIVATE = _FUTEX_PRIVATE_FLAG
_CLOCK_MONOTONIC = 1

_libc.syscall.restype = ctypes.c_long
_libcKeepingGil.syscall.restype = ctypes.c_long


class _Waiter(ctypes.Structure):
    """``struct futex_waitv``."""

    _fields_ = [
        ("val", ctypes.c_uint64),
        ("uaddr", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    ]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _machine() -> str:
    return os.uname().machine


_available: Optional[bool] = None


def waitvAvailable() -> bool:
    """
    Whether this process can wait on glibc semaphores with ``futex_waitv``:
    a kernel that has the call, and a 64-bit little-endian glibc, whose
    ``sem_t`` keeps its count in the low 32 bits of its first 64-bit word
    and the number of sleeping waiters in the high 32 (only then does
    ``sem_post`` wake a futex txqb can name, and only while that number
    is not 0; see L{txqb._posix.semaphore.SharedSemaphore.setWaiting}).
    """
    global _available
    if _available is None:
        _available = GLIBC_LAYOUT and sys.platform.startswith("linux") and _probe()
    return _available


def _probe() -> bool:
    # No futexes at all: EINVAL where the call exists, ENOSYS where not.
    zero = ctypes.c_long(0)
    if _libcKeepingGil.syscall(ctypes.c_long(_SYS_FUTEX_WAITV), None, zero, zero, None, zero) == 0:
        return False
    return ctypes.get_errno() == errno.EINVAL


class WaitList:
    """
    A ``futex_waitv`` array of fixed capacity, whose slot 0 is a private
    control futex: L{wake} wakes the waiting thread so that it sees
    changed slots (the kernel reads the array only when the call starts).

    A slot not in use waits on a private word that is always 0, with an
    expected value of 0, so that it never ends a wait: unused slots need
    no compaction.
    """

    def __init__(self, capacity: int = WAITV_MAX) -> None:
        if not 1 < capacity <= WAITV_MAX:
            raise ValueError("a wait list holds 2 to 128 futexes")
        self.capacity = capacity
        self._array = (_Waiter * capacity)()
        self._zero = ctypes.c_uint32(0)
        self._zeroAddress = ctypes.addressof(self._zero)
        self._control = ctypes.c_uint32(0)
        self._controlAddress = ctypes.addressof(self._control)
        self._timespec = _Timespec()
        # syscall() is variadic: every argument goes with its C type (a
        # bare int would be passed as a 32-bit int).
        self._timespecRef = ctypes.byref(self._timespec)
        self._arrayRef = ctypes.byref(self._array)
        self._controlRef = ctypes.c_void_p(self._controlAddress)
        control = self._array[0]
        control.uaddr = self._controlAddress
        control.flags = _FUTEX2_SIZE_U32 | _FUTEX2_PRIVATE
        for slot in range(1, capacity):
            self.clear(slot)
        self._wake = _libcKeepingGil.syscall
        self._wait = _libc.syscall
        self._futex = ctypes.c_long(_SYS_FUTEX.get(_machine(), -1))
        self._waitv = ctypes.c_long(_SYS_FUTEX_WAITV)
        self._wakeOne = (ctypes.c_long(_FUTEX_WAKE | _FUTEX_PRIVATE_FLAG), ctypes.c_long(1))
        self._noFlags = ctypes.c_long(0)
        self._clock = ctypes.c_long(_CLOCK_MONOTONIC)

    def point(self, slot: int, address: int, expected: int = 0) -> None:
        """
        Slot C{slot} waits while the shared 32-bit word at C{address} holds
        C{expected} (a process-shared futex: one a semaphore in a shared
        mapping is).
        """
        waiter = self._array[slot]
        waiter.val = expected
        waiter.uaddr = address
        waiter.flags = _FUTEX2_SIZE_U32

    def expect(self, slot: int, expected: int) -> None:
        """Slot C{slot} waits while its word holds C{expected}."""
        self._array[slot].val = expected

    def clear(self, slot: int) -> None:
        """Slot C{slot} no longer ends a wait."""
        waiter = self._array[slot]
        waiter.val = 0
        waiter.uaddr = self._zeroAddress
        waiter.flags = _FUTEX2_SIZE_U32 | _FUTEX2_PRIVATE

    def prepare(self) -> None:
        """
        Before L{wait}: expect the control futex's current value, so that
        a L{wake} after this (and before or during the wait) ends it.
        """
        self._array[0].val = self._control.value

    def touch(self) -> None:
        """
        Make a L{wait} prepared but not yet started end at once (it finds
        the control word changed); one already asleep sleeps on.  A plain
        store: no call.
        """
        self._control.value = (self._control.value + 1) & 0xFFFFFFFF

    def wake(self) -> None:
        """End the current or next L{wait} (any thread; never blocks)."""
        self.touch()
        self._wake(self._futex, self._controlRef, *self._wakeOne)

    def wait(self, slots: int, timeout: Optional[float]) -> bool:
        """
        Sleep, without the GIL, until a futex among the first C{slots} is
        woken, one of them no longer holds its expected value, or
        C{timeout} seconds pass.

        @return: False on a timeout, True otherwise (a wake-up, a changed
            word, a signal: the caller looks at its words either way).
        """
        spec: Optional[Any] = None
        if timeout is not None:
            deadline = time.clock_gettime(time.CLOCK_MONOTONIC) + timeout
            self._timespec.tv_sec = int(deadline)
            self._timespec.tv_nsec = int((deadline % 1) * 1e9)
            spec = self._timespecRef
        if self._wait(self._waitv, self._arrayRef, ctypes.c_long(slots), self._noFlags, spec,
                      self._clock) >= 0:
            return True
        code = ctypes.get_errno()
        if code == errno.ETIMEDOUT:
            return False
        if code in (errno.EAGAIN, errno.EINTR):
            return True
        # EFAULT: a slot's mapping went away after it was cleared (the
        # kernel saw the array before the change); look again.
        if code == errno.EFAULT:
            return True
        raise OSError(code, f"futex_waitv: {os.strerror(code)}")
