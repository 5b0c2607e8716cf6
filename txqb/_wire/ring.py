"""
libqb's shared-memory ring buffer (``qb_rb``), as an algorithm over any
writable buffers.

A ring is a header (write and read pointers, the size in 32-bit words, the
paths of its files, a reference count, a semaphore and a user word) and a
data area of ``word_size`` words.  A chunk at word ``p`` is::

    word p        payload size in bytes (0 while being written / consumed)
    word p + 1    magic: COMMITTED, ALLOCATED (being written) or CONSUMED
    word p + 2 .. payload, padded to a word; every index is mod word_size

The semaphore counts committed chunks.  This module performs no system
call: the caller maps the files and passes an object with ``post``,
``tryWait`` and ``value`` for the semaphore, so the same code runs over an
mmap shared with C libqb and over a bytearray in unit tests.
"""

from __future__ import annotations

import errno
import mmap
from typing import Protocol, Union

__all__ = [
    "HEADER_STRUCT_SIZE",
    "HEADER_FILE_SIZE",
    "MAGIC_COMMITTED",
    "MAGIC_ALLOCATED",
    "MAGIC_CONSUMED",
    "CHUNK_OVERHEAD",
    "Semaphore",
    "RingError",
    "Ring",
    "dataFileSize",
    "initializeHeader",
    "loadWord",
    "loadInt",
    "storeWord",
]

Buffer = Union[bytearray, memoryview, "mmap.mmap"]
Piece = Union[bytes, bytearray, memoryview]
"""What a chunk is written from: any bytes-like object."""

# Offsets in the header file (struct qb_ringbuffer_shared_s, x86-64).
WRITE_PT = 0
READ_PT = 4
WORD_SIZE = 8
HDR_PATH = 12
DATA_PATH = 4108
PATH_SIZE = 4096
REF_COUNT = 8204
SEMAPHORE = 8208
USER_DATA = 8240
HEADER_STRUCT_SIZE = 8248
HEADER_FILE_SIZE = HEADER_STRUCT_SIZE + 4
"""libqb creates every header file with 4 bytes of user data after the struct."""

_WRITE_WORD = WRITE_PT // 4
_READ_WORD = READ_PT // 4

MAGIC_COMMITTED = 0xA1A1A1A1
MAGIC_ALLOCATED = 0xA110CED0
MAGIC_CONSUMED = 0xD0D0D0D0

CHUNK_OVERHEAD = 12
"""Bytes a chunk needs beyond its payload (size and magic words, a margin)."""

def _view(buffer: Buffer) -> memoryview:
    return memoryview(buffer).cast("B").cast("I")


def loadWord(buffer: Buffer, offset: int) -> int:
    """The unsigned 32-bit word at ``offset`` (a multiple of 4)."""
    value: int = _view(buffer)[offset // 4]
    return value


def loadInt(buffer: Buffer, offset: int) -> int:
    """The signed 32-bit word at ``offset``."""
    value = loadWord(buffer, offset)
    return value - (1 << 32) if value & 0x80000000 else value


def storeWord(buffer: Buffer, offset: int, value: int) -> None:
    """
    Store a 32-bit word (signed or not) at ``offset`` with a single aligned
    4-byte write, in host order as libqb does.

    Never ``struct.pack_into`` for memory a peer reads concurrently: it
    first zeroes the target and then writes it (byte by byte, for an
    explicit byte order), so a C peer can read 0 or a torn value.  A
    writer that reads a read pointer of 0 believes the ring is nearly
    empty and overwrites chunks not yet read.  Assigning an item of a
    memoryview cast to ``I`` is one ``memcpy`` of 4 bytes: one store.
    """
    _view(buffer)[offset // 4] = value & 0xFFFFFFFF


class Semaphore(Protocol):
    """The ring's chunk counter: glibc's ``sem_t`` in shared memory."""

    def post(self) -> None:
        """Count one more committed chunk and wake a waiter."""

    def tryWait(self) -> bool:
        """Take one count if there is one; never block."""

    def value(self) -> int:
        """The current count."""


class RingError(Exception):
    """
    A ring operation failed, with libqb's errno: ``EAGAIN`` (no room),
    ``EBADMSG`` (no committed chunk where one must be: a corrupt ring),
    ``EMSGSIZE`` (a chunk larger than the ring could ever hold).
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.errno = code


def dataFileSize(maxMessageSize: int, pageSize: int = 4096) -> int:
    """
    The data file size libqb uses for a ring carrying ``maxMessageSize``
    bytes: room for one chunk plus its overhead, rounded up to pages.
    A C client truncates the file it opens to this size, so a server must
    use exactly this.
    """
    needed = maxMessageSize + CHUNK_OVERHEAD + 1
    return (needed + pageSize - 1) // pageSize * pageSize


def _putPath(header: Buffer, offset: int, path: str) -> None:
    raw = path.encode("utf-8")
    if len(raw) >= PATH_SIZE:
        raise ValueError(f"ring path {path!r} is too long")
    header[offset : offset + PATH_SIZE] = raw.ljust(PATH_SIZE, b"\0")


def initializeHeader(header: Buffer, dataSize: int, headerPath: str, dataPath: str) -> None:
    """
    Fill a new ring header as libqb's creator does: empty ring, word size,
    both absolute paths (openers take the data path from here) and
    ``ref_count`` 1 (a C client attaches only to 1 and makes it 2).  The
    semaphore is initialized by the caller (it needs ``sem_init``).
    """
    storeWord(header, WRITE_PT, 0)
    storeWord(header, READ_PT, 0)
    storeWord(header, WORD_SIZE, dataSize // 4)
    _putPath(header, HDR_PATH, headerPath)
    _putPath(header, DATA_PATH, dataPath)
    storeWord(header, USER_DATA, 0)
    storeWord(header, REF_COUNT, 1)


def readPath(header: Buffer, offset: int) -> str:
    """A NUL-terminated path field of the header."""
    field = bytes(header[offset : offset + PATH_SIZE])
    end = field.find(b"\0")
    if end < 0:
        raise RingError(errno.EBADMSG, "ring header path is not NUL-terminated")
    return field[:end].decode("utf-8", "surrogateescape")


class Ring:
    """
    One end of a ring: the same object can write and read, as libqb's
    ``qb_ringbuffer_t`` can; a connection uses each ring in one direction.
    """

    def __init__(self, header: Buffer, data: Buffer, semaphore: Semaphore) -> None:
        self._header = header
        self._data = data
        self._sem = semaphore
        words = loadWord(header, WORD_SIZE)
        if words * 4 > len(data) or words < 4:
            raise RingError(
                errno.EBADMSG, f"ring header claims {words} words; data area is {len(data)} bytes"
            )
        self.words: int = words
        self.size: int = words * 4
        # A data area mapped twice back to back (as libqb maps it) holds
        # every chunk contiguously: no chunk is ever split or copied to
        # be read, however it lies across the end of the ring.
        self.mirrored: bool = len(data) >= 2 * self.size
        # Word views: every shared word is read and written with one
        # aligned 4-byte access (see storeWord).
        self._hw = _view(header)
        self._dw = _view(data)
        self._bytes = memoryview(data).cast("B")
        # Bound once: these run per message.
        self._post = semaphore.post
        self._tryWait = semaphore.tryWait

    # Words

    def _get(self, index: int) -> int:
        value: int = self._dw[index % self.words]
        return value

    def _put(self, index: int, value: int) -> None:
        self._dw[index % self.words] = value

    @property
    def writePointer(self) -> int:
        """Word index where the next chunk goes."""
        value: int = self._hw[WRITE_PT // 4]
        return value

    @property
    def readPointer(self) -> int:
        """Word index of the oldest unconsumed chunk."""
        value: int = self._hw[READ_PT // 4]
        return value

    @property
    def pending(self) -> int:
        """Committed chunks not yet read (the semaphore's count)."""
        return self._sem.value()

    def freeSpace(self) -> int:
        """Bytes a writer could use now, by libqb's formula."""
        w, r = self.writePointer, self.readPointer
        if w > r:
            return (r - w + self.words - 1) * 4
        if w < r:
            return (r - w - 1) * 4
        return 0 if self._sem.value() > 0 else self.size

    # Writing

    def write(self, *parts: Piece) -> None:
        """
        Commit one chunk made of ``parts``, in libqb's order: size 0 and
        ALLOCATED, payload, size, write pointer, COMMITTED, then the
        semaphore post, so that a reader never sees a half-written chunk.

        @raise RingError: ``EAGAIN`` when it does not fit now (libqb never
            blocks a writer), ``EMSGSIZE`` when it never could.
        """
        # This runs for every message: locals, and no call but the post.
        size = 0
        for part in parts:
            size += len(part)
        total = self.size
        need = size + CHUNK_OVERHEAD
        if need > total:
            raise RingError(errno.EMSGSIZE, f"{size}-byte chunk exceeds the {total}-byte ring")
        hw, dw, words = self._hw, self._dw, self.words
        p, r = hw[_WRITE_WORD], hw[_READ_WORD]
        # freeSpace(), inlined.
        if p > r:
            free = (r - p + words - 1) * 4
        elif p < r:
            free = (r - p - 1) * 4
        else:
            free = 0 if self._sem.value() > 0 else total
        if free < need:
            raise RingError(errno.EAGAIN, "ring full")
        if p >= words:
            p %= words  # a peer's garbage: stay inside the ring
        q = p + 1 if p + 1 < words else 0
        dw[p] = 0
        dw[q] = MAGIC_ALLOCATED
        offset = (q + 1) * 4 if q + 1 < words else 0
        data = self._data
        if self.mirrored:
            # Past the end is the mirror of the start: one slice each.
            for part in parts:
                end = offset + len(part)
                data[offset:end] = part
                offset = end
        else:
            for part in parts:
                n = len(part)
                if offset + n < total:
                    data[offset : offset + n] = part
                    offset += n
                else:
                    offset = self._copyIn(offset, part)
        dw[p] = size
        following = p + 2 + (size + 3) // 4
        hw[_WRITE_WORD] = following if following < words else following % words
        dw[q] = MAGIC_COMMITTED
        self._post()

    def _copyIn(self, offset: int, part: Piece) -> int:
        data, n = self._data, len(part)
        first = min(n, self.size - offset)
        piece = memoryview(part)
        data[offset : offset + first] = piece[:first]
        if first < n:
            data[0 : n - first] = piece[first:]
            return n - first
        return (offset + n) % self.size

    # Reading

    def peek(self, counted: bool = False) -> memoryview | bytes:
        """
        The oldest committed chunk's payload, without consuming it: a view
        into the ring when it is contiguous or the ring is L{mirrored}
        (zero copy), else a copy when it wraps.  Call L{reclaim} once done
        with it.

        @param counted: the caller already took the semaphore count for
            this chunk (a waiter thread's ``sem_timedwait`` did).

        @raise RingError: ``EAGAIN`` when there is none; ``EBADMSG`` when
            the semaphore says there is one but the ring holds no committed
            chunk at the read pointer (a corrupt or hostile peer).
        """
        chunk = self.peekOrNone(counted)
        if chunk is None:
            raise RingError(errno.EAGAIN, "ring empty")
        return chunk

    def peekOrNone(self, counted: bool = False) -> memoryview | bytes | None:
        """L{peek}, but L{None} instead of ``EAGAIN``: a drain loop's end is no error."""
        if not counted and not self._tryWait():
            return None
        words = self.words
        p = self._hw[_READ_WORD]
        dw = self._dw
        q = p + 1 if p + 1 < words else 0
        if p >= words or dw[q] != MAGIC_COMMITTED:
            self._sem.post()
            found = dw[q] if p < words else None
            raise RingError(
                errno.EBADMSG,
                f"no committed chunk at word {p} (magic {found!r},"
                f" write pointer {self.writePointer}, count {self._sem.value()})",
            )
        size = dw[p]
        total = self.size
        if size + CHUNK_OVERHEAD > total:
            self._sem.post()
            raise RingError(errno.EBADMSG, f"chunk at word {p} claims {size} bytes")
        start = (q + 1) * 4 if q + 1 < words else 0
        self._peeked = (p, size)
        end = start + size
        if end <= total or self.mirrored:
            return self._bytes[start:end]
        data = self._bytes
        return b"".join((data[start:total], data[: end - total]))

    def committedAhead(self) -> bool:
        """
        Whether a committed chunk sits at the read pointer, by its magic
        alone.  For salvaging what a dead writer left: the semaphore count
        may meanwhile be held by another reader of this end.
        """
        p = self.readPointer
        return p < self.words and self._get(p + 1) == MAGIC_COMMITTED

    def reclaim(self) -> None:
        """Consume the chunk L{peek} returned, in libqb's order."""
        p, size = self._peeked
        dw, words = self._dw, self.words
        dw[p] = 0  # peek checked p < words
        dw[p + 1 if p + 1 < words else 0] = MAGIC_CONSUMED
        following = p + 2 + (size + 3) // 4
        self._hw[_READ_WORD] = following if following < words else following % words

    def userWord(self) -> int:
        """The header's signed user word (a request ring's flow control)."""
        value: int = self._hw[USER_DATA // 4]
        return value - (1 << 32) if value & 0x80000000 else value

    def release(self) -> None:
        """Drop this ring's views of the buffers (before unmapping them)."""
        self._hw.release()
        self._dw.release()
        self._bytes.release()

    def read(self, counted: bool = False) -> bytes:
        """Copy out and consume the oldest chunk (see L{peek})."""
        chunk = bytes(self.peek(counted))
        self.reclaim()
        return chunk

    def readOrNone(self, counted: bool = False) -> bytes | None:
        """L{read}, but L{None} instead of ``EAGAIN``."""
        view = self.peekOrNone(counted)
        if view is None:
            return None
        chunk = bytes(view)
        self.reclaim()
        return chunk
