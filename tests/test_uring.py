"""
Waiting for SHM responses in the reactor, through io_uring futex waits:
the ring itself on glibc's semaphores, and the reactor's watch against a
C libqb server and a txqb one (slots shared out, reused, given back, and
a thread watch once the ring is full).
"""

from __future__ import annotations

import errno
import mmap
import os
import select
import threading
import time
import weakref
from typing import Any, Iterator, List

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.internet.defer import Deferred

import txqb
from cprocs import CServer
from handlers import PeerHandlers
from peers.build import Peers
from txqb._posix.semaphore import SharedSemaphore
from txqb._posix.uring import CANCELLED, FutexRing, futexRingAvailable
from txqb._reactor import shmtransport
from txqb.server import ServerConnection

pytestmark = pytest.mark.skipif(not futexRingAvailable(),
                                reason="no io_uring futex waits here (Linux 6.7+, x86-64)")


class _Sems:
    """Process-shared glibc semaphores in one shared anonymous mapping."""

    def __init__(self, n: int) -> None:
        self.map = mmap.mmap(-1, mmap.PAGESIZE, mmap.MAP_SHARED)
        self.sems = [SharedSemaphore(self.map, 64 * i) for i in range(n)]
        for sem in self.sems:
            sem.initialize()

    def close(self) -> None:
        for sem in self.sems:
            sem.release()
        self.map.close()


@pytest.fixture
def sems() -> Iterator[List[SharedSemaphore]]:
    s = _Sems(3)
    try:
        yield s.sems
    finally:
        s.close()


@pytest.fixture
def ring() -> Iterator[FutexRing]:
    r = FutexRing(8)
    try:
        yield r
    finally:
        r.close()


def _readable(ring: FutexRing, timeout: float) -> bool:
    poller = select.poll()
    poller.register(ring.fileno(), select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def _later(fn: Any) -> threading.Thread:
    def run() -> None:
        time.sleep(0.05)
        fn()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_postEndsTheWaitAndTheDescriptorSaysSo(ring: FutexRing,
                                               sems: List[SharedSemaphore]) -> None:
    """A post from another thread ends the wait; the descriptor polls readable."""
    sem = sems[0]
    ring.prepare(2, sem.countAddress, 0x10002)
    sem.setWaiting(True)
    ring.submit(2)
    assert not _readable(ring, 0) and ring.reap() == []
    thread = _later(sem.post)
    try:
        assert _readable(ring, 10.0)
    finally:
        thread.join()
    assert ring.reap() == [(0x10002, 0)]
    assert not _readable(ring, 0)
    assert sem.count() == 1  # the wait takes nothing


def test_aCountAlreadyThereEndsTheWaitAtOnce(ring: FutexRing,
                                             sems: List[SharedSemaphore]) -> None:
    sem = sems[0]
    sem.post()
    ring.prepare(0, sem.countAddress, 0x10000)
    ring.submit(0)
    assert ring.reap() == [(0x10000, -errno.EAGAIN)]


def test_aPostWakesOnlyWhileTheSemaphoreSaysSomeoneWaits(ring: FutexRing,
                                                         sems: List[SharedSemaphore]) -> None:
    """
    Without the waiting word ``sem_post`` calls no futex wake: the wait
    sleeps on (which is why the watch sets it); a cancel ends it.
    """
    sem = sems[0]
    ring.prepare(1, sem.countAddress, 0x20001)
    ring.submit(1)
    sem.post()
    assert not _readable(ring, 0.05)
    ring.cancel(0x20001)
    assert sorted(ring.reap()) == [(0, 1), (0x20001, CANCELLED)]


def test_queuedWaitsStartWithOneFlush(ring: FutexRing, sems: List[SharedSemaphore]) -> None:
    for slot, sem in enumerate(sems):
        ring.prepare(slot, sem.countAddress, 0x10000 | slot)
        sem.setWaiting(True)
        ring.queue(slot)
    for sem in sems:
        sem.post()
    assert ring.reap() == []  # queued, not started: the posts woke nobody
    ring.flush()  # started now, with every count up
    assert sorted(ring.reap()) == [(0x10000 | slot, -errno.EAGAIN) for slot in range(3)]
    for slot, sem in enumerate(sems):
        assert sem.tryWait()
        ring.queue(slot)
    ring.flush()
    for sem in sems:
        sem.post()
    deadline = time.monotonic() + 10
    ends: List[Any] = []
    while len(ends) < 3 and time.monotonic() < deadline:
        _readable(ring, 1.0)
        ends += ring.reap()
    assert sorted(ends) == [(0x10000 | slot, 0) for slot in range(3)]


def test_closingWithWaitsStartedLeavesNothing(sems: List[SharedSemaphore]) -> None:
    ring = FutexRing(4)
    fd = ring.fileno()
    ring.prepare(0, sems[0].countAddress, 0x10000)
    ring.submit(0)
    ring.close()
    ring.close()  # (twice is harmless)
    with pytest.raises(OSError):
        os.fstat(fd)
    sems[0].setWaiting(True)
    sems[0].post()  # wakes nobody, breaks nothing


@pytest.fixture
def smallRing(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Fresh reactor rings of three slots, a thread watch beyond them."""
    watches: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()
    monkeypatch.setattr(shmtransport, "URING_RESPONSES", True)
    monkeypatch.setattr(shmtransport, "_uringWatches", watches)
    monkeypatch.setattr(shmtransport._UringWatch, "ENTRIES", 4)
    return watches


async def _exchange(client: txqb.Client, tag: int) -> bool:
    pipelined = [client.request(0, b"%d-%d" % (tag, i)) for i in range(100)]
    got = await defer.gatherResults(pipelined, consumeErrors=True)
    if [m.payload for m in got] != [b"%d-%d" % (tag, i) for i in range(100)]:
        return False
    for i in range(50):
        if (await client.request(0, b"%d:%d" % (tag, i))).payload != b"%d:%d" % (tag, i):
            return False
    return True


def _waiterOf(client: txqb.Client) -> Any:
    return client._channels._waiter  # type: ignore[attr-defined]


def _assertRingGone(reactor: Any, watches: Any) -> None:
    watch = watches.get(reactor)
    assert watch is not None and watch.fileno() == -1
    assert watch not in reactor.getReaders()


@pytest_twisted.ensureDeferred
async def test_ringServesCServerConnectionsAndGivesSlotsBack(
        reactor: Any, cpeers: Peers, serviceName: str, smallRing: Any) -> None:
    """
    Five connections to a C libqb server (which announces responses by
    nothing but ``sem_post``): three in the reactor's ring, two in the
    thread watch; a closed connection's slot goes to the next one, and
    the last one out takes the ring and its reader away.
    """
    async with await CServer(reactor, cpeers, serviceName, "--transport", "shm").start():
        clients = [await txqb.connect(reactor, serviceName) for _ in range(5)]
        try:
            kinds = [type(_waiterOf(c)) for c in clients]
            assert kinds == [shmtransport._UringSemaphore] * 3 + [
                shmtransport._WatchedSemaphore] * 2
            assert smallRing[reactor] in reactor.getReaders()
            assert all(await defer.gatherResults(
                [defer.ensureDeferred(_exchange(c, i)) for i, c in enumerate(clients)]))
            slot = _waiterOf(clients[1]).slot
            await clients.pop(1).disconnect()
            again = await txqb.connect(reactor, serviceName)
            clients.append(again)
            assert isinstance(_waiterOf(again), shmtransport._UringSemaphore)
            assert _waiterOf(again).slot == slot
            assert await _exchange(again, 99)
        finally:
            for client in clients:
                await client.disconnect()
    _assertRingGone(reactor, smallRing)


class _Holding(PeerHandlers):
    """Id 50 gets no answer until the test says so."""

    def __init__(self) -> None:
        super().__init__()
        self.held: List[Deferred[Any]] = []

    def messageReceived(self, connection: ServerConnection, msgId: int, payload: bytes) -> Any:
        if msgId == 50:
            d: Deferred[Any] = Deferred()
            self.held.append(d)
            return d
        return super().messageReceived(connection, msgId, payload)


@pytest_twisted.ensureDeferred
async def test_aWaitCancelledOnCloseReachesNoLaterConnection(
        reactor: Any, serviceName: str, smallRing: Any) -> None:
    """
    A connection closed while its response is awaited cancels its wait;
    the next connection in its slot is not told of that end, and gets its
    own responses.
    """
    handlers = _Holding()
    service = txqb.listen(reactor, serviceName, handlers, transport="shm")
    try:
        keep = await txqb.connect(reactor, serviceName)  # the ring stays
        first = await txqb.connect(reactor, serviceName)
        slot, userData = _waiterOf(first).slot, _waiterOf(first).userData
        pending = first.request(50, b"")
        await _until(reactor, lambda: bool(handlers.held))
        assert _waiterOf(first).pending
        await first.disconnect()
        with pytest.raises(Exception):
            await pending
        second = await txqb.connect(reactor, serviceName)
        assert (_waiterOf(second).slot, _waiterOf(second).userData != userData) == (slot, True)
        assert await _exchange(second, 1) and await _exchange(keep, 2)
        await second.disconnect()
        await keep.disconnect()
    finally:
        await service.stopListening()
    _assertRingGone(reactor, smallRing)


async def _until(reactor: Any, condition: Any) -> None:
    for _ in range(1000):
        if condition():
            return
        d: Deferred[None] = Deferred()
        reactor.callLater(0.005, d.callback, None)
        await d
    raise AssertionError("condition never held")


@pytest_twisted.ensureDeferred
async def test_requestsSentWhileResponsesAreDeliveredRingWhenTheBatchEnds(
        reactor: Any, cpeers: Peers, serviceName: str) -> None:
    """
    Requests that response callbacks send while the reactor's ring
    delivers several connections' responses ring their doorbells when
    the batch ends, together (the server then finds them ready at once),
    and each still with exactly one byte: a C libqb server reads one byte
    per request and would not answer one whose byte never came, nor stay
    in step with an extra one.  A lone connection's next request rings
    at once: the server starts on it while the pass finishes.
    """
    turnEnd = shmtransport._turnEndFor(reactor)
    seen: List[bool] = []

    async def chain(client: txqb.Client, tag: int) -> List[bytes]:
        got = []
        for i in range(30):
            reply = client.request(0, b"%d/%d" % (tag, i))
            # Sent from the previous response's callback: the bell waits.
            seen.append(turnEnd.gathering)
            got.append((await reply.addTimeout(10, reactor)).payload)
        return got

    async with await CServer(reactor, cpeers, serviceName, "--transport", "shm").start():
        clients = [await txqb.connect(reactor, serviceName) for _ in range(4)]
        try:
            assert all(isinstance(_waiterOf(c), shmtransport._UringSemaphore) for c in clients)
            # The four first responses are delivered in one pass: the ring
            # is not read until the server has answered all of them.
            watch = shmtransport._uringWatches[reactor]
            reactor.removeReader(watch)
            chains = [defer.ensureDeferred(chain(c, t)) for t, c in enumerate(clients)]
            await task.deferLater(reactor, 0.1, lambda: None)
            reactor.addReader(watch)
            results = await defer.gatherResults(chains)
            assert results == [[b"%d/%d" % (t, i) for i in range(30)] for t in range(4)]
            # Requests sent from a callback of a pass that delivered
            # several connections' responses waited (the first pass's four
            # at least; how many later passes had more than one is up to
            # the scheduler); each chain's first was sent from no pass.
            assert seen.count(True) >= 4 and seen[:4] == [False] * 4
            # (This runs inside the last response's callback: the pass is
            # over once the reactor is back.)
            await task.deferLater(reactor, 0, lambda: None)
            assert not turnEnd.gathering and not turnEnd._held
            for c in clients:
                assert (await c.request(0, b"after")).payload == b"after"
            for c in clients[1:]:
                await c.disconnect()
            del clients[1:]
            del seen[:]
            assert await chain(clients[0], 9) == [b"9/%d" % i for i in range(30)]
            assert seen == [False] * 30
        finally:
            for client in clients:
                await client.disconnect()
