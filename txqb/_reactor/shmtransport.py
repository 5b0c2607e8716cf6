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
import heapq
import os
import threading
import time
import weakref
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple, Union

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorFDSet,
    IReactorTime,
    IReadDescriptor,
    ITransport,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from txqb._posix.files import PrivateDirectory
from txqb._posix.futex import WAITV_MAX, WaitList, waitvAvailable
from txqb._posix.libc import preciseSleeps
from txqb._posix.semaphore import SharedSemaphore
from txqb._posix.shmring import SharedRing
from txqb._posix.shmring import removeIfOrphaned as _removeIfOrphaned
from txqb._posix.uring import CANCELLED, FutexRing, futexRingAvailable
from txqb._reactor.peek import MAX_RUN, reactorPeekFor
from txqb._reactor.perreactor import PerReactor
from txqb._wire.handshake import TRANSPORT_SHM
from txqb._wire.headers import Buffer, Payload, heldPayload, payloadSize
from txqb._wire.naming import shmNames
from txqb._wire.ring import CHUNK_OVERHEAD, USER_DATA, Ring, RingError, storeWord

__all__ = ["ServerShmChannels", "ClientShmChannels", "SharedRing"]

RESPONSE_SPIN = 0.0
"""
Seconds the response waiter polls ``sem_trywait`` before it blocks in
``sem_timedwait``.  Off by default: a spinning Python thread competes with
the reactor thread for the GIL and a core (see docs/performance.rst).
"""

URING_RESPONSES = True
"""
Wait for SHM responses in the reactor itself, through an io_uring whose
descriptor it polls (L{_UringWatch}), where the kernel allows it (Linux
6.7 and later on x86-64) and the reactor provides C{IReactorFDSet}; if
False, or where not, as L{WATCH_RESPONSES} says.
"""

WATCH_RESPONSES = True
"""
Wait for the responses of all of a process's SHM connections in one
thread (L{_ResponseWatch}, with ``futex_waitv``) where the kernel and
glibc allow it; if False, or where they do not, a thread per connection
waits in ``sem_timedwait`` (L{_ResponseWaiter}).
"""

_RETRY_FIRST = 0.0005
_RETRY_MAX = 0.02
# How often the room watcher looks at full rings: every 25 us for the
# first 2 ms of a wait (a C reader empties a ring of 64 KiB chunks in less
# than 100 us: looking less often leaves it idle), every 100 us up to
# 20 ms (a reader takes a large chunk within that), then every
# millisecond up to half a second, then every 10 ms (a stalled reader
# costs next to nothing).  A thread lingers a second once idle.
_WATCH_STEPS = ((0.002, 0.000025), (0.02, 0.0001), (0.5, 0.001), (float("inf"), 0.01))
_WATCH_LINGER = 1.0
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


class _TurnEnd:
    """
    Marks the end of a reactor turn for all of a reactor's doorbells with
    one C{callLater(0)}, where a call per doorbell would cost a timer and
    its heap operations per connection per turn.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._call: Optional[IDelayedCall] = None
        self._held: List[_Doorbell] = []
        self.turn = 0
        """Advances at the end of each turn in which a doorbell rang."""
        self.gathering = False
        """
        While set, every doorbell is held until L{release}: the requests
        that a batch of responses' callbacks send then reach the server
        with one wake-up (its reactor finds them all ready at once), not
        one each as they are made.
        """

    def release(self) -> None:
        """Ring what L{gathering} held; the rest of the turn rings at its end."""
        self.gathering = False
        if self._held:
            self.begin()
            self._ringHeld()

    def begin(self) -> None:
        """A doorbell rang at once: end this turn once the reactor is done."""
        if self._call is None:
            self._call = self._clock.callLater(0, self._end)

    def hold(self, bell: _Doorbell) -> None:
        """C{bell} holds bytes to send at the end of this turn."""
        self._held.append(bell)

    def _end(self) -> None:
        self._call = None
        self.turn += 1
        self._ringHeld()

    def _ringHeld(self) -> None:
        held, self._held = self._held, []
        for bell in held:
            bell.flush()

    def closed(self, bell: _Doorbell) -> None:
        """C{bell} is closed (and flushed): no timer is left for nothing."""
        if bell in self._held:
            self._held.remove(bell)
        if not self._held and self._call is not None:
            # The next ring of any doorbell starts a new turn: always safe.
            self._call.cancel()
            self._call = None
            self.turn += 1


_turnEndFor = PerReactor(_TurnEnd)


class _Doorbell:
    """
    One byte on the setup socket per committed chunk, batched: the first
    chunk of a reactor turn rings at once (a waiting peer wakes without
    delay), the rest of that turn's bytes go out together at the end of
    the turn (L{_TurnEnd}), or every L{BATCH} chunks, so a burst costs a
    few system calls, not one each.  While the reactor delivers a batch of
    responses (L{_TurnEnd.gathering}), the first waits too, for the batch's
    end.  Every chunk still gets exactly one byte, after its post.
    """

    BATCH = 64

    def __init__(self, clock: IReactorTime, setup: ITransport, byte: bytes) -> None:
        self._turnEnd = _turnEndFor(clock)
        self._send: Callable[[bytes], None] = getattr(setup, "writeNow", setup.write)
        self._byte = byte
        self._held = 0
        self._turn = -1

    def ring(self) -> None:
        turnEnd = self._turnEnd
        if self._turn != turnEnd.turn:
            self._turn = turnEnd.turn
            if not turnEnd.gathering:
                self._send(self._byte)
                turnEnd.begin()
                return
        if not self._held:
            turnEnd.hold(self)
        self._held += 1
        if self._held >= self.BATCH:
            # Still held (for the rest of this turn): count afresh.
            self._held = 1
            self._send(self._byte * (self.BATCH - 1))

    def flush(self) -> None:
        """Send the bytes held for this turn."""
        if self._held:
            held, self._held = self._held, 0
            self._send(self._byte * held)

    def close(self) -> None:
        """Ring what is held (the chunks are committed), stop the timer."""
        self.flush()
        self._turn = -1
        self._turnEnd.closed(self)


class _RoomWatcher:
    """
    Watches full rings for room, for every writer of the process, in one
    thread that exists only while some writer waits (and a little after).

    A ring's reader frees room without telling anyone (libqb's writers
    get ``-EAGAIN`` and try again), and a timer on the reactor cannot look
    more often than every millisecond (the resolution of ``epoll_wait``),
    which for large chunks costs most of the time: a 1 MiB ring holds one
    1 MiB chunk, and its reader takes it in about 100 us.  This thread
    looks at the waiting rings' pointers every 100 us while a wait is
    young (see L{_WATCH_STEPS}) and wakes the reactor for a writer only
    when its next chunk fits.  Between looks it sleeps without the GIL.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._writers: Set[_RingWriter] = set()
        self._thread: Optional[threading.Thread] = None
        self._wake = threading.Event()
        self._since = 0.0

    def watch(self, writer: _RingWriter) -> None:
        """Reactor thread: tell C{writer} (with C{kick}) once it has room."""
        with self._lock:
            # A new wait is young: look often again.
            self._since = time.monotonic()
            self._writers.add(writer)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="txqb-shm-room",
                                                daemon=True)
                self._thread.start()
        self._wake.set()

    def unwatch(self, writer: _RingWriter) -> None:
        """Reactor thread: C{writer} no longer waits."""
        with self._lock:
            self._writers.discard(writer)

    def _run(self) -> None:
        preciseSleeps()
        while True:
            with self._lock:
                writers = list(self._writers)
                if not writers:
                    self._wake.clear()
            if not writers:
                if not self._wake.wait(_WATCH_LINGER):
                    with self._lock:
                        if not self._writers:
                            self._thread = None
                            return
                continue
            for writer in writers:
                if writer.hasRoom():
                    with self._lock:
                        self._writers.discard(writer)
                        self._since = time.monotonic()
                    writer.wake()
            waited = time.monotonic() - self._since
            for limit, interval in _WATCH_STEPS:
                if waited < limit:
                    time.sleep(interval)
                    break


_roomWatcher = _RoomWatcher()


class _RingWriter:
    """
    Writes chunks into a ring; when it is full, keeps them in order and
    retries once the ring has room (the reader frees space without
    telling the writer: libqb's server returns ``-EAGAIN`` instead): when
    L{kick}ed (the peer did something that shows it read), or when the
    L{_RoomWatcher} sees room; with a clock that has no C{callFromThread}
    (tests), on a short, growing timer.
    """

    def __init__(self, clock: IReactorTime, ring: Ring, afterWrite: Callable[[], None]) -> None:
        self._clock = clock
        self._ring = ring
        self._afterWrite = afterWrite
        self._queue: Deque[Tuple[bytes, Payload, Deferred[None]]] = deque()
        self._call: Optional[IDelayedCall] = None
        self._delay = _RETRY_FIRST
        self._watching = False
        self._callFromThread: Optional[Callable[..., None]] = getattr(
            clock, "callFromThread", None
        )
        self.closed = False

    def hasRoom(self) -> bool:
        """Watcher thread: whether the next queued chunk fits now."""
        try:
            header, payload, _ = self._queue[0]
            need = len(header) + payloadSize(payload) + CHUNK_OVERHEAD
            room: bool = self._ring.freeSpace() >= need
            return room
        except (IndexError, ValueError, OSError):
            # Emptied or closed meanwhile: let the reactor thread see.
            return True

    def wake(self) -> None:
        """Watcher thread: have the reactor thread retry (L{kick})."""
        assert self._callFromThread is not None  # only such writers are watched
        self._callFromThread(self.kick)

    def _wait(self) -> None:
        if self._callFromThread is not None:
            if not self._watching:
                self._watching = True
                _roomWatcher.watch(self)
        elif self._call is None:
            self._call = self._clock.callLater(self._delay, self._retry)

    def _unwatch(self) -> None:
        if self._watching:
            self._watching = False
            _roomWatcher.unwatch(self)

    def write(self, header: bytes, payload: Payload = b"") -> Optional[Deferred[None]]:
        """
        Write one chunk (a header and its payload, or the payload's parts):
        at once, or later, in order (then what is not C{bytes} is copied:
        the caller's buffer may change or be a view of a ring).
        """
        if not self._queue:
            try:
                self._put(header, payload)
            except RingError as e:
                if e.errno != errno.EAGAIN:
                    raise OSError(e.errno, str(e)) from None
            else:
                self._afterWrite()
                return None
        d: Deferred[None] = Deferred()
        self._queue.append((header, heldPayload(payload), d))
        self._wait()
        return d

    def _put(self, header: bytes, payload: Payload) -> None:
        if isinstance(payload, tuple):
            self._ring.write(header, *payload)
        else:
            self._ring.write(header, payload)

    def kick(self) -> None:
        """The reader has (perhaps) just taken something: retry the queue now."""
        self._unwatch()
        if self._queue and not self.closed:
            if self._call is not None:
                self._call.cancel()
            self._delay = _RETRY_FIRST
            self._retry()

    def _retry(self) -> None:
        self._call = None
        while self._queue:
            header, payload, d = self._queue[0]
            try:
                self._put(header, payload)
            except RingError:
                self._delay = min(self._delay * 2, _RETRY_MAX)
                self._wait()
                return
            self._queue.popleft()
            self._afterWrite()
            d.callback(None)
            if self.closed:
                return
        self._delay = _RETRY_FIRST

    def close(self, reason: BaseException) -> None:
        self.closed = True
        self._unwatch()
        if self._call is not None:
            self._call.cancel()
            self._call = None
        queue, self._queue = self._queue, deque()
        for _, _, d in queue:
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
        self._doorbell = _Doorbell(reactor, setup, b"\0")
        self._peek = reactorPeekFor(reactor)
        fileno = getattr(setup, "fileno", None)
        self._setupFd: int = fileno() if fileno is not None else -1
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
        if self._reading and self._drainCall is None:
            self._drain()

    def _drain(self) -> None:
        self._drainCall = None
        if self._delivering:
            return  # re-entered from a handler: the outer loop goes on
        ring = self._request.ring
        budget = self.batch
        run = 1
        while self._reading and self._rings:
            if budget == 0:
                if run < MAX_RUN and self._peek.alone(self._setupFd):
                    # A turn would come straight back here (see peek).
                    run += 1
                    budget = self.batch
                    continue
                # The rest waits for the next turn of the reactor, so that
                # other connections (and new clients) get theirs.
                self._drainCall = self._reactor.callLater(0, self._drain)
                return
            try:
                chunk = ring.peekOrNone()
            except RingError as e:
                self._onError(OSError(e.errno, f"request ring: {e}"))
                return
            if chunk is None:
                if budget == self.batch and self.doorbells > self.chunks:
                    # A doorbell for a chunk that is not there.  (Bells
                    # for chunks an earlier turn already read are not.)
                    self.emptyReads += 1
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

    def sendResponse(self, header: bytes, payload: Payload = b"") -> Optional[Deferred[None]]:
        """Commit a response; the client is waiting on the semaphore."""
        return self._responses.write(header, payload)

    def sendEvent(self, header: bytes, payload: Payload = b"") -> Optional[Deferred[None]]:
        """Commit an event and ring its doorbell."""
        return self._events.write(header, payload)

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
        self._doorbell.close()
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


class _ResponseWatch:
    """
    Waits for responses on up to L{CAPACITY} SHM connections of this
    process in one thread, with ``futex_waitv`` (see L{txqb._posix.futex});
    L{_ResponseWaiter} needs a thread per connection instead, and a
    hundred threads contending for the GIL cost more than the responses.

    The thread only looks: it never takes a count.  A connection is armed
    (L{arm}) while responses are outstanding and none is known to be
    there; once the thread sees its count above 0 it disarms it and hands
    it to its reactor, one ``callFromThread`` for all it found at once.
    The reactor thread takes the counts with ``sem_trywait`` as it reads
    the responses, and re-arms once it finds none.

    The kernel reads the wait list only when a wait starts, so a re-armed
    connection must not need the thread to wake and start another wait
    (a wake-up and a GIL hand-over per round trip).  A handed-over
    connection's slot therefore keeps waiting on its semaphore, expecting
    the count the thread saw ("masked"): the thread sleeps through that
    count, yet stays queued on the semaphore's futex, and the semaphore
    says a waiter sleeps for as long as the slot is armed or masked, so the
    next ``sem_post`` wakes it (a post costs its poster a ``futex`` call
    while the semaphore says so: only while the slot waits on it).
    Re-arming a masked slot only sets its
    expected value back to 0 and moves the control word (a plain store):
    a thread that has not yet started its wait then finds the control
    word changed and looks again.  Only a slot the thread cleared (more
    posts came while masked: it stops waking for them) needs the thread
    woken, and while the reactor thread delivers a hand-over those
    wake-ups are held and sent once at its end.

    All shared state (the wait list, the sets) changes under one lock,
    and the thread reads a connection's semaphore only under it: once
    L{remove} returns, the connection's maps may be closed.
    """

    CAPACITY = WAITV_MAX - 1
    """Connections per thread (slot 0 of the wait list is its control)."""

    LINGER = 1.0
    """Seconds the thread lives on once it watches no connection."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._list = WaitList(WAITV_MAX)
        self._slots: List[Optional[_WatchedSemaphore]] = [None] * WAITV_MAX
        # The lowest free slot is taken first and only slots up to the
        # highest in use are passed to the kernel, which sets up a queue
        # per slot on every wait: 128 of them cost more than a response.
        self._free = list(range(1, self.CAPACITY + 1))
        self._slotsInUse = 1
        self._armed: Set[_WatchedSemaphore] = set()
        self._masked: Set[_WatchedSemaphore] = set()
        self._thread: Optional[threading.Thread] = None
        self._sleeping = False
        self._holding = 0
        self._heldWake = False

    def full(self) -> bool:
        """Whether every slot is taken (any thread)."""
        with self._lock:
            return not self._free

    def add(self, watched: _WatchedSemaphore) -> bool:
        """Reactor thread: watch a connection, if a slot is free."""
        with self._lock:
            if not self._free:
                return False
            watched.slot = heapq.heappop(self._free)
            watched.watch = self
            self._slots[watched.slot] = watched
            self._slotsInUse = max(self._slotsInUse, watched.slot + 1)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="txqb-shm-responses",
                                                daemon=True)
                self._thread.start()
            return True

    def remove(self, watched: _WatchedSemaphore) -> None:
        """Reactor thread: stop watching; the thread no longer reads it."""
        with self._lock:
            slot = watched.slot
            if slot is None:
                return
            watched.slot = None
            self._armed.discard(watched)
            self._masked.discard(watched)
            watched.semaphore.setWaiting(False)
            self._list.clear(slot)
            self._slots[slot] = None
            heapq.heappush(self._free, slot)
            while self._slotsInUse > 1 and self._slots[self._slotsInUse - 1] is None:
                self._slotsInUse -= 1
            wake = self._sleeping
        if wake:
            self._list.wake()

    def arm(self, watched: _WatchedSemaphore) -> None:
        """Reactor thread: tell C{watched}'s reactor once its count is up."""
        if watched in self._armed:
            return  # (only this thread arms; the watch thread disarms)
        with self._lock:
            slot = watched.slot
            if slot is None:
                return
            self._armed.add(watched)
            if watched in self._masked:
                # Still queued on this futex, if asleep: the next post
                # wakes it; if not yet asleep, it looks again.
                self._masked.discard(watched)
                self._list.expect(slot, 0)
                self._list.touch()
                return
            watched.semaphore.setWaiting(True)
            self._list.point(slot, watched.semaphore.countAddress)
            if not self._sleeping:
                self._list.touch()
                return
            if self._holding:
                self._heldWake = True
                return
        self._list.wake()

    def _deliver(self, ready: List[_WatchedSemaphore]) -> None:
        """Reactor thread: the connections in C{ready} have responses."""
        self._holding += 1
        try:
            for watched in ready:
                if watched.slot is not None:
                    watched.onReady()
        finally:
            self._holding -= 1
            if not self._holding and self._heldWake:
                self._heldWake = False
                self._list.wake()

    def _look(self) -> Dict[Any, List[_WatchedSemaphore]]:
        # Under the lock: hand over the armed connections with a count
        # (masking their slots), stop waking for masked ones whose count
        # moved on (their reactor is on its way to them anyway).
        for watched in [w for w in self._masked if w.semaphore.count() != w.seen]:
            self._masked.discard(watched)
            assert watched.slot is not None
            self._list.clear(watched.slot)
            watched.semaphore.setWaiting(False)
        found: Dict[Any, List[_WatchedSemaphore]] = {}
        for watched in self._armed:
            count = watched.semaphore.count()
            if count:
                assert watched.slot is not None
                watched.seen = count
                self._list.expect(watched.slot, count)
                found.setdefault(watched.reactor, []).append(watched)
        for ready in found.values():
            for watched in ready:
                self._armed.discard(watched)
                self._masked.add(watched)
        return found

    def _run(self) -> None:
        idleSince: Optional[float] = None
        while True:
            with self._lock:
                found = self._look()
                if not found:
                    if len(self._free) < self.CAPACITY:
                        idleSince = None
                    elif idleSince is None:
                        idleSince = time.monotonic()
                    elif time.monotonic() - idleSince >= self.LINGER:
                        self._thread = None
                        return
                    self._list.prepare()
                    self._sleeping = True
                    timeout = None if idleSince is None else self.LINGER
                    slots = self._slotsInUse
            for reactor, ready in found.items():
                reactor.callFromThread(self._deliver, ready)
            if found:
                continue
            try:
                self._list.wait(slots, timeout)
            finally:
                with self._lock:
                    self._sleeping = False


_responseWatches: List[_ResponseWatch] = []


def _forgetThreads() -> None:
    # A forked child has only the thread that forked: it starts its own
    # watchers (with locks no thread of the parent may hold).
    global _roomWatcher
    _roomWatcher = _RoomWatcher()
    del _responseWatches[:]
    # The parent's rings (their waits queued by its reactor thread) are
    # not the child's: it makes its own.
    _uringWatches.clear()


os.register_at_fork(after_in_child=_forgetThreads)


def _watchResponses(watched: _WatchedSemaphore) -> None:
    """Give C{watched} a slot in a watch thread, a new one if all are full."""
    for watch in _responseWatches:
        if watch.add(watched):
            return
    watch = _ResponseWatch()
    _responseWatches.append(watch)
    watch.add(watched)


class _WatchedSemaphore:
    """
    One connection's response semaphore, watched by a L{_ResponseWatch}:
    the same face to L{ClientShmChannels} as L{_ResponseWaiter}.
    """

    def __init__(self, reactor: Any, semaphore: SharedSemaphore,
                 onResponse: Callable[[int], None], onExit: Callable[[], None]) -> None:
        self.reactor = reactor
        self.semaphore = semaphore
        self._onResponse = onResponse
        self._onExit = onExit
        self.slot: Optional[int] = None
        self.seen = 0
        """The count its watch saw when it handed it over."""
        self.watch: Optional[_ResponseWatch] = None
        self.outstanding = False
        self.stopping = False

    def start(self) -> None:
        """Take a slot in a watch thread."""
        _watchResponses(self)

    def onReady(self) -> None:
        """Reactor thread: the count is up; the channels take it."""
        self._onResponse(0)

    def arm(self) -> None:
        """Reactor thread: be told once the count is up (again)."""
        assert self.watch is not None
        if self.stopping:
            self.watch.remove(self)
            # As the per-connection waiter does: the maps are closed on a
            # later turn, never inside the call that closed the channels.
            self.reactor.callFromThread(self._onExit)
        else:
            self.watch.arm(self)


@implementer(IReadDescriptor)
class _UringWatch:
    """
    Waits for the responses of a reactor's SHM connections in the reactor
    itself: a futex wait per armed connection, queued on a L{FutexRing}
    whose descriptor the reactor polls.  A server's ``sem_post`` then
    wakes the reactor directly, where L{_ResponseWatch} wakes its thread,
    which wakes the reactor (two wake-ups and a GIL hand-over per
    response, on a machine whose cores the two peers already keep busy).

    A connection is armed while responses are outstanding and none is
    known to be there, as with the other waiters: its semaphore says a
    waiter sleeps (so that ``sem_post`` wakes the futex) and its wait is
    queued.  Each wait ends once (posted, or a count already there), the
    connection is disarmed and takes its responses, and re-arms once it
    finds no more.  Arms made while the ring's ends are delivered are
    queued with one system call for all of them.

    The ring exists only while a connection uses it, so an idle reactor
    has neither the descriptor nor its reader.
    """

    ENTRIES = 1024
    """The ring's submission entries: one per connection, one for cancels."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._ring: Optional[FutexRing] = None
        self._slots: List[Optional[_UringSemaphore]] = []
        self._free: List[int] = []
        self._used = 0
        self._generation = 0
        self._reaping = False
        self._turnEnd = _turnEndFor(reactor)

    def add(self, watched: _UringSemaphore) -> bool:
        """Give C{watched} a slot (and the ring a reader), if one is free."""
        if self._ring is None:
            self._ring = FutexRing(self.ENTRIES)
            self._slots = [None] * self._ring.capacity
            self._free = list(range(self._ring.capacity))
            self._reactor.addReader(self)
        if not self._free:
            return False
        slot = heapq.heappop(self._free)
        # Its ends carry the slot and a generation (never 0, the cancels'
        # user data), so that a late end of a former user is known.
        self._generation = (self._generation + 1) & 0xFFFFFFFFFFFF or 1
        watched.userData = (self._generation << 16) | slot
        watched.slot = slot
        watched.watch = self
        self._slots[slot] = watched
        self._used += 1
        self._ring.prepare(slot, watched.semaphore.countAddress, watched.userData)
        return True

    def arm(self, watched: _UringSemaphore) -> None:
        """Wake the reactor for C{watched} once its count is up."""
        ring = self._ring
        if watched.pending or watched.slot is None or ring is None:
            return
        watched.pending = True
        # A post before the wait starts finds the count no longer 0: the
        # wait ends at once.
        watched.semaphore.setWaiting(True)
        if self._reaping:
            ring.queue(watched.slot)
        else:
            ring.submit(watched.slot)

    def remove(self, watched: _UringSemaphore) -> None:
        """Stop watching C{watched}: no end of its reaches it any more."""
        slot = watched.slot
        if slot is None:
            return
        watched.slot = None
        watched.semaphore.setWaiting(False)
        self._slots[slot] = None
        self._used -= 1
        ring = self._ring
        assert ring is not None
        if not self._used:
            self._close()
            return
        if watched.pending:
            ring.cancel(watched.userData)
        watched.pending = False
        heapq.heappush(self._free, slot)

    def _close(self) -> None:
        ring, self._ring = self._ring, None
        if ring is not None:
            self._reactor.removeReader(self)
            ring.close()  # (which ends every wait still queued)
        for watched in self._slots:
            if watched is not None:
                watched.slot = None
        self._slots, self._free, self._used = [], [], 0

    def doRead(self) -> None:
        """Deliver the ends the ring has: each connection takes its count."""
        ring = self._ring
        if ring is None:
            return
        slots = self._slots
        self._reaping = True
        ends = ring.reap()
        # Several connections' responses: the requests their callbacks
        # send ring together at the end.  One: its request rings at once,
        # so that the server works on it while this pass finishes (a
        # round trip's latency).
        turnEnd = self._turnEnd
        gathering = turnEnd.gathering = len(ends) > 1
        try:
            for userData, result in ends:
                slot = userData & 0xFFFF
                watched = slots[slot] if userData and slot < len(slots) else None
                if watched is None or watched.userData != userData:
                    continue  # a cancel's, or a former connection's
                watched.pending = False
                watched.semaphore.setWaiting(False)
                if result == 0 or result == -errno.EAGAIN:
                    watched.onReady()
                elif result != CANCELLED:
                    watched.failed(OSError(-result, f"futex wait: {os.strerror(-result)}"))
        finally:
            self._reaping = False
            if gathering:
                turnEnd.release()
            if self._ring is ring:
                ring.flush()

    def fileno(self) -> int:
        """The ring's descriptor (-1 once closed)."""
        return -1 if self._ring is None else self._ring.fileno()

    def connectionLost(self, reason: Failure) -> None:
        """The reactor lets go of the ring (it shuts down): close it."""
        ring, self._ring = self._ring, None
        if ring is not None:
            ring.close()
        for watched in self._slots:
            if watched is not None:
                watched.slot = None
        self._slots, self._free, self._used = [], [], 0

    def logPrefix(self) -> str:
        """How the reactor names the ring in its log."""
        return "txqb-shm-responses"


_uringWatches: "weakref.WeakKeyDictionary[Any, _UringWatch]" = weakref.WeakKeyDictionary()


class _UringSemaphore:
    """
    One connection's response semaphore, watched by its reactor's
    L{_UringWatch}: the same face to L{ClientShmChannels} as the others.
    """

    def __init__(self, reactor: Any, semaphore: SharedSemaphore,
                 onResponse: Callable[[int], None], onExit: Callable[[], None],
                 onError: Callable[[BaseException], None]) -> None:
        self.reactor = reactor
        self.semaphore = semaphore
        self._onResponse = onResponse
        self._onExit = onExit
        self.failed = onError
        self.slot: Optional[int] = None
        self.userData = 0
        self.pending = False
        self.watch: Optional[_UringWatch] = None
        self.outstanding = False
        self.stopping = False

    def take(self) -> bool:
        """Take a slot in the reactor's ring; False if none is free."""
        try:
            watch = _uringWatches[self.reactor]
        except KeyError:
            watch = _uringWatches[self.reactor] = _UringWatch(self.reactor)
        return watch.add(self)

    def onReady(self) -> None:
        """The count is up; the channels take it."""
        self._onResponse(0)

    def arm(self) -> None:
        """Be told once the count is up (again)."""
        watch = self.watch
        assert watch is not None
        if self.stopping:
            watch.remove(self)
            # As the other waiters do: the maps are closed on a later turn.
            self.reactor.callFromThread(self._onExit)
        else:
            watch.arm(self)


_Waiter = Union[_ResponseWaiter, _WatchedSemaphore, _UringSemaphore]


def _startWaiter(reactor: Any, semaphore: SharedSemaphore, onResponse: Callable[[int], None],
                 onExit: Callable[[], None], onError: Callable[[BaseException], None]) -> _Waiter:
    """
    Wait for a connection's responses the cheapest way this process
    allows: in the reactor (L{URING_RESPONSES}), in the process's watch
    thread (L{WATCH_RESPONSES}), or in a thread of its own.
    """
    threaded = hasattr(reactor, "callFromThread")
    if URING_RESPONSES and threaded and futexRingAvailable() and IReactorFDSet.providedBy(reactor):
        uring = _UringSemaphore(reactor, semaphore, onResponse, onExit, onError)
        try:
            if uring.take():
                return uring
        except OSError:
            pass  # no ring to be had (descriptors, locked memory): a thread
    waiter: Union[_ResponseWaiter, _WatchedSemaphore]
    if WATCH_RESPONSES and threaded and waitvAvailable():
        waiter = _WatchedSemaphore(reactor, semaphore, onResponse, onExit)
    else:
        waiter = _ResponseWaiter(reactor, semaphore, onResponse, onExit)
    waiter.start()
    return waiter


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
        self._eventCount = self._event.semaphore.value
        self._names = names
        self._reactor = reactor
        self._setup = setup
        self._onResponse = onResponse
        self._onEvent = onEvent
        self._onError = onError
        self._eventsPaused = False
        self._eventDelivering = False
        self.inPlace = False
        """
        Zero copy: the chunk a receiver is given is in use until it
        returns, also by the callbacks it runs.  Otherwise the receiver
        copies what it keeps and calls L{consumed} before it runs any.
        """
        self._held: List[Tuple[Ring, Buffer]] = []
        self._drainCall: Optional[IDelayedCall] = None
        self.closed = False
        self._serverGone = False
        # Exactly one byte per request, after the post: a C server reads as
        # many bytes as it processed chunks and blocks until they come.
        self._doorbell = _Doorbell(reactor, setup, b"\x18")
        self._requests = _RingWriter(reactor, self._request.ring, self._doorbell.ring)
        try:
            self._waiter = _startWaiter(reactor, self._response.semaphore,
                                        self._responseCounted, self._waiterExited, onError)
        except BaseException:
            for ring in self._rings:
                ring.detach()
            raise

    def flowControl(self) -> int:
        """The server's flow-control word (request ring user data)."""
        if self.closed:
            return 0
        return self._request.ring.userWord()

    def sendRequest(self, header: bytes, payload: Payload = b"") -> Optional[Deferred[None]]:
        """Commit a request; waits (in order) while the ring is full."""
        if self.closed:
            raise OSError(errno.ENOTCONN, "connection closed")
        return self._requests.write(header, payload)

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
                    chunk = ring.peek(counted=True)
                except RingError as e:
                    self._onError(OSError(e.errno, f"response ring: {e}"))
                    return
                self._hand(ring, chunk, self._onResponse)
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
        if self._eventDelivering:
            return  # re-entered from an event callback: the outer loop goes on
        if self.closed or not self._eventCount():
            return  # (asked before every response: no more than a read)
        ring = self._event.ring
        while not self._eventsPaused and not self.closed:
            try:
                chunk = ring.peekOrNone()
            except RingError as e:
                self._onError(OSError(e.errno, f"event ring: {e}"))
                return
            if chunk is None:
                return
            self._eventDelivering = True
            try:
                self._hand(ring, chunk, self._onEvent)
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
            self._hand(ring, chunk, self._onResponse)

    def _hand(self, ring: Ring, chunk: Buffer, receiver: Callable[[Buffer], None]) -> None:
        """
        Hand a peeked chunk (a view into the ring) to C{receiver}: in
        place (see L{_deliver}), or reclaimed as soon as the receiver says
        it has copied it (L{consumed}), at the latest when it returns.

        Early matters for responses: a C server drops a response it has
        no room for, and callbacks may send requests at once, so the
        response ring must not hold a delivered chunk while they run.
        One copy (the payload the receiver keeps) is all it costs.
        """
        if self.inPlace:
            _deliver(ring, chunk, receiver)
            return
        held = self._held
        entry = (ring, chunk)
        held.append(entry)
        try:
            receiver(chunk)
        finally:
            if held and held[-1] is entry:
                self.consumed()

    def consumed(self) -> None:
        """
        The receiver of the chunk being handed over has copied what it
        keeps: give its ring the room back now.  (Deliveries nest, an
        event inside a response's, so the chunks are kept as a stack.)
        """
        if self._held:
            ring, chunk = self._held.pop()
            if isinstance(chunk, memoryview):
                chunk.release()
            ring.reclaim()

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
        self._tidy(_ORPHAN_CHECKS)

    def _tidy(self, checks: int) -> None:
        # A killed server's sockets close before its process is gone, so
        # the client may look too early: look again a few times, as
        # libqb's client does.
        if not _removeIfOrphaned(self._names) and self._serverGone and checks > 1:
            self._reactor.callLater(_ORPHAN_CHECK_INTERVAL, self._tidy, checks - 1)

