"""
Zero-copy delivery: handlers and client callbacks read payloads straight
from the shared-memory ring (SHM) or the receive buffer (socket), through
views that are revoked once the call returns.  Driven by C libqb peers.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from typing import Any, List

import pytest
import pytest_twisted
from twisted.internet import defer, task

import txqb
from cprocs import CServer, runClient
from handlers import PeerHandlers
from peers.build import Peers
from txqb.echo import eventPayload
from txqb.server import ServerConnection


def _intoRing(view: memoryview, transport: str) -> bool:
    # A view of the ring is a view of the mapped file itself (a plain map,
    # or the mirrored one whose owner is a ctypes array), never a copy.
    return transport == "socket" or isinstance(view.obj, (mmap.mmap, ctypes.Array))


class _ViewingHandlers(PeerHandlers):
    """Echo, keeping every view it was given."""

    def __init__(self, transport: str) -> None:
        super().__init__()
        self.transport = transport
        self.views: List[memoryview] = []
        self.inRing = 0
        self.afterAwait: List[str] = []

    def messageReceived(self, connection: ServerConnection, msgId: int, payload: Any) -> Any:
        assert isinstance(payload, memoryview)
        self.views.append(payload)
        self.inRing += _intoRing(payload, self.transport)
        if msgId == 0:
            return txqb.Message(0, 0, payload)  # the view itself, sent at once
        if msgId == 8:
            return self._late(payload)
        return super().messageReceived(connection, msgId, bytes(payload))

    async def _late(self, payload: memoryview) -> bytes:
        kept = bytes(payload)  # read before the first await: valid
        from twisted.internet import reactor

        await task.deferLater(reactor, 0, lambda: None)  # type: ignore[arg-type]
        try:
            bytes(payload)
        except ValueError as e:
            self.afterAwait.append(str(e))
        return kept


@pytest_twisted.ensureDeferred
async def test_serverZeroCopy(reactor: Any, serviceName: str, transport: str, cpeers: Peers) -> None:
    """
    A C libqb client's requests of every size reach the handler as views
    into the ring, answered straight from them; each view is revoked when
    its handler returns, and an ``async def`` handler reads its own up to
    its first ``await``.
    """
    handlers = _ViewingHandlers(transport)
    service = txqb.listen(reactor, serviceName, handlers, transport=transport, zeroCopy=True)
    try:
        code, lines = await runClient(
            reactor, cpeers, serviceName, "sweep", "997", "echos", "300", "5000",
            options=["--max", "70000"],
        )
        assert code == 0, lines
        assert lines[1:] == ["SWEEP 72 ok", "ECHOS 300 ok", "DONE"]
        assert len(handlers.views) == 372
        # The ring wraps now and then; mirrored, it needs no copy even then.
        assert handlers.inRing == 372
        for view in handlers.views:
            with pytest.raises(ValueError, match="released"):
                view.tobytes()

        client = await txqb.connect(reactor, serviceName)
        replies = [client.request(8, b"late %d" % n) for n in range(3)]
        replies.append(client.request(0, b"behind them"))
        assert [(await d).payload for d in replies] == [b"late 0", b"late 1", b"late 2", b"behind them"]
        await client.disconnect()
        assert len(handlers.afterAwait) == 3
    finally:
        await service.stopListening()


@pytest_twisted.ensureDeferred
async def test_clientZeroCopy(reactor: Any, serviceName: str, transport: str, cpeers: Peers) -> None:
    """
    Against a C libqb server, events and responses arrive as views valid
    during their callback (and the code an ``await`` resumes), revoked
    after; the event stream still gets copies.
    """
    seen: List[memoryview] = []
    errors: List[str] = []
    count, size = 2000, 3000

    def eventReceived(event: txqb.Message) -> None:
        view: Any = event.payload
        assert isinstance(view, memoryview)
        if view.tobytes() != eventPayload(len(seen), size):
            errors.append(f"event {len(seen)} differs")
        seen.append(view)

    server = await CServer(reactor, cpeers, serviceName, "--transport", transport).start()
    try:
        client = await txqb.connect(
            reactor, serviceName, eventReceived=eventReceived, zeroCopy=True
        )
        stream = client.events()
        reply = await client.request(1, struct.pack("<II", count, size))
        assert (reply.error, bytes(reply.payload)) == (0, struct.pack("<I", count))
        payload: Any = reply.payload
        assert isinstance(payload, memoryview) and _intoRing(payload, transport)
        await task.deferLater(reactor, 0, lambda: None)
        with pytest.raises(ValueError, match="released"):
            payload.tobytes()
        assert errors == [] and len(seen) == count
        for view in seen:
            with pytest.raises(ValueError, match="released"):
                view.tobytes()
        for n in range(count):
            event = await stream.__anext__()
            assert event.payload == eventPayload(n, size)
        await client.disconnect()
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_clientZeroCopyBackToBack(
    reactor: Any, serviceName: str, transport: str, cpeers: Peers
) -> None:
    """
    Large requests sent from the code a zero-copy response resumes wait
    until that response's room in the ring is given back: a C libqb server
    answering into a ring still holding the previous response would find
    no room and drop the answer.
    """
    server = await CServer(reactor, cpeers, serviceName, "--transport", transport).start()
    try:
        client = await txqb.connect(reactor, serviceName, maxMessageSize=300_000, zeroCopy=True)
        big = bytes(range(256)) * 1000
        for n in range(20):
            reply = await client.request(0, big[n:], timeout=10)
            assert bytes(reply.payload) == big[n:]
        await client.disconnect()
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_serverZeroCopyAnswersWait(reactor: Any, serviceName: str, transport: str) -> None:
    """
    Answers made of a zero-copy request's views (whole, or as a Message's
    parts) that wait behind a slower answer keep what the request held,
    though the ring or buffer under them is reused meanwhile.
    """
    gate: defer.Deferred[None] = defer.Deferred()

    class Gated(txqb.ServiceHandlers):
        def messageReceived(self, connection: Any, msgId: int, payload: Any) -> Any:
            if msgId == 1:
                return gate.addCallback(lambda _: b"first")
            if msgId == 2:
                return txqb.Message(2, 0, [payload[:3], payload[3:]])
            return payload

    service = txqb.listen(reactor, serviceName, Gated(), transport=transport, zeroCopy=True)
    client = await txqb.connect(reactor, serviceName, maxMessageSize=8192, maxInFlight=100,
                                maxInFlightBytes=1 << 20)
    try:
        replies = [client.request(1)]
        for n in range(40):  # more than the ring holds: it is reused under them
            body = (b"%02d" % n) * 500
            replies.append(client.request(2 if n % 2 else 0, body))
        (conn,) = service.connections
        for _ in range(500):  # until every request is in and answered, held
            if conn.stats().requests == 41:
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        assert conn.stats().requests == 41
        gate.callback(None)
        got = [(await d).payload for d in replies]
        assert got == [b"first"] + [(b"%02d" % n) * 500 for n in range(40)]
    finally:
        await client.disconnect()
        await service.stopListening()
