"""
txqb client against txqb server: the parts of the API that go beyond what
libqb's C client can do (unbounded pipelining, back-pressure on events,
ordered replies from asynchronous handlers), checked end to end over real
sockets.
"""

from __future__ import annotations

import struct
from typing import Any, List

import pytest
import pytest_twisted
from twisted.internet import defer, task

import txqb
from handlers import PeerHandlers
from txqb.echo import eventPayload


@pytest_twisted.ensureDeferred
async def test_eventBackPressure(reactor: Any, serviceName: str, transport: str) -> None:
    """A slow ``async for`` consumer makes the server wait, loses nothing."""
    handlers = PeerHandlers()
    service = txqb.listen(reactor, serviceName, handlers, transport=transport)
    client = await txqb.connect(reactor, serviceName)
    try:
        stream = client.events(highWater=50)
        burst = client.request(1, struct.pack("<II", 3000, 1000))
        seen = 0
        async for event in stream:
            assert event == txqb.Message(1, 0, eventPayload(seen, 1000))
            seen += 1
            if seen % 500 == 0:
                await task.deferLater(reactor, 0.02, lambda: None)
            if seen == 3000:
                break
        assert (await burst).payload == struct.pack("<I", 3000)
        (conn,) = service.connections
        assert conn.stats().sendRetries > 0  # the server really had to wait
    finally:
        await client.disconnect()
        await service.stopListening()


@pytest_twisted.ensureDeferred
async def test_orderedAsyncReplies(reactor: Any, serviceName: str, transport: str) -> None:
    """Handlers finishing out of order still answer in request order."""
    gates: List[defer.Deferred[None]] = []

    class Slow(txqb.ServiceHandlers):
        async def messageReceived(self, connection: Any, msgId: int, payload: bytes) -> Any:
            gate: defer.Deferred[None] = defer.Deferred()
            gates.append(gate)
            await gate
            return payload

    service = txqb.listen(reactor, serviceName, Slow(), transport=transport)
    client = await txqb.connect(reactor, serviceName)
    try:
        replies = [client.request(0, b"%d" % i) for i in range(5)]
        while len(gates) < 5:
            await task.deferLater(reactor, 0.01, lambda: None)
        for gate in reversed(gates):
            gate.callback(None)
        assert [(await r).payload for r in replies] == [b"%d" % i for i in range(5)]
    finally:
        await client.disconnect()
        await service.stopListening()


@pytest_twisted.ensureDeferred
async def test_handlerErrors(reactor: Any, serviceName: str, transport: str) -> None:
    """QBError answers with its errno; anything else with -EIO, logged."""

    class Failing(txqb.ServiceHandlers):
        def messageReceived(self, connection: Any, msgId: int, payload: bytes) -> Any:
            if msgId == 1:
                raise txqb.QBError("no such thing", 2)
            raise RuntimeError("bug")

    service = txqb.listen(reactor, serviceName, Failing(), transport=transport)
    client = await txqb.connect(reactor, serviceName)
    try:
        assert (await client.request(1)).error == -2
        assert (await client.request(2)).error == -5
    finally:
        await client.disconnect()
        await service.stopListening()


@pytest_twisted.ensureDeferred
async def test_deepPipeline(reactor: Any, serviceName: str, transport: str) -> None:
    """A txqb server never drops a response, so the window can be wide open."""
    service = txqb.listen(reactor, serviceName, PeerHandlers(), transport=transport)
    client = await txqb.connect(reactor, serviceName, maxInFlight=100000, maxInFlightBytes=1 << 30)
    try:
        replies = await defer.gatherResults(
            [client.request(0, b"%d" % i) for i in range(20000)], consumeErrors=True
        )
        assert [r.payload for r in replies] == [b"%d" % i for i in range(20000)]
    finally:
        await client.disconnect()
        await service.stopListening()


@pytest_twisted.ensureDeferred
async def test_lostConnectionFailsEverything(reactor: Any, serviceName: str, transport: str) -> None:
    never: defer.Deferred[bytes] = defer.Deferred()

    class Stall(txqb.ServiceHandlers):
        def messageReceived(self, connection: Any, msgId: int, payload: bytes) -> Any:
            return never

    service = txqb.listen(reactor, serviceName, Stall(), transport=transport)
    client = await txqb.connect(reactor, serviceName)
    stream = client.events()
    pending = [client.request(0) for _ in range(50)]
    await task.deferLater(reactor, 0.05, lambda: None)
    await service.stopListening()
    for d in pending:
        with pytest.raises(txqb.ConnectionLostError):
            await d
    with pytest.raises(txqb.ConnectionLostError):
        await stream.__anext__()
    assert not client.connected
    never.callback(b"too late")


@pytest_twisted.ensureDeferred
async def test_gatheredParts(reactor: Any, serviceName: str, transport: str) -> None:
    """
    A payload given as parts (``sendv``) arrives as one message, both ways;
    a message that has to wait for room keeps what its parts held when it
    was sent, though the sender changes its buffers at once.
    """
    sinks: List[bytes] = []
    eventsSent: List[defer.Deferred[None]] = []

    class Gathering(txqb.ServiceHandlers):
        def messageReceived(self, connection: Any, msgId: int, payload: bytes) -> Any:
            if msgId == 1:
                return payload
            if msgId == 2:
                sinks.append(bytes(payload))
                return None
            # 3: answer and a burst of events, from one reused buffer each
            buf = bytearray(3000)
            for i in range(40):
                buf[:4] = struct.pack("<I", i)
                eventsSent.append(connection.sendEvent(9, [b"ev", buf]))
            buf[:4] = b"done"
            connection.respond(3, (memoryview(b"resp-"), buf[:4]))
            return None

    events: List[bytes] = []
    service = txqb.listen(reactor, serviceName, Gathering(), transport=transport)
    client = await txqb.connect(reactor, serviceName, maxMessageSize=8192,
                                eventReceived=lambda m: events.append(bytes(m.payload)))
    try:
        reply = await client.request(1, (b"ab", bytearray(b"cd"), memoryview(b"ef")))
        assert reply.payload == b"abcdef"
        assert (await client.request(1, [b"x", b""])).payload == b"x"
        assert (await client.request(1, ())).payload == b""
        # Views of wider items, or strided ones, count and copy as bytes.
        wide = memoryview(b"abcdefgh").cast("I")
        assert (await client.request(1, wide)).payload == b"abcdefgh"
        assert (await client.request(1, [wide, memoryview(b"0123")[::2]])).payload == b"abcdefgh02"
        part = bytearray(6000)
        sent = []
        for i in range(30):
            part[:4] = struct.pack("<I", i)
            sent.append(client.send(2, (b"sink", part)))
        part[:4] = b"gone"
        await defer.gatherResults(sent)
        await client.request(1, b"")  # every sink is in by now
        assert sinks == [b"sink" + struct.pack("<I", i) + bytes(5996) for i in range(30)]
        assert (await client.request(3, b"")).payload == b"resp-done"
        await defer.gatherResults(eventsSent)
        for _ in range(500):  # (events and responses travel apart)
            if len(events) == 40:
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        assert events == [b"ev" + struct.pack("<I", i) + bytes(2996) for i in range(40)]
        half = client.maxMessageSize // 2
        too_big = client.request(1, (bytes(half), bytes(half)))  # and the header
        with pytest.raises(txqb.MessageTooLargeError):
            await too_big
    finally:
        await client.disconnect()
        await service.stopListening()
