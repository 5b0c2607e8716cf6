"""
The ``QB_IPC_SHM`` transport, server end.

Three rings (request, response, event), each a header file and a data file
in the connection's private directory.  Clients announce each request with
one byte on the setup socket; the server answers into the response ring
with a semaphore post and no byte (a C client waits on that semaphore),
and announces each event with one byte on the setup socket after the post.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
from collections import deque
from typing import Callable, Deque, List, Optional, Tuple

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITransport
from twisted.python.failure import Failure

from txqb._posix.files import PrivateDirectory, mapFile
from txqb._posix.semaphore import SharedSemaphore
from txqb._wire.handshake import TRANSPORT_SHM
from txqb._wire.naming import shmNames
from txqb._wire.ring import (
    HEADER_FILE_SIZE,
    SEMAPHORE,
    USER_DATA,
    Ring,
    RingError,
    dataFileSize,
    initializeHeader,
)

__all__ = ["ServerShmChannels", "SharedRing"]

_INT32 = struct.Struct("<i")
_RETRY_FIRST = 0.0005
_RETRY_MAX = 0.02


class SharedRing:
    """A ring in two shared files, mapped; owns the maps and the semaphore."""

    def __init__(self, maps: List[mmap.mmap], ring: Ring, semaphore: SharedSemaphore,
                 views: List[memoryview]) -> None:
        self._maps = maps
        self._views = views
        self.ring = ring
        self.semaphore = semaphore
        self.header = views[0]

    @classmethod
    def create(cls, directory: PrivateDirectory, base: str, maxMessageSize: int,
               uid: int, gid: int, mode: int) -> SharedRing:
        """
        Create a ring as libqb's server does: header 8252 bytes, data
        ``round_up(max + 13, page)``, absolute paths inside the header,
        a process-shared semaphore, ``ref_count`` 1.
        """
        dataSize = dataFileSize(maxMessageSize, mmap.PAGESIZE)
        name = os.path.basename(base)
        maps: List[mmap.mmap] = []
        try:
            for suffix, size in (("-header", HEADER_FILE_SIZE), ("-data", dataSize)):
                fd = directory.createFile(name + suffix, size, uid, gid, mode)
                try:
                    maps.append(mapFile(fd, size))
                finally:
                    os.close(fd)
        except BaseException:
            for m in maps:
                m.close()
            raise
        views = [memoryview(m) for m in maps]
        initializeHeader(views[0], dataSize, base + "-header", base + "-data")
        semaphore = SharedSemaphore(maps[0], SEMAPHORE)
        semaphore.initialize()
        return cls(maps, Ring(views[0], views[1], semaphore), semaphore, views)

    def close(self) -> None:
        """Unmap (the files are removed with their directory)."""
        self.semaphore.release()
        for view in self._views:
            view.release()
        for m in self._maps:
            m.close()
        self._maps = []
        self._views = []


class _RingWriter:
    """
    Writes chunks into a ring; when it is full, keeps them in order and
    retries on a short, growing timer (the reader frees space without
    telling the writer: libqb's server returns ``-EAGAIN`` instead).
    """

    def __init__(self, clock: IReactorTime, ring: Ring, afterWrite: Callable[[], None]) -> None:
        self._clock = clock
        self._ring = ring
        self._afterWrite = afterWrite
        self._queue: Deque[Tuple[bytes, Deferred[None]]] = deque()
        self._call: Optional[IDelayedCall] = None
        self._delay = _RETRY_FIRST
        self.closed = False

    def write(self, data: bytes) -> Optional[Deferred[None]]:
        if not self._queue:
            try:
                self._ring.write(data)
            except RingError as e:
                if e.errno != errno.EAGAIN:
                    raise OSError(e.errno, str(e)) from None
            else:
                self._afterWrite()
                return None
        d: Deferred[None] = Deferred()
        self._queue.append((data, d))
        if self._call is None:
            self._call = self._clock.callLater(self._delay, self._retry)
        return d

    def _retry(self) -> None:
        self._call = None
        while self._queue:
            data, d = self._queue[0]
            try:
                self._ring.write(data)
            except RingError:
                self._delay = min(self._delay * 2, _RETRY_MAX)
                self._call = self._clock.callLater(self._delay, self._retry)
                return
            self._queue.popleft()
            self._afterWrite()
            d.callback(None)
            if self.closed:
                return
        self._delay = _RETRY_FIRST

    def close(self, reason: BaseException) -> None:
        self.closed = True
        if self._call is not None:
            self._call.cancel()
            self._call = None
        queue, self._queue = self._queue, deque()
        for _, d in queue:
            d.errback(Failure(reason))


class ServerShmChannels:
    """A server's end of one SHM connection (see the module docstring)."""

    transportType = TRANSPORT_SHM

    def __init__(
        self,
        reactor: IReactorTime,
        setup: ITransport,
        directory: PrivateDirectory,
        service: str,
        maxMessageSize: int,
        uid: int,
        gid: int,
        mode: int,
        onRequest: Callable[[bytes], None],
        onError: Callable[[BaseException], None],
    ) -> None:
        names = shmNames(directory.path, service)
        self._rings: List[SharedRing] = []
        try:
            for base in names:
                self._rings.append(
                    SharedRing.create(directory, base, maxMessageSize, uid, gid, mode)
                )
        except BaseException:
            for ring in self._rings:
                ring.close()
            raise
        self._request, response, event = self._rings
        self._setup = setup
        self._onRequest = onRequest
        self._onError = onError
        self._reading = False
        self._reactor = reactor
        self._drainCall: Optional[IDelayedCall] = None
        self.doorbells = 0
        self.chunks = 0
        self._responses = _RingWriter(reactor, response.ring, _nothing)
        self._events = _RingWriter(reactor, event.ring, self._ringDoorbell)
        self._eventRing = event
        self.strings = tuple(names)

    def _ringDoorbell(self) -> None:
        # One byte per event, after the post; Twisted's write buffer keeps
        # the bytes the socket cannot take yet and sends many at once.
        self._setup.write(b"\0")

    def startReading(self) -> None:
        """Process requests (again), including those already announced."""
        if not self._reading:
            self._reading = True
            if self._drainCall is None:
                self._drainCall = self._reactor.callLater(0, self._drain)

    def stopReading(self) -> None:
        """Leave requests in the ring: flow control is on."""
        self._reading = False

    def setupBytesReceived(self, data: bytes) -> None:
        """Request doorbells: count them and read what is committed."""
        self.doorbells += len(data)
        if self._reading:
            self._drain()

    def _drain(self) -> None:
        self._drainCall = None
        ring = self._request.ring
        while self._reading and self._rings:
            try:
                chunk = ring.read()
            except RingError as e:
                if e.errno == errno.EAGAIN:
                    return
                self._onError(OSError(e.errno, f"request ring: {e}"))
                return
            self.chunks += 1
            self._onRequest(chunk)

    def sendResponse(self, data: bytes) -> Optional[Deferred[None]]:
        """Commit a response; the client is waiting on the semaphore."""
        return self._responses.write(data)

    def sendEvent(self, data: bytes) -> Optional[Deferred[None]]:
        """Commit an event and ring its doorbell."""
        return self._events.write(data)

    def eventQueueLength(self) -> int:
        """Events committed and not yet read, from the event semaphore."""
        return self._eventRing.semaphore.value() if self._rings else 0

    def setFlowControl(self, value: int) -> None:
        """The request ring's user word is the flow-control word."""
        if self._rings:
            _INT32.pack_into(self._request.header, USER_DATA, value)

    def close(self, reason: Optional[BaseException] = None) -> None:
        """Stop, fail queued sends, unmap the rings."""
        self._reading = False
        if self._drainCall is not None:
            self._drainCall.cancel()
            self._drainCall = None
        error = reason or OSError(errno.ENOTCONN, "connection closed")
        self._responses.close(error)
        self._events.close(error)
        rings, self._rings = self._rings, []
        for ring in rings:
            ring.close()


def _nothing() -> None:
    pass
