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
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, List, Optional, Tuple

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITransport
from twisted.python.failure import Failure

from txqb._posix.files import PrivateDirectory
from txqb._posix.semaphore import SharedSemaphore
from txqb._posix.shmring import SharedRing
from txqb._posix.shmring import removeIfOrphaned as _removeIfOrphaned
from txqb._wire.handshake import TRANSPORT_SHM
from txqb._wire.headers import Buffer
from txqb._wire.naming import shmNames
from txqb._wire.ring import USER_DATA, Ring, RingError, loadInt, storeWord

__all__ = ["ServerShmChannels", "ClientShmChannels", "SharedRing"]

RESPONSE_SPIN = 0.0
"""
Seconds the response waiter polls ``sem_trywait`` before it blocks in
``sem_timedwait``.  Off by default: bench/shm_wait.py measures the
choice (a spinning Python thread competes with the reactor thread for the
GIL and a core).
"""

_RETRY_FIRST = 0.0005
_RETRY_MAX = 0.02
# How often and how long a client looks for a dead server's files (0.2 s).
_ORPHAN_CHECKS = 10
_ORPHAN_CHECK_INTERVAL = 0.02


def _deliver(ring: Ring, chunk: Buffer, receiver: Callable[[Buffer], None]) -> None:
    """
    Hand a peeked chunk to C{receiver}, then let the ring have its room
    back.  The chunk is a view into the shared ring (valid during the
    call only) unless it wrapped around the ring's end.
    """
    try:
        receiver(chunk)
    finally:
        if isinstance(chunk, memoryview):
            chunk.release()
    ring.reclaim()


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
        reactor: Any,
        setup: ITransport,
        directory: PrivateDirectory,
        service: str,
        maxMessageSize: int,
        uid: int,
        gid: int,
        mode: int,
        onRequest: Callable[[Buffer], None],
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
        self.batch = 5
        """Requests read per wake-up at most."""
        self.emptyReads = 0
        """Wake-ups that found no request (libqb's ``recv_retries``)."""
        self._delivering = False
        self._closing: Optional[BaseException] = None
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
        if self._reading and self._drainCall is None:
            self._drain()

    def _drain(self) -> None:
        self._drainCall = None
        if self._delivering:
            return  # re-entered from a handler: the outer loop goes on
        ring = self._request.ring
        budget = self.batch
        while self._reading and self._rings:
            if budget == 0:
                # The rest waits for the next turn of the reactor, so that
                # other connections (and new clients) get theirs.
                self._drainCall = self._reactor.callLater(0, self._drain)
                return
            try:
                chunk = ring.peek()
            except RingError as e:
                if e.errno == errno.EAGAIN:
                    if budget == self.batch and self.doorbells > self.chunks:
                        # A doorbell for a chunk that is not there.  (Bells
                        # for chunks an earlier turn already read are not.)
                        self.emptyReads += 1
                    return
                self._onError(OSError(e.errno, f"request ring: {e}"))
                return
            budget -= 1
            self.chunks += 1
            self._delivering = True
            try:
                _deliver(ring, chunk, self._onRequest)
            finally:
                self._delivering = False
            if self._closing is not None:
                self._unmap()
                return

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
        """
        Stop, fail queued sends, unmap the rings (once the request being
        delivered, if any, is done with its view of them).
        """
        self._reading = False
        if self._drainCall is not None:
            self._drainCall.cancel()
            self._drainCall = None
        error = reason or OSError(errno.ENOTCONN, "connection closed")
        self._responses.close(error)
        self._events.close(error)
        self._closing = error
        if not self._delivering:
            self._unmap()

    def _unmap(self) -> None:
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
    ``sem_timedwait`` (ctypes releases the GIL) only while responses are
    outstanding, and hands each count it takes to the reactor thread with
    ``callFromThread``, which wakes the reactor through its waker fd.
    """

    _SLICE = 0.2

    def __init__(self, reactor: Any, semaphore: SharedSemaphore,
                 onResponse: Callable[[], None], onExit: Callable[[], None]) -> None:
        super().__init__(name="txqb-shm-response", daemon=True)
        self._reactor = reactor
        self._semaphore = semaphore
        self._onResponse = onResponse
        self._onExit = onExit
        self.wanted = threading.Event()
        self.stopping = False
        self.spin = RESPONSE_SPIN

    def _take(self) -> bool:
        if self.spin:
            deadline = time.perf_counter() + self.spin
            tryWait = self._semaphore.tryWait
            while time.perf_counter() < deadline:
                if tryWait():
                    return True
        return self._semaphore.timedWait(self._SLICE)

    def run(self) -> None:
        callFromThread = self._reactor.callFromThread
        try:
            while not self.stopping:
                if not self.wanted.wait(self._SLICE):
                    continue
                if self.stopping:
                    break
                if self._take() and not self.stopping:
                    callFromThread(self._onResponse)
        finally:
            # The maps may be closed only once this thread no longer
            # touches the semaphore: the reactor thread does it now.
            callFromThread(self._onExit)


class ClientShmChannels:
    """A client's end of one SHM connection."""

    transportType = TRANSPORT_SHM

    def __init__(
        self,
        reactor: Any,
        setup: ITransport,
        names: Tuple[str, str, str],
        maxMessageSize: int,
        onResponse: Callable[[Buffer], None],
        onEvent: Callable[[Buffer], None],
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
        self._eventDelivering = False
        self._drainCall: Optional[IDelayedCall] = None
        self.closed = False
        self._serverGone = False
        self._requests = _RingWriter(reactor, self._request.ring, self._ringDoorbell)
        self._waiter = _ResponseWaiter(
            reactor, self._response.semaphore, self._responseCounted, self._waiterExited
        )
        self._waiter.start()

    def _ringDoorbell(self) -> None:
        # Exactly one byte per request, after the post: a C server reads as
        # many bytes as it processed chunks and blocks until they come.
        self._setup.write(b"\x18")

    def flowControl(self) -> int:
        """The server's flow-control word (request ring user data)."""
        if self.closed:
            return 0
        return loadInt(self._request.header, USER_DATA)

    def sendRequest(self, data: bytes) -> Optional[Deferred[None]]:
        """Commit a request; waits (in order) while the ring is full."""
        if self.closed:
            raise OSError(errno.ENOTCONN, "connection closed")
        return self._requests.write(data)

    def awaiting(self, outstanding: bool) -> None:
        """Whether responses are outstanding: only then the waiter waits."""
        if outstanding:
            self._waiter.wanted.set()
        else:
            self._waiter.wanted.clear()

    def _responseCounted(self) -> None:
        if self.closed:
            return
        # Events committed before this response are delivered before it.
        self.drainEvents()
        ring = self._response.ring
        try:
            chunk = ring.peek(counted=True)
        except RingError as e:
            self._onError(OSError(e.errno, f"response ring: {e}"))
            return
        _deliver(ring, chunk, self._onResponse)

    def setupBytesReceived(self, data: bytes) -> None:
        """Event doorbells: read the committed events."""
        self.drainEvents()

    def drainEvents(self) -> None:
        """Deliver every committed event, unless the consumer paused them."""
        if self._eventDelivering:
            return  # re-entered from an event callback: the outer loop goes on
        ring = self._event.ring
        while not self._eventsPaused and not self.closed:
            try:
                chunk = ring.peek()
            except RingError as e:
                if e.errno != errno.EAGAIN:
                    self._onError(OSError(e.errno, f"event ring: {e}"))
                return
            self._eventDelivering = True
            try:
                _deliver(ring, chunk, self._onEvent)
            finally:
                self._eventDelivering = False

    def drain(self) -> None:
        """
        Deliver what the server committed before it went away.  Responses
        are found by their magic, not the semaphore: the waiter thread may
        hold counts whose deliveries are still on their way to the reactor
        (they are dropped once the connection is closed).
        """
        self._serverGone = True
        self.drainEvents()
        ring = self._response.ring
        while not self.closed and ring.committedAhead():
            try:
                chunk = ring.peek(counted=True)
            except RingError:
                return
            _deliver(ring, chunk, self._onResponse)

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
        self._waiter.stopping = True
        self._waiter.wanted.set()

    def _waiterExited(self) -> None:
        rings, self._rings = self._rings, []
        for ring in rings:
            ring.detach()
        self._tidy(_ORPHAN_CHECKS)

    def _tidy(self, checks: int) -> None:
        # A killed server's sockets close before its process is gone, so
        # the client may look too early: look again a few times, as
        # libqb's client does.
        if not _removeIfOrphaned(self._names) and self._serverGone and checks > 1:
            self._reactor.callLater(_ORPHAN_CHECK_INTERVAL, self._tidy, checks - 1)

