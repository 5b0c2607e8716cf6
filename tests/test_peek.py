"""
Batches read back to back while nothing else wants the reactor
(L{txqb._reactor.peek}), and fairness kept when something does.
"""

from __future__ import annotations

import socket
import struct
from typing import Any, List, Tuple

import pytest_twisted
from twisted.internet import epollreactor, pollreactor, task
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReadDescriptor
from zope.interface import implementer

import txqb
from handlers import watchWakeUps
from txqb._reactor.peek import MAX_RUN, ReactorPeek, reactorPeekFor
from txqb.server import ServerConnection, ServiceHandlers

_U32 = struct.Struct("<I")
_NORMAL_BATCH = 5


def _peekable(reactor: Any) -> bool:
    return isinstance(reactor, (epollreactor.EPollReactor, pollreactor.PollReactor))


@implementer(IReadDescriptor)
class _Reader:
    """A reader that never reads: its descriptor stays ready."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> None:
        pass

    def connectionLost(self, reason: Any) -> None:
        pass

    def logPrefix(self) -> str:
        return "peek-test"


def test_peekWorksOnPollingReactorsOnly(reactor: Any) -> None:
    """
    The epoll and poll reactors' readiness sets can be looked at; others
    (select, asyncio, a test clock) cannot, and then no caller is ever
    alone: every batch takes a turn.
    """
    peek = reactorPeekFor(reactor)
    assert peek is reactorPeekFor(reactor)
    assert peek.works is _peekable(reactor)
    if not peek.works:
        assert not peek.alone(0)
    from twisted.internet.task import Clock

    assert not ReactorPeek(Clock()).works
    assert not ReactorPeek(Clock()).alone(0)


def test_aloneUnlessAnotherDescriptorOrTimerWaits(reactor: Any) -> None:
    """
    A caller is alone while no other descriptor is ready and no timer is
    due; its own descriptor being ready does not count.  Looking takes
    nothing: what was ready stays ready for the reactor.
    """
    peek = reactorPeekFor(reactor)
    if not peek.works:
        return  # test_peekWorksOnPollingReactorsOnly covers these
    mine, minePeer = socket.socketpair()
    other, otherPeer = socket.socketpair()
    readers = [_Reader(mine), _Reader(other)]
    for r in readers:
        reactor.addReader(r)
    try:
        assert peek.alone(mine.fileno())
        minePeer.send(b"x")
        assert peek.alone(mine.fileno())
        otherPeer.send(b"x")
        assert not peek.alone(mine.fileno())
        assert not peek.alone(other.fileno())
        # Still ready: the look took nothing.
        assert not peek.alone(mine.fileno())
        other.recv(1)
        assert peek.alone(mine.fileno())
        later = reactor.callLater(60, lambda: None)
        assert peek.alone(mine.fileno())
        call = reactor.callLater(0, lambda: None)
        assert not peek.alone(mine.fileno())
        call.cancel()
        later.cancel()
    finally:
        for r in readers:
            reactor.removeReader(r)
        for s in (mine, minePeer, other, otherPeer):
            s.close()


class _Sink(ServiceHandlers):
    """One-way requests: logs who sent what, answers nothing."""

    def __init__(self, expected: int) -> None:
        self.log: List[Tuple[ServerConnection, int]] = []
        self.expected = expected
        self.done: Deferred[None] = Deferred()
        self.turns: List[int] = []
        self.current = 0

    def messageReceived(self, connection: ServerConnection, msgId: int, payload: bytes) -> Any:
        self.current += 1
        self.log.append((connection, _U32.unpack(payload)[0]))
        if len(self.log) == self.expected:
            self.done.callback(None)
        return None

    def watch(self, connection: ServerConnection) -> None:
        """Count requests per wake-up of the connection's reader."""
        watchWakeUps(self, connection)


async def _queued(reactor: Any, serviceName: str, transport: str, handlers: _Sink,
                  clients: int, each: int) -> Tuple[Any, List[Any], List[Deferred[None]]]:
    """
    A service with C{clients} connections, each with C{each} one-way
    requests waiting unread (flow control on).
    """
    service = txqb.listen(reactor, serviceName, handlers, transport=transport)
    service.requestRateLimit(txqb.RATE_OFF_2)
    connected: List[Any] = []
    for _ in range(clients):
        connected.append(await txqb.connect(reactor, serviceName))
    for connection in service.connections:
        handlers.watch(connection)
    sent = [client.send(1, _U32.pack(n)) for client in connected for n in range(each)]
    assert handlers.log == []
    return service, connected, sent


@pytest_twisted.ensureDeferred
async def test_loneConnectionReadsBatchesBackToBack(reactor: Any, serviceName: str) -> None:
    """
    A lone SHM connection's waiting requests are still read in libqb's
    batches of 5 (RATE_NORMAL), but while nothing else wants the reactor
    the next batch follows at once, up to L{MAX_RUN} batches per turn,
    where a turn of the reactor would have come straight back.  In order,
    none lost.  (A socket holds ten datagrams; see
    L{test_datagramBatchesBackToBack}.)
    """
    total = 120
    handlers = _Sink(total)
    service, clients, sent = await _queued(reactor, serviceName, "shm", handlers, 1, total)
    try:
        service.requestRateLimit(txqb.RATE_NORMAL)
        await handlers.done
        for d in sent:
            await d
        # (done fires from inside the last wake-up: let it end.)
        await task.deferLater(reactor, 0, lambda: None)
        assert [n for _, n in handlers.log] == list(range(total))
        assert sum(handlers.turns) == total
        assert max(handlers.turns) <= _NORMAL_BATCH * MAX_RUN
        if _peekable(reactor):
            assert max(handlers.turns) > _NORMAL_BATCH, handlers.turns
        else:
            assert max(handlers.turns) == _NORMAL_BATCH, handlers.turns
    finally:
        for client in clients:
            await client.disconnect()
        await service.stopListening()


@pytest_twisted.ensureDeferred
async def test_busyConnectionsTakeTurnsInBatches(
    reactor: Any, serviceName: str, transport: str
) -> None:
    """
    With two connections' requests waiting, neither is read more than a
    batch ahead while the other has requests left: the peek sees the other
    (its pending read, or its ready socket) and the batch ends the turn.
    """
    each = 60
    handlers = _Sink(2 * each)
    service, clients, sent = await _queued(reactor, serviceName, transport, handlers, 2, each)
    try:
        service.requestRateLimit(txqb.RATE_NORMAL)
        await handlers.done
        for d in sent:
            await d
        order = [c for c, _ in handlers.log]
        for connection in set(order):
            assert [n for c, n in handlers.log if c is connection] == list(range(each))
        # Until one connection is done, runs of the same one are short.
        firstDone = min(
            max(i for i, c in enumerate(order) if c is connection) for connection in set(order)
        )
        runs: List[int] = []
        for i in range(firstDone + 1):
            if i and order[i] is order[i - 1]:
                runs[-1] += 1
            else:
                runs.append(1)
        assert max(runs) <= _NORMAL_BATCH, runs
        assert len(runs) >= 2 * (each // _NORMAL_BATCH) - 1, runs
    finally:
        for client in clients:
            await client.disconnect()
        await service.stopListening()


def test_datagramBatchesBackToBack(reactor: Any) -> None:
    """
    A datagram channel (a request socket's reader) reads batches back to
    back while its socket is all that is ready, up to L{MAX_RUN} batches,
    and stops after one batch while another descriptor is ready.
    """
    from txqb._reactor.datagram import DatagramChannel

    mine, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    other, otherPeer = socket.socketpair()
    for s in (mine, peer):
        s.setblocking(False)
    got: List[bytes] = []
    channel = DatagramChannel(reactor, mine, 64, lambda d: got.append(bytes(d)),
                              lambda e: None, batch=_NORMAL_BATCH)
    blocker = _Reader(other)
    # The test never yields to the reactor: it calls doRead itself.
    channel.startReading()
    try:
        total = _NORMAL_BATCH * (MAX_RUN + 2)
        for n in range(total):
            peer.send(_U32.pack(n))
        turns = []
        channel.doRead()
        turns.append(len(got))
        otherPeer.send(b"x")
        reactor.addReader(blocker)
        try:
            channel.doRead()
            turns.append(len(got) - turns[0])
        finally:
            reactor.removeReader(blocker)
        while len(got) < total:
            before = len(got)
            channel.doRead()
            turns.append(len(got) - before)
        assert got == [_U32.pack(n) for n in range(total)]
        if _peekable(reactor):
            assert turns == [_NORMAL_BATCH * MAX_RUN, _NORMAL_BATCH, _NORMAL_BATCH]
        else:
            assert turns == [_NORMAL_BATCH] * (MAX_RUN + 2)
        assert channel.emptyReads == 0
    finally:
        channel.stopReading()
        for s in (mine, peer, other, otherPeer):
            s.close()
