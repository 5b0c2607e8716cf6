"""
Futex waits through Linux's io_uring (``IORING_OP_FUTEX_WAIT``, 6.7 and
later), through ctypes: a file descriptor that becomes readable when a
futex is woken.

A libqb server announces a response only by posting the response ring's
semaphore, a futex in shared memory, and a futex cannot be polled.  With
a wait queued on an io_uring, the ring's own file descriptor becomes
readable once the semaphore is posted: the reactor polls it like any
other, and no thread stands between the post and the reactor (a thread
costs a wake-up and a GIL hand-over per response; see
L{txqb._reactor.shmtransport}).

Only the reactor thread uses a ring: io_uring completes a futex wait in
the thread that queued it, which the kernel interrupts for it (a sleeping
``epoll_wait`` ends with ``EINTR`` and Python calls it again; the ring's
descriptor is readable by then).

The rings' shared indices are read and written with plain loads and
stores, which is enough on x86-64 only (its loads are not reordered with
other loads, nor stores with other stores); elsewhere this module says it
is not available.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys
from typing import List, Optional, Tuple

from txqb._posix.libc import libcKeepingGil as _libc
from txqb._posix.semaphore import GLIBC_LAYOUT

__all__ = ["FutexRing", "futexRingAvailable"]

_SYS_IO_URING_SETUP = 425
_SYS_IO_URING_ENTER = 426
_SYS_IO_URING_REGISTER = 427
_IORING_REGISTER_PROBE = 8
_IORING_OP_ASYNC_CANCEL = 14
_IORING_OP_FUTEX_WAIT = 51
_IO_URING_OP_SUPPORTED = 1
_IORING_FEAT_SINGLE_MMAP = 1
_IORING_OFF_SQ_RING = 0
_IORING_OFF_CQ_RING = 0x8000000
_IORING_OFF_SQES = 0x10000000
_FUTEX2_SIZE_U32 = 0x02
_FUTEX_BITSET_MATCH_ANY = 0xFFFFFFFF

CANCELLED = -errno.ECANCELED
"""The result of a wait ended by L{FutexRing.cancel} (or the cancel's own)."""

_libc.syscall.restype = ctypes.c_long


class _SqOffsets(ctypes.Structure):
    """``struct io_sqring_offsets``."""

    _fields_ = [(name, ctypes.c_uint32) for name in (
        "head", "tail", "ring_mask", "ring_entries", "flags", "dropped", "array", "resv1")
    ] + [("user_addr", ctypes.c_uint64)]


class _CqOffsets(ctypes.Structure):
    """``struct io_cqring_offsets``."""

    _fields_ = [(name, ctypes.c_uint32) for name in (
        "head", "tail", "ring_mask", "ring_entries", "overflow", "cqes", "flags", "resv1")
    ] + [("user_addr", ctypes.c_uint64)]


class _Params(ctypes.Structure):
    """``struct io_uring_params``."""

    _fields_ = [
        ("sq_entries", ctypes.c_uint32),
        ("cq_entries", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("sq_thread_cpu", ctypes.c_uint32),
        ("sq_thread_idle", ctypes.c_uint32),
        ("features", ctypes.c_uint32),
        ("wq_fd", ctypes.c_uint32),
        ("resv", ctypes.c_uint32 * 3),
        ("sq_off", _SqOffsets),
        ("cq_off", _CqOffsets),
    ]


class _Sqe(ctypes.Structure):
    """``struct io_uring_sqe``, the fields a futex wait and a cancel use."""

    _fields_ = [
        ("opcode", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("ioprio", ctypes.c_uint16),
        ("fd", ctypes.c_int32),  # a futex wait: its FUTEX2_* flags
        ("off", ctypes.c_uint64),  # a futex wait: the expected value
        ("addr", ctypes.c_uint64),  # the futex; a cancel: the user data to end
        ("len", ctypes.c_uint32),
        ("op_flags", ctypes.c_uint32),
        ("user_data", ctypes.c_uint64),
        ("buf_index", ctypes.c_uint16),
        ("personality", ctypes.c_uint16),
        ("file_index", ctypes.c_uint32),
        ("addr3", ctypes.c_uint64),  # a futex wait: its bitset mask
        ("pad", ctypes.c_uint64),
    ]


class _Cqe(ctypes.Structure):
    """``struct io_uring_cqe``."""

    _fields_ = [("user_data", ctypes.c_uint64), ("res", ctypes.c_int32),
                ("flags", ctypes.c_uint32)]


class _ProbeOp(ctypes.Structure):
    _fields_ = [("op", ctypes.c_uint8), ("resv", ctypes.c_uint8), ("flags", ctypes.c_uint16),
                ("resv2", ctypes.c_uint32)]


class _Probe(ctypes.Structure):
    _fields_ = [("last_op", ctypes.c_uint8), ("ops_len", ctypes.c_uint8),
                ("resv", ctypes.c_uint16), ("resv2", ctypes.c_uint32 * 3),
                ("ops", _ProbeOp * 256)]


def _fail(call: str) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{call}: {os.strerror(code)}")


class FutexRing:
    """
    An io_uring for futex waits on 32-bit words in shared memory.

    Each of its L{capacity} wait slots has a submission entry of its own,
    prepared once (L{prepare}); L{submit} queues a slot's wait again with
    two stores and one ``io_uring_enter``, and L{queue} plus L{flush}
    queue many with one call.  A wait ends once its word is woken
    (result 0), at once if the word no longer holds 0 when the wait starts
    (``-EAGAIN``), or when it is cancelled (L{CANCELLED}); L{reap} returns
    the ends, each with its slot's user data.  L{fileno} is readable while
    ends are there to reap.
    """

    def __init__(self, entries: int = 1024) -> None:
        params = _Params()
        fd = _libc.syscall(ctypes.c_long(_SYS_IO_URING_SETUP), ctypes.c_uint(entries),
                           ctypes.byref(params))
        if fd < 0:
            raise _fail("io_uring_setup")
        self._fd: int = fd
        self._maps: List[mmap.mmap] = []
        try:
            self._map(params)
        except BaseException:
            self.close()
            raise

    def _map(self, params: _Params) -> None:
        sq, cq = params.sq_off, params.cq_off
        entries, cqEntries = params.sq_entries, params.cq_entries
        sqSize = sq.array + entries * 4
        cqSize = cq.cqes + cqEntries * ctypes.sizeof(_Cqe)

        def mapped(size: int, offset: int) -> mmap.mmap:
            m = mmap.mmap(self._fd, size, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                          mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
            self._maps.append(m)
            return m

        if params.features & _IORING_FEAT_SINGLE_MMAP:
            sqMap = cqMap = mapped(max(sqSize, cqSize), _IORING_OFF_SQ_RING)
        else:
            sqMap = mapped(sqSize, _IORING_OFF_SQ_RING)
            cqMap = mapped(cqSize, _IORING_OFF_CQ_RING)
        sqeMap = mapped(entries * ctypes.sizeof(_Sqe), _IORING_OFF_SQES)
        self._sqTail = ctypes.c_uint32.from_buffer(sqMap, sq.tail)
        self._sqMask = ctypes.c_uint32.from_buffer(sqMap, sq.ring_mask).value
        self._sqArray = (ctypes.c_uint32 * entries).from_buffer(sqMap, sq.array)
        self._sqes = (_Sqe * entries).from_buffer(sqeMap)
        self._cqHead = ctypes.c_uint32.from_buffer(cqMap, cq.head)
        self._cqTail = ctypes.c_uint32.from_buffer(cqMap, cq.tail)
        self._cqMask = ctypes.c_uint32.from_buffer(cqMap, cq.ring_mask).value
        self._cqes = (_Cqe * cqEntries).from_buffer(cqMap, cq.cqes)
        self._queued = 0
        self._enter = _libc.syscall
        self._enterArgs = (ctypes.c_long(_SYS_IO_URING_ENTER), ctypes.c_long(self._fd))
        self._noArgs = (ctypes.c_long(0), ctypes.c_long(0), None, ctypes.c_long(0))
        # The last entry is the cancels'; the others are the slots'.
        self.capacity = entries - 1
        """How many wait slots the ring has (0 to C{capacity - 1})."""
        self._cancelSlot = entries - 1
        cancel = self._sqes[self._cancelSlot]
        cancel.opcode = _IORING_OP_ASYNC_CANCEL
        cancel.fd = -1

    def fileno(self) -> int:
        """The ring's descriptor: readable while ends wait to be reaped."""
        return self._fd

    def prepare(self, slot: int, address: int, userData: int) -> None:
        """
        Slot C{slot} waits on the process-shared 32-bit futex at
        C{address} while it holds 0; its ends carry C{userData}.
        """
        sqe = self._sqes[slot]
        sqe.opcode = _IORING_OP_FUTEX_WAIT
        sqe.fd = _FUTEX2_SIZE_U32
        sqe.off = 0
        sqe.addr = address
        sqe.addr3 = _FUTEX_BITSET_MATCH_ANY
        sqe.user_data = userData

    def queue(self, slot: int) -> None:
        """Queue slot C{slot}'s wait; L{flush} starts it."""
        tail = self._sqTail.value
        self._sqArray[tail & self._sqMask] = slot
        self._sqTail.value = (tail + 1) & 0xFFFFFFFF
        self._queued += 1

    def flush(self) -> None:
        """Start every queued wait and cancel, with one system call."""
        queued, self._queued = self._queued, 0
        if queued and self._enter(*self._enterArgs, ctypes.c_long(queued), *self._noArgs) < 0:
            raise _fail("io_uring_enter")

    def submit(self, slot: int) -> None:
        """Start slot C{slot}'s wait (and any queued ones) now."""
        self.queue(slot)
        self.flush()

    def cancel(self, userData: int) -> None:
        """End the wait carrying C{userData}, if one is started."""
        self._sqes[self._cancelSlot].addr = userData
        # Its user data (0) is no slot's: its own end is ignored.
        self.submit(self._cancelSlot)

    def reap(self) -> List[Tuple[int, int]]:
        """Take the ends the kernel posted: (user data, result) pairs."""
        head = self._cqHead.value
        tail = self._cqTail.value
        if head == tail:
            return []
        cqes, mask = self._cqes, self._cqMask
        ends = []
        while head != tail:
            cqe = cqes[head & mask]
            ends.append((cqe.user_data, cqe.res))
            head = (head + 1) & 0xFFFFFFFF
        self._cqHead.value = head
        return ends

    def close(self) -> None:
        """Close the ring: the kernel cancels every wait still started."""
        if self._fd < 0:
            return
        for name in ("_sqTail", "_sqArray", "_sqes", "_cqHead", "_cqTail", "_cqes"):
            self.__dict__.pop(name, None)  # (a mapping with views cannot close)
        for m in self._maps:
            m.close()
        self._maps = []
        os.close(self._fd)
        self._fd = -1


_available: Optional[bool] = None


def futexRingAvailable() -> bool:
    """
    Whether this process can wait on glibc semaphores with L{FutexRing}:
    Linux on x86-64 with io_uring enabled and ``IORING_OP_FUTEX_WAIT``,
    and glibc's 64-bit semaphore layout (see L{txqb._posix.futex}).
    """
    global _available
    if _available is None:
        _available = (GLIBC_LAYOUT and sys.platform.startswith("linux")
                      and os.uname().machine == "x86_64" and _probe())
    return _available


def _probe() -> bool:
    try:
        ring = FutexRing(2)
    except OSError:
        return False  # ENOSYS; EPERM where io_uring is disabled or filtered
    try:
        probe = _Probe()
        if _libc.syscall(ctypes.c_long(_SYS_IO_URING_REGISTER), ctypes.c_long(ring.fileno()),
                         ctypes.c_long(_IORING_REGISTER_PROBE), ctypes.byref(probe),
                         ctypes.c_long(256)) < 0:
            return False
        for op in (_IORING_OP_FUTEX_WAIT, _IORING_OP_ASYNC_CANCEL):
            if op > probe.last_op or not probe.ops[op].flags & _IO_URING_OP_SUPPORTED:
                return False
        # A shared word that is not 0: the wait must end at once, -EAGAIN.
        word = mmap.mmap(-1, mmap.PAGESIZE)
        try:
            cell = ctypes.c_uint32.from_buffer(word)
            cell.value = 1
            ring.prepare(0, ctypes.addressof(cell), 7)
            ring.submit(0)
            del cell
            return bool(ring.reap() == [(7, -errno.EAGAIN)])
        finally:
            word.close()
    except OSError:
        return False
    finally:
        ring.close()
