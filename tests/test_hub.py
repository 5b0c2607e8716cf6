"""
The reader hub: many descriptors behind one reader of the reactor, read
as the reactor would read them (a reader that ends, raises or hangs up is
disconnected, the others go on), and registered only while it holds one.
"""

from __future__ import annotations

import socket
from typing import Any, Iterator, List, Optional

import pytest
import pytest_twisted
from twisted.internet import main, task
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

import txqb
from txqb.echo import ECHO
from handlers import PeerHandlers
from txqb._reactor.hub import ReaderHub, readerHubFor


class _Reader:
    """A socket's reading end; what its doRead does is up to the test."""

    def __init__(self, sock: socket.socket, hub: ReaderHub, behaviour: str = "read") -> None:
        self.sock = sock
        self.hub = hub
        self.behaviour = behaviour
        self.got: List[bytes] = []
        self.lost: List[Failure] = []
        self.arrived: Optional[Deferred[None]] = None
        sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> Any:
        if self.behaviour == "raise":
            raise ZeroDivisionError("a bug in a reader")
        data = self.sock.recv(4096)
        if not data:
            return main.CONNECTION_DONE
        self.got.append(data)
        if self.arrived is not None:
            d, self.arrived = self.arrived, None
            d.callback(None)
        return None

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)
        self.hub.removeReader(self)
        self.sock.close()

    def logPrefix(self) -> str:
        return "test-reader"


@pytest.fixture
def hub(reactor: Any) -> Iterator[ReaderHub]:
    h = ReaderHub(reactor)
    h.GATHER_FROM, h.SCATTER_AT = 1, 0  # (its own set from the first reader on)
    yield h
    assert h.fileno() == -1 and h not in reactor.getReaders()


def _pairs(n: int) -> List[List[socket.socket]]:
    return [list(socket.socketpair()) for _ in range(n)]


def _closeAll(hub: ReaderHub, readers: List[_Reader], pairs: List[List[socket.socket]]) -> None:
    for r in readers:
        hub.removeReader(r)
        r.sock.close()
    for ours, _ in pairs:
        ours.close()


async def _turns(reactor: Any, n: int = 5) -> None:
    for _ in range(n):
        await task.deferLater(reactor, 0, lambda: None)


@pytest_twisted.ensureDeferred
async def test_readersShareOneDescriptorOfTheReactor(reactor: Any, hub: ReaderHub) -> None:
    """
    Ten readers, one reader of the reactor: a byte for each is read in one
    turn, and once the last is removed the hub's descriptor is gone.
    """
    pairs = _pairs(10)
    readers = [_Reader(theirs, hub) for _, theirs in pairs]
    try:
        before = set(reactor.getReaders())
        for r in readers:
            hub.addReader(r)
            hub.addReader(r)  # twice is once
        assert set(reactor.getReaders()) - before == {hub}
        assert hub.getReaders() == readers
        for i, (ours, _) in enumerate(pairs):
            ours.send(bytes([i]))
        last = readers[-1].arrived = Deferred()
        await last
        await _turns(reactor)
        assert [r.got for r in readers] == [[bytes([i])] for i in range(10)]
    finally:
        _closeAll(hub, readers, pairs)
    assert hub.fileno() == -1
    assert hub not in reactor.getReaders()


@pytest_twisted.ensureDeferred
async def test_aReaderThatEndsOrRaisesIsDisconnectedAndTheOthersGoOn(
        reactor: Any, hub: ReaderHub) -> None:
    """
    One peer hangs up, one reader raises: both are told their connection
    is lost and leave the hub (the bug is logged), and the third reader
    still gets its bytes afterwards.
    """
    pairs = _pairs(3)
    hangs, raises, fine = (_Reader(theirs, hub, b) for (_, theirs), b in
                           zip(pairs, ("read", "raise", "read")))
    for r in (hangs, raises, fine):
        hub.addReader(r)
    assert hub.gathered
    try:
        pairs[0][0].close()
        pairs[1][0].send(b"x")
        pairs[2][0].send(b"1")
        fine.arrived = Deferred()
        await fine.arrived
        await _turns(reactor)
        assert len(hangs.lost) == 1 and hangs.lost[0].check(type(main.CONNECTION_DONE))
        assert len(raises.lost) == 1 and raises.lost[0].check(ZeroDivisionError)
        assert hub.getReaders() == [fine]
        pairs[2][0].send(b"2")
        fine.arrived = Deferred()
        await fine.arrived
        assert fine.got == [b"1", b"2"] and not fine.lost
    finally:
        hub.removeReader(fine)
        fine.sock.close()
        for ours, _ in pairs[1:]:
            ours.close()


@pytest_twisted.ensureDeferred
async def test_aDescriptorClosedBehindTheHubsBackIsLost(reactor: Any, hub: ReaderHub) -> None:
    """
    A reader whose descriptor number changed (closed and reused) is not
    read: the hub tells it the connection is lost.
    """
    ours, theirs = socket.socketpair()
    reader = _Reader(theirs, hub)
    hub.addReader(reader)
    other = socket.socket(fileno=theirs.detach())  # the same number, a new object
    reader.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # says another number
    try:
        ours.send(b"x")
        await _turns(reactor)
        assert len(reader.lost) == 1 and reader.lost[0].check(type(main.CONNECTION_LOST))
        assert not hub.getReaders()
    finally:
        other.close()
        ours.close()


@pytest_twisted.ensureDeferred
async def test_theHubLostTellsEveryReader(reactor: Any, hub: ReaderHub) -> None:
    """When the reactor lets go of the hub (shutdown), every reader hears of it."""
    pairs = _pairs(3)
    readers = [_Reader(theirs, hub) for _, theirs in pairs]
    for r in readers:
        hub.addReader(r)
    hub.connectionLost(Failure(main.CONNECTION_LOST))
    try:
        assert [len(r.lost) for r in readers] == [1, 1, 1]
        assert not hub.getReaders() and hub.fileno() == -1
    finally:
        for ours, _ in pairs:
            ours.close()


@pytest_twisted.ensureDeferred
async def test_aFewReadersAreTheReactorsOwn(reactor: Any) -> None:
    """
    Below GATHER_FROM readers the reactor reads them itself; from then on
    all are in the hub's set (one reader of the reactor); down to
    SCATTER_AT, they go back.  Every byte is read throughout.
    """
    hub = ReaderHub(reactor)
    pairs = _pairs(ReaderHub.GATHER_FROM)
    readers = [_Reader(theirs, hub) for _, theirs in pairs]

    async def allRead(which: List[_Reader], tag: bytes) -> None:
        for r, (ours, _) in zip(readers, pairs):
            if r in which:
                ours.send(tag)
        for r in which:
            while tag not in r.got:
                await task.deferLater(reactor, 0.001, lambda: None)

    try:
        for r in readers[:-1]:
            hub.addReader(r)
        assert not hub.gathered and hub.fileno() == -1
        assert set(readers[:-1]) <= set(reactor.getReaders())
        await allRead(readers[:-1], b"a")
        hub.addReader(readers[-1])
        assert hub.gathered and hub in reactor.getReaders()
        assert not set(readers) & set(reactor.getReaders())
        assert hub.getReaders() == readers
        await allRead(readers, b"b")
        kept = readers[:ReaderHub.SCATTER_AT]
        for r in readers[ReaderHub.SCATTER_AT:]:
            hub.removeReader(r)
        assert not hub.gathered and hub not in reactor.getReaders()
        assert set(kept) <= set(reactor.getReaders()) and hub.getReaders() == kept
        await allRead(kept, b"c")
    finally:
        _closeAll(hub, readers, pairs)
    assert not set(readers) & set(reactor.getReaders())


def test_theReactorHasOneHub(reactor: Any) -> None:
    """A reactor's hub is made once (the server's connections share it)."""
    assert readerHubFor(reactor) is readerHubFor(reactor)
    assert isinstance(readerHubFor(reactor), ReaderHub)


@pytest_twisted.ensureDeferred
async def test_aServersConnectionsReadThroughTheHub(reactor: Any, serviceName: str) -> None:
    """
    Eight clients of two servers (one per transport): their setup sockets
    are the hub's readers, not the reactor's; all are answered; once they
    are gone, so is the hub's reader.
    """
    hub = readerHubFor(reactor)
    assert isinstance(hub, ReaderHub)
    services = [txqb.listen(reactor, serviceName + t, PeerHandlers(), transport=t)
                for t in ("shm", "socket")]
    clients = []
    try:
        for i in range(8):
            clients.append(await txqb.connect(reactor, serviceName + ("shm", "socket")[i % 2]))
        # A setup socket each, and a request socket each of the socket ones.
        assert len(hub.getReaders()) == 12
        assert hub in reactor.getReaders()
        assert not set(hub.getReaders()) & set(reactor.getReaders())
        for i, c in enumerate(clients):
            reply = await c.request(ECHO, b"ping%d" % i)
            assert bytes(reply.payload) == b"ping%d" % i
    finally:
        for c in clients:
            await c.disconnect()
        for service in services:
            await service.stopListening()
    await _turns(reactor, 20)
    assert not hub.getReaders() and hub not in reactor.getReaders()
