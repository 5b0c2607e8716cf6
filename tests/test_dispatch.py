"""
Routing by message id: L{txqb.dispatch.Dispatcher} and coroipc-style
service multiplexing, driven by C libqb clients and by txqb clients.
"""

from __future__ import annotations

import errno
from typing import Any, List

import pytest
import pytest_twisted
from twisted.internet import defer, task

import txqb
from cprocs import runClient
from peers.build import Peers
from txqb.dispatch import (
    MAX_COMMANDS,
    MAX_SERVICES,
    Dispatcher,
    ServiceMultiplexer,
    commandId,
    splitCommandId,
)
from txqb.server import ServerConnection


def test_commandIds() -> None:
    """
    Every (service, command) pair maps to a distinct 32-bit id and back,
    services past 32767 as the negative ids libqb's signed header carries,
    except libqb's three control ids.
    """
    assert commandId(0, 0) == 0
    assert commandId(1, 2) == 0x10002
    assert commandId(0x8000, 0) == -0x80000000
    assert commandId(65535, 65532) == -4
    for service, command in [(0, 0), (3, 7), (32767, 65535), (32768, 1), (65535, 65532)]:
        assert splitCommandId(commandId(service, command)) == (service, command)
    for reserved in (65535, 65534, 65533):
        with pytest.raises(ValueError, match="control id"):
            commandId(65535, reserved)
    for bad in [(-1, 0), (MAX_SERVICES, 0), (0, -1), (0, MAX_COMMANDS)]:
        with pytest.raises(ValueError, match="out of range"):
            commandId(*bad)
    dispatcher = Dispatcher()
    with pytest.raises(ValueError, match="control id"):
        dispatcher.register(-1, lambda c, p: b"")
    dispatcher.register(5, lambda c, p: b"")
    with pytest.raises(ValueError, match="already"):
        dispatcher.register(5, lambda c, p: b"")
    mux = ServiceMultiplexer()
    mux.register(65535, dispatcher)
    with pytest.raises(ValueError, match="already"):
        mux.register(65535, Dispatcher())
    with pytest.raises(ValueError, match="out of range"):
        mux.register(MAX_SERVICES, Dispatcher())


def _service(reactor: Any) -> ServiceMultiplexer:
    """Two multiplexed services; each kind of handler appears."""
    low = Dispatcher()
    high = Dispatcher(unknownError=errno.ENOSYS)

    @low.handler(1)
    def plain(connection: ServerConnection, payload: bytes) -> bytes:
        return b"plain:" + payload

    @low.handler(65535)
    def deferred(connection: ServerConnection, payload: bytes) -> defer.Deferred[txqb.Message]:
        return task.deferLater(reactor, 0.01, txqb.Message, commandId(3, 65535), 5, b"late")

    @high.handler(0)
    async def coroutine(connection: ServerConnection, payload: bytes) -> bytes:
        await task.deferLater(reactor, 0, lambda: None)
        return b"async:" + payload

    mux = ServiceMultiplexer()
    mux.register(3, low)
    mux.register(40000, high)
    return mux


@pytest_twisted.ensureDeferred
async def test_dispatchDrivenByLibqbClient(
    reactor: Any, serviceName: str, transport: str, cpeers: Peers
) -> None:
    """
    A C libqb client's requests reach the registered handlers whatever
    their kind; unknown services and commands get the documented errors.
    """
    service = txqb.listen(reactor, serviceName, _service(reactor), transport=transport)
    try:
        ids = [
            commandId(3, 1),  # plain: error 0
            commandId(3, 65535),  # Deferred: error 5
            commandId(40000, 0),  # coroutine: error 0
            commandId(3, 2),  # unknown command: the service's default EINVAL
            commandId(40000, 9),  # unknown command: that service's ENOSYS
            commandId(7, 1),  # unknown service: EINVAL
        ]
        code, lines = await runClient(
            reactor, cpeers, serviceName, *[a for i in ids for a in ("invalid", str(i))]
        )
        assert code == 0, lines
        expected = [0, 5, 0, -errno.EINVAL, -errno.ENOSYS, -errno.EINVAL]
        assert lines[1:-1] == [f"INVALID {i} {e}" for i, e in zip(ids, expected)]
    finally:
        await service.stopListening()


@pytest_twisted.ensureDeferred
async def test_dispatchPipelinedInOrder(reactor: Any, serviceName: str, transport: str) -> None:
    """
    Pipelined requests to handlers of every kind, slow and fast mixed,
    come back each to its own request, in order.
    """
    service = txqb.listen(reactor, serviceName, _service(reactor), transport=transport)
    client = await txqb.connect(reactor, serviceName)
    try:
        plan = [commandId(3, 65535), commandId(3, 1), commandId(40000, 0), commandId(9, 9)] * 8
        replies = await defer.gatherResults(
            [client.request(i, b"%d" % n) for n, i in enumerate(plan)]
        )
        for n, (msgId, reply) in enumerate(zip(plan, replies)):
            assert reply.id == msgId
            service_, command = splitCommandId(msgId)
            if (service_, command) == (3, 65535):
                assert (reply.error, reply.payload) == (5, b"late")
            elif service_ == 3:
                assert reply.payload == b"plain:%d" % n
            elif service_ == 40000:
                assert reply.payload == b"async:%d" % n
            else:
                assert (reply.error, reply.payload) == (-errno.EINVAL, b"")
    finally:
        await client.disconnect()
        await service.stopListening()


class _Recorder(Dispatcher):
    """A multiplexed service that logs its connection callbacks."""

    def __init__(self, name: str, log: List[str], refuse: int = 0, waits: int = 0) -> None:
        super().__init__()
        self.name, self.log, self.refuse, self.waits = name, log, refuse, waits
        self.closing: defer.Deferred[None] = defer.Deferred()

    def connectionAccepted(self, connection: ServerConnection, uid: int, gid: int) -> int:
        self.log.append(f"{self.name} accept")
        return -self.refuse

    def connectionCreated(self, connection: ServerConnection) -> None:
        self.log.append(f"{self.name} created")

    def connectionClosed(self, connection: ServerConnection) -> Any:
        self.log.append(f"{self.name} closed")
        if self.waits:
            self.waits -= 1
            return 1
        if self.name == "b":
            return self.closing
        return None

    def connectionDestroyed(self, connection: ServerConnection) -> None:
        self.log.append(f"{self.name} destroyed")


@pytest_twisted.ensureDeferred
async def test_multiplexerConnectionCallbacks(reactor: Any, serviceName: str) -> None:
    """
    Each multiplexed service sees accept, created, closed (with libqb's
    call-again retries, per service) and destroyed; the first refusal wins.
    """
    log: List[str] = []
    a, b = _Recorder("a", log, waits=2), _Recorder("b", log)
    mux = ServiceMultiplexer()
    mux.register(1, a)
    mux.register(2, b)
    service = txqb.listen(reactor, serviceName, mux)
    try:
        client = await txqb.connect(reactor, serviceName)
        assert log == ["a accept", "b accept", "a created", "b created"]
        conn = service.connections[0]
        del log[:]
        await client.disconnect()
        # a asks twice to be called again; b's Deferred holds the close.
        while log.count("a closed") < 3:
            await task.deferLater(reactor, 0.05, lambda: None)
        assert log == ["a closed", "b closed", "a closed", "a closed"]
        assert not conn.whenClosed().called
        b.closing.callback(None)
        await conn.whenClosed()
        assert log[-2:] == ["a destroyed", "b destroyed"]

        del log[:]
        b.refuse = errno.EPERM
        with pytest.raises(txqb.RefusedError) as caught:
            await txqb.connect(reactor, serviceName)
        assert caught.value.errno == errno.EPERM
        assert log[:2] == ["a accept", "b accept"]
    finally:
        await service.stopListening()
