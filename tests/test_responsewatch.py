"""
Waiting for SHM responses: glibc's semaphore as ``futex_waitv`` sees it,
and one watch thread serving many connections, against a C libqb server
(which announces a response by nothing but ``sem_post``) and a txqb one.
"""

from __future__ import annotations

import mmap
import threading
import time
from typing import Any, Iterator, List

import pytest
import pytest_twisted
from twisted.internet import defer

import txqb
from cprocs import CServer
from handlers import PeerHandlers
from peers.build import Peers
from txqb._posix.futex import WaitList, waitvAvailable
from txqb._posix.semaphore import SharedSemaphore
from txqb._posix.uring import futexRingAvailable
from txqb._reactor import shmtransport

needsWaitv = pytest.mark.skipif(not waitvAvailable(), reason="no futex_waitv here")


class _Sem:
    """A process-shared glibc semaphore in a shared anonymous mapping."""

    def __init__(self) -> None:
        self.map = mmap.mmap(-1, mmap.PAGESIZE, mmap.MAP_SHARED)
        self.sem = SharedSemaphore(self.map, 64)
        self.sem.initialize()

    def close(self) -> None:
        self.sem.release()
        self.map.close()


@pytest.fixture
def sem() -> Iterator[SharedSemaphore]:
    s = _Sem()
    try:
        yield s.sem
    finally:
        s.close()


def _waitWhile(waits: WaitList, slots: int, timeout: float, fn: Any) -> bool:
    """Prepare and wait on C{waits} while another thread calls C{fn} 50 ms in."""

    def run() -> None:
        time.sleep(0.05)
        fn()

    thread = threading.Thread(target=run)
    waits.prepare()
    thread.start()
    try:
        return waits.wait(slots, timeout)
    finally:
        thread.join()


def test_waitvOnThisMachine() -> None:
    """Debian 12's kernel (6.1) and glibc (2.36) have what the watch needs."""
    assert waitvAvailable()


@needsWaitv
def test_countAndWaitingWord(sem: SharedSemaphore) -> None:
    """
    The count is the low word, which posts and takes change; the waiting
    word is the high one, which they keep (glibc's 64-bit ``sem_t``).
    """
    assert sem.count() == 0
    sem.setWaiting(True)
    sem.post()
    sem.post()
    assert (sem.count(), sem.value()) == (2, 2)
    assert sem.tryWait()
    assert (sem.count(), sem.value()) == (1, 1)
    words = memoryview(sem._words).cast("B").cast("I")  # type: ignore[arg-type]
    try:
        assert words[1] == 1
        sem.setWaiting(False)
        assert words[1] == 0
        assert words[0] == 1
    finally:
        words.release()


@needsWaitv
def test_waitListTimesOutAndWakes() -> None:
    waits = WaitList(4)
    waits.prepare()
    started = time.monotonic()
    assert waits.wait(4, 0.05) is False
    assert time.monotonic() - started >= 0.04
    assert _waitWhile(waits, 4, 10.0, waits.wake) is True
    # A wake before the wait (after prepare) is not lost.
    waits.prepare()
    waits.wake()
    assert waits.wait(4, 10.0) is True


@needsWaitv
def test_postWakesOnlyAWaitingWatcher(sem: SharedSemaphore) -> None:
    """
    ``sem_post`` wakes the count's futex only while the waiting word says
    someone sleeps: the watch must set it, or it sleeps through responses.
    """
    waits = WaitList(3)
    waits.point(2, sem.countAddress)
    assert _waitWhile(waits, 3, 0.5, sem.post) is False  # posted, but nobody was told
    assert sem.tryWait()
    sem.setWaiting(True)
    assert _waitWhile(waits, 3, 10.0, sem.post) is True
    assert sem.count() == 1


@needsWaitv
def test_clearedSlotIgnoresItsCount(sem: SharedSemaphore) -> None:
    """A slot in use ends a wait while its count is up; a cleared one not."""
    waits = WaitList(3)
    sem.post()
    waits.point(1, sem.countAddress)
    waits.prepare()
    assert waits.wait(3, 10.0) is True  # at once: the count is not 0
    waits.clear(1)
    waits.prepare()
    assert waits.wait(3, 0.05) is False


@pytest.fixture
def fewSlots(monkeypatch: pytest.MonkeyPatch) -> List[Any]:
    """Watch threads of three connections each, fresh for the test."""
    watches: List[Any] = []
    monkeypatch.setattr(shmtransport, "URING_RESPONSES", False)
    monkeypatch.setattr(shmtransport._ResponseWatch, "CAPACITY", 3)
    monkeypatch.setattr(shmtransport, "_responseWatches", watches)
    return watches


async def _pipelined(client: txqb.Client, tag: int) -> bool:
    replies = [client.request(0, b"%d-%d" % (tag, i)) for i in range(200)]
    got = await defer.gatherResults(replies, consumeErrors=True)
    return [m.payload for m in got] == [b"%d-%d" % (tag, i) for i in range(200)]


async def _oneAtATime(client: txqb.Client, tag: int) -> bool:
    for i in range(100):
        if (await client.request(0, b"%d:%d" % (tag, i))).payload != b"%d:%d" % (tag, i):
            return False
    return True


async def _manyClients(reactor: Any, name: str, *kinds: type) -> List[txqb.Client]:
    """Seven clients, each waiting with one of C{kinds} in turn."""
    clients = [await txqb.connect(reactor, name) for _ in range(7)]
    for i, client in enumerate(clients):
        waiter = client._channels._waiter  # type: ignore[attr-defined]
        assert type(waiter) is kinds[min(i, len(kinds) - 1)]
    results = await defer.gatherResults(
        [defer.ensureDeferred(_pipelined(c, i)) for i, c in enumerate(clients)]
        + [defer.ensureDeferred(_oneAtATime(c, i)) for i, c in enumerate(clients)]
    )
    assert all(results)
    return clients


@needsWaitv
@pytest_twisted.ensureDeferred
async def test_watchServesManyCServerConnections(reactor: Any, cpeers: Peers, serviceName: str,
                                                 fewSlots: List[Any]) -> None:
    """
    Seven connections to a C libqb server, three per watch thread: each
    gets its responses, pipelined and one at a time, and a closed
    connection's slot is reused.
    """
    async with await CServer(reactor, cpeers, serviceName, "--transport", "shm").start():
        clients = await _manyClients(reactor, serviceName, shmtransport._WatchedSemaphore)
        try:
            assert len(fewSlots) == 3
            await clients.pop().disconnect()
            again = await txqb.connect(reactor, serviceName)
            clients.append(again)
            assert len(fewSlots) == 3
            assert await _oneAtATime(again, 99)
        finally:
            for client in clients:
                await client.disconnect()
    for watch in fewSlots:
        assert not watch.full() and not watch._armed


@pytest.mark.parametrize("kind", ["uring", "watch", "thread-per-connection"])
@pytest_twisted.ensureDeferred
async def test_everyWaiterAgainstTxqb(reactor: Any, serviceName: str, fewSlots: List[Any],
                                      monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """The ring, the watch and the per-connection waiter all deliver."""
    if kind == "uring" and not futexRingAvailable():
        pytest.skip("no io_uring futex waits here")
    if kind == "watch" and not waitvAvailable():
        pytest.skip("no futex_waitv here")
    monkeypatch.setattr(shmtransport, "URING_RESPONSES", kind == "uring")
    monkeypatch.setattr(shmtransport, "WATCH_RESPONSES", kind == "watch")
    waiter = {"uring": shmtransport._UringSemaphore, "watch": shmtransport._WatchedSemaphore,
              "thread-per-connection": shmtransport._ResponseWaiter}[kind]
    service = txqb.listen(reactor, serviceName, PeerHandlers(), transport="shm")
    try:
        clients = await _manyClients(reactor, serviceName, waiter)
        for client in clients:
            await client.disconnect()
    finally:
        await service.stopListening()
