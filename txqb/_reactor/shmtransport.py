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
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, List, Optional, Tuple

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITransport
from twisted.python.failure import Failure

from txqb._posix.files import SHM_DIR, PrivateDirectory, mapFile, openSharedFile
from txqb._posix.semaphore import SharedSemaphore
from txqb._wire.handshake import TRANSPORT_SHM
from txqb._wire.naming import shmNames
from txqb._wire.ring import (
    DATA_PATH,
    HEADER_FILE_SIZE,
    HEADER_STRUCT_SIZE,
    REF_COUNT,
    SEMAPHORE,
    USER_DATA,
    Ring,
    RingError,
    dataFileSize,
    initializeHeader,
    loadInt,
    loadWord,
    readPath,
    storeWord,
)

__all__ = ["ServerShmChannels", "ClientShmChannels", "SharedRing"]

RESPONSE_SPIN = 0.0
"""
Seconds the response waiter polls ``sem_trywait`` before it blocks in
``sem_timedwait``.  Off by default: a spinning Python thread competes with
the reactor thread for the GIL and a core (see docs/performance.rst).
"""

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

    @classmethod
    def attach(cls, base: str) -> SharedRing:
        """
        Open a ring a server created, as libqb's client does, except that
        nothing is truncated: the header's own paths and sizes are checked
        against the files instead, so a hostile or mismatched server cannot
        make txqb map past the end of a file (``SIGBUS``).
        """
        if not os.path.isabs(base):
            raise OSError(errno.EBADMSG, f"server named ring {base!r}")
        maps: List[mmap.mmap] = []
        views: List[memoryview] = []
        semaphore: Optional[SharedSemaphore] = None
        try:
            fd = openSharedFile(base + "-header", HEADER_STRUCT_SIZE)
            try:
                maps.append(mapFile(fd, os.fstat(fd).st_size))
            finally:
                os.close(fd)
            views.append(memoryview(maps[0]))
            words = loadWord(views[0], 8)
            fd = openSharedFile(readPath(views[0], DATA_PATH), words * 4)
            try:
                maps.append(mapFile(fd, words * 4))
            finally:
                os.close(fd)
            views.append(memoryview(maps[1]))
            semaphore = SharedSemaphore(maps[0], SEMAPHORE)
            ring = Ring(views[0], views[1], semaphore)
        except BaseException as e:
            # Unwind in reverse: pointers into the maps before the maps.
            if semaphore is not None:
                semaphore.release()
            for view in views:
                view.release()
            for m in maps:
                m.close()
            if isinstance(e, RingError):
                raise OSError(e.errno, str(e)) from None
            raise
        storeWord(views[0], REF_COUNT, loadInt(views[0], REF_COUNT) + 1)
        return cls(maps, ring, semaphore, views)

    def detach(self) -> None:
        """Drop this client's reference (libqb: 1, then 0), then unmap."""
        if self._views:
            storeWord(self.header, REF_COUNT, 0)
        self.close()

    def close(self) -> None:
        """Unmap (the files are removed with their directory)."""
        if self._views:
            self.ring.release()
        self.semaphore.release()
        for view in self._views:
            view.release()
        for m in self._maps:
            m.close()
        self._maps = []
        self._views = []


class _Doorbell:
    """
    One byte on the setup socket per committed chunk, batched: the first
    chunk of a reactor turn rings at once (a waiting peer wakes without
    delay), the rest of that turn's bytes go out together at the end of
    the turn, or every L{BATCH} chunks, so a burst costs a few system
    calls, not one each.  Every chunk still gets exactly one byte, after
    its post.
    """

    BATCH = 64

    def __init__(self, clock: IReactorTime, setup: ITransport, byte: bytes) -> None:
        self._clock = clock
        self._send: Callable[[bytes], None] = getattr(setup, "writeNow", setup.write)
        self._byte = byte
        self._held = 0
        self._call: Optional[IDelayedCall] = None

    def ring(self) -> None:
        if self._call is None:
            self._send(self._byte)
            self._call = self._clock.callLater(0, self._flush)
            return
        self._held += 1
        if self._held >= self.BATCH:
            self._held = 0
            self._send(self._byte * self.BATCH)

    def _flush(self) -> None:
        self._call = None
        if self._held:
            held, self._held = self._held, 0
            self._send(self._byte * held)

    def close(self) -> None:
        """Ring what is held (the chunks are committed), stop the timer."""
        if self._call is not None:
            self._call.cancel()
            self._flush()


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

    def kick(self) -> None:
        """The reader has just taken something: retry the queue now."""
        if self._queue and self._call is not None:
            self._call.cancel()
            self._delay = _RETRY_FIRST
            self._retry()

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
        reactor: Any,
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
        self._doorbell = _Doorbell(reactor, setup, b"\0")
        self._responses = _RingWriter(reactor, response.ring, _nothing)
        self._events = _RingWriter(reactor, event.ring, self._doorbell.ring)
        self._eventRing = event
        self.strings = tuple(names)

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
        # A client that sends has likely read: retry full rings now.
        self._responses.kick()
        self._events.kick()
        if self._reading:
            self._drain()

    def _drain(self) -> None:
        self._drainCall = None
        ring = self._request.ring
        while self._reading and self._rings:
            try:
                chunk = ring.readOrNone()
            except RingError as e:
                self._onError(OSError(e.errno, f"request ring: {e}"))
                return
            if chunk is None:
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
            storeWord(self._request.header, USER_DATA, value)

    def close(self, reason: Optional[BaseException] = None) -> None:
        """Stop, fail queued sends, unmap the rings."""
        self._reading = False
        if self._drainCall is not None:
            self._drainCall.cancel()
            self._drainCall = None
        error = reason or OSError(errno.ENOTCONN, "connection closed")
        self._responses.close(error)
        self._events.close(error)
        self._doorbell.close()
        rings, self._rings = self._rings, []
        for ring in rings:
            ring.close()


def _nothing() -> None:
    pass


class _ResponseWaiter(threading.Thread):
    """
    Waits on the response ring's semaphore off the reactor thread.

    A libqb server posts no byte for a response, only the semaphore, which
    is a futex and cannot be polled.  This thread blocks in
    ``sem_timedwait`` (ctypes releases the GIL) only while it is armed and
    responses are outstanding, and hands the counts it takes to the
    reactor thread with one ``callFromThread`` (which wakes the reactor
    through its waker fd).

    It disarms with each hand-over; the reactor thread takes any further
    responses with ``sem_trywait`` while it runs, and re-arms this thread
    only once it finds none.  So while responses stream in (pipelining)
    nobody sleeps on the semaphore and the server's posts wake no thread:
    each such wake-up costs a futex call in the server, a GIL hand-over
    here and a reactor turn.
    """

    _SLICE = 0.2

    def __init__(self, reactor: Any, semaphore: SharedSemaphore,
                 onResponse: Callable[[int], None], onExit: Callable[[], None]) -> None:
        super().__init__(name="txqb-shm-response", daemon=True)
        self._reactor = reactor
        self._semaphore = semaphore
        self._onResponse = onResponse
        self._onExit = onExit
        self._wake = threading.Event()
        self.armed = False
        self.outstanding = False
        self.stopping = False
        self.spin = RESPONSE_SPIN

    def arm(self) -> None:
        """Reactor thread: wait on the semaphore (again)."""
        if not self.armed:
            self.armed = True
            self._wake.set()

    def _take(self) -> bool:
        if self.spin:
            deadline = time.perf_counter() + self.spin
            tryWait = self._semaphore.tryWait
            while time.perf_counter() < deadline:
                if tryWait():
                    return True
        return self._semaphore.timedWait(self._SLICE)

    def _serve(self) -> None:
        callFromThread = self._reactor.callFromThread
        tryWait = self._semaphore.tryWait
        while not self.stopping:
            if not self.outstanding:
                self.armed = False
                # arm() may have run just before and found us armed.
                if not self.outstanding:
                    return
                self.armed = True
                continue
            if not self._take():
                continue
            # Take every count already there: one hand-over for a burst.
            counted = 1
            while tryWait():
                counted += 1
            if self.stopping:
                return
            # Disarm before the hand-over: the reactor thread re-arms
            # after it, once it finds no more responses.
            self.armed = False
            callFromThread(self._onResponse, counted)
            return

    def run(self) -> None:
        try:
            while not self.stopping:
                if not self._wake.wait(self._SLICE):
                    continue
                self._wake.clear()
                self._serve()
        finally:
            # The maps may be closed only once this thread no longer
            # touches the semaphore: the reactor thread does it now.
            self._reactor.callFromThread(self._onExit)


class ClientShmChannels:
    """A client's end of one SHM connection."""

    transportType = TRANSPORT_SHM

    def __init__(
        self,
        reactor: Any,
        setup: ITransport,
        names: Tuple[str, str, str],
        maxMessageSize: int,
        onResponse: Callable[[bytes], None],
        onEvent: Callable[[bytes], None],
        onError: Callable[[BaseException], None],
    ) -> None:
        self._rings: List[SharedRing] = []
        try:
            for base in names:
                self._rings.append(SharedRing.attach(base))
        except BaseException:
            for ring in self._rings:
                ring.detach()
            raise
        self._request, self._response, self._event = self._rings
        self._names = names
        self._reactor = reactor
        self._setup = setup
        self._onResponse = onResponse
        self._onEvent = onEvent
        self._onError = onError
        self._eventsPaused = False
        self._drainCall: Optional[IDelayedCall] = None
        self.closed = False
        # Exactly one byte per request, after the post: a C server reads as
        # many bytes as it processed chunks and blocks until they come.
        self._doorbell = _Doorbell(reactor, setup, b"\x18")
        self._requests = _RingWriter(reactor, self._request.ring, self._doorbell.ring)
        self._waiter = _ResponseWaiter(
            reactor, self._response.semaphore, self._responseCounted, self._waiterExited
        )
        self._waiter.start()

    def flowControl(self) -> int:
        """The server's flow-control word (request ring user data)."""
        if self.closed:
            return 0
        return self._request.ring.userWord()

    def sendRequest(self, data: bytes) -> Optional[Deferred[None]]:
        """Commit a request; waits (in order) while the ring is full."""
        if self.closed:
            raise OSError(errno.ENOTCONN, "connection closed")
        return self._requests.write(data)

    def awaiting(self, outstanding: bool) -> None:
        """Whether responses are outstanding: only then the waiter waits."""
        waiter = self._waiter
        waiter.outstanding = outstanding
        if outstanding:
            waiter.arm()

    def _responseCounted(self, counted: int) -> None:
        """
        Deliver the responses the waiter counted, then any that were
        committed meanwhile: while this thread is running anyway, taking
        a count here costs one ``sem_trywait``, where the waiter would
        cost a thread hop (a GIL hand-over and a reactor wake-up) each.
        Which thread took a count does not matter: chunks are read in
        ring order, here.

        The client drains the event ring before it takes each response,
        so events committed before a response are delivered before it.
        """
        ring = self._response.ring
        tryWait = self._response.semaphore.tryWait
        waiter = self._waiter
        try:
            while not self.closed:
                if counted:
                    counted -= 1
                elif not waiter.outstanding or not tryWait():
                    return
                try:
                    chunk = ring.read(counted=True)
                except RingError as e:
                    self._onError(OSError(e.errno, f"response ring: {e}"))
                    return
                self._onResponse(chunk)
        finally:
            if not self.closed:
                # The server took requests to answer these: room, maybe.
                self._requests.kick()
                if waiter.outstanding:
                    waiter.arm()

    def setupBytesReceived(self, data: bytes) -> None:
        """Event doorbells: read the committed events."""
        self.drainEvents()

    def drainEvents(self) -> None:
        """Deliver every committed event, unless the consumer paused them."""
        ring = self._event.ring
        while not self._eventsPaused and not self.closed:
            try:
                chunk = ring.readOrNone()
            except RingError as e:
                self._onError(OSError(e.errno, f"event ring: {e}"))
                return
            if chunk is None:
                return
            self._onEvent(chunk)

    def drain(self) -> None:
        """
        Deliver what the server committed before it went away.  Responses
        are found by their magic, not the semaphore: the waiter thread may
        hold counts whose deliveries are still on their way to the reactor
        (they are dropped once the connection is closed).
        """
        self.drainEvents()
        ring = self._response.ring
        while not self.closed and ring.committedAhead():
            try:
                chunk = ring.read(counted=True)
            except RingError:
                return
            self._onResponse(chunk)

    def pauseEvents(self) -> None:
        """Leave events in the ring; the server's sends wait."""
        self._eventsPaused = True

    def resumeEvents(self) -> None:
        """Read events again, those already committed first."""
        self._eventsPaused = False
        if self._drainCall is None and not self.closed:
            self._drainCall = self._reactor.callLater(0, self._drainLater)

    def _drainLater(self) -> None:
        self._drainCall = None
        self.drainEvents()

    def close(self, reason: Optional[BaseException] = None) -> None:
        """Stop the waiter; the rings are unmapped once it has exited."""
        if self.closed:
            return
        self.closed = True
        if self._drainCall is not None:
            self._drainCall.cancel()
            self._drainCall = None
        self._requests.close(reason or OSError(errno.ENOTCONN, "connection closed"))
        self._doorbell.close()
        self._waiter.stopping = True
        self._waiter.arm()

    def _waiterExited(self) -> None:
        rings, self._rings = self._rings, []
        for ring in rings:
            ring.detach()
        _removeIfOrphaned(self._names)


def _isZombie(pid: int) -> bool:
    """Whether ``pid`` has exited and only waits to be reaped (state Z)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


def _removeIfOrphaned(names: Tuple[str, ...]) -> None:
    """
    After a server died, remove the ring files it can no longer remove,
    as libqb's client does.  Only files inside a ``qb-*`` directory of
    /dev/shm are touched, and only when that directory's owner process
    (the server pid in its name) is gone, or exited and not yet reaped.
    """
    directory = os.path.dirname(names[0])
    base = os.path.basename(directory)
    if os.path.dirname(directory) != SHM_DIR or not base.startswith("qb-"):
        return
    try:
        serverPid = int(base.split("-")[1])
        os.kill(serverPid, 0)
        if not _isZombie(serverPid):
            return
    except (ValueError, IndexError):
        return
    except PermissionError:
        return
    except ProcessLookupError:
        pass
    for name in names:
        for suffix in ("-header", "-data"):
            try:
                os.unlink(name + suffix)
            except OSError:
                pass
    try:
        os.rmdir(directory)
    except OSError:
        pass
