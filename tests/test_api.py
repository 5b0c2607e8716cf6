"""
The server API beyond request and response: rate limiting as libqb reads
requests, and statistics that read the same as a libqb server's for the
same traffic.
"""

from __future__ import annotations

import errno
import os
import struct
from typing import Any, Dict, List, Tuple

import pytest
import pytest_twisted
from twisted.internet import task

import txqb
from cprocs import CClient, CServer, runClient
from handlers import PeerHandlers, unpackConnectionStats, watchWakeUps
from peers.build import Peers
from txqb.server import ConnectionStats, ServerConnection

_U32 = struct.Struct("<I")


async def _statsTraffic(reactor: Any, name: str) -> Dict[str, Any]:
    """
    One fixed conversation with a server that speaks tests/handlers.py's
    protocol; returns every statistic the server reported along the way.
    """
    events: List[txqb.Message] = []
    client = await txqb.connect(reactor, name, eventReceived=events.append)
    other = await txqb.connect(reactor, name)
    await other.disconnect()
    try:
        for size in range(10):
            assert (await client.request(0, b"x" * size)).payload == b"x" * size
        await client.request(6, _U32.pack(3))
        assert [e.payload for e in events] == [_U32.pack(n) for n in range(3)]
        # Flow control on (OFF_2, which this client's fcEnableMax of 1
        # sends through) and off again after 50 ms: two changes.
        await client.request(3, _U32.pack(50))
        # Served once the server reads again, i.e. with flow control off.
        first = unpackConnectionStats((await client.request(20, _U32.pack(0))).payload)
        cleared = unpackConnectionStats((await client.request(20, _U32.pack(1))).payload)
        after = unpackConnectionStats((await client.request(20, _U32.pack(0))).payload)
        service = struct.unpack("<2Q", (await client.request(21, _U32.pack(0))).payload)
        return {"first": first, "cleared": cleared, "after": after, "service": service}
    finally:
        await client.disconnect()


@pytest_twisted.ensureDeferred
async def test_statsMatchLibqb(
    reactor: Any, serviceName: str, transport: str, cpeers: Peers
) -> None:
    """
    The same conversation with a C libqb server and with a txqb server
    yields the same ``qb_ipcs_connection_stats_2`` and ``qb_ipcs_stats``,
    field for field, clear-after-read included.
    """
    server = await CServer(reactor, cpeers, serviceName, "--transport", transport).start()
    try:
        fromLibqb = await _statsTraffic(reactor, serviceName)
    finally:
        await server.stop()
    handlers = PeerHandlers()
    service = txqb.listen(reactor, serviceName, handlers, transport=transport)
    try:
        fromTxqb = await _statsTraffic(reactor, serviceName)
    finally:
        handlers.cancelTimers()
        await service.stopListening()

    pid = os.getpid()
    # What libqb reports, spelled out, so that a change on either side shows.
    # The stats request counts itself (libqb counts a request before it
    # processes it) but not its own response.
    assert fromLibqb["first"] == ConnectionStats(
        clientPid=pid,
        requests=13,
        responses=12,
        events=3,
        flowControlState=0,
        flowControlCount=2,
    )
    assert fromLibqb["cleared"] == ConnectionStats(
        clientPid=pid, requests=14, responses=13, events=3, flowControlCount=2
    )
    # The clearing request's own response goes out after the clear.
    assert fromLibqb["after"] == ConnectionStats(clientPid=pid, requests=1, responses=1)
    assert fromLibqb["service"] == (1, 1)
    assert fromTxqb == fromLibqb


class _TurnCounter(PeerHandlers):
    """Counts the requests handled in each wake-up of a connection's reader."""

    def __init__(self) -> None:
        super().__init__()
        self.turns: List[int] = []
        self.current = 0

    def messageReceived(self, connection: ServerConnection, msgId: int, payload: bytes) -> Any:
        self.current += 1
        return super().messageReceived(connection, msgId, payload)

    def watch(self, connection: ServerConnection) -> None:
        """Count per wake-up of C{connection}'s reader (L{watchWakeUps})."""
        watchWakeUps(self, connection)


@pytest.mark.parametrize(
    "rate, batch",
    [(txqb.RATE_FAST, 50), (txqb.RATE_NORMAL, 5), (txqb.RATE_SLOW, 1)],
    ids=["fast", "normal", "slow"],
)
@pytest_twisted.ensureDeferred
async def test_requestsReadPerWakeup(
    reactor: Any, serviceName: str, transport: str, rate: int, batch: int
) -> None:
    """
    A queue of waiting requests is read in libqb's batches: up to 50 per
    wake-up at RATE_FAST, 5 at RATE_NORMAL, one at RATE_SLOW; between
    batches the reactor serves everything else.
    """
    handlers = _TurnCounter()
    service = txqb.listen(reactor, serviceName, handlers, transport=transport)
    try:
        service.requestRateLimit(txqb.RATE_OFF_2)
        # fcEnableMax 1 sends through OFF_2: the requests queue up unread.
        client = await txqb.connect(reactor, serviceName, maxInFlight=200)
        handlers.watch(service.connections[0])
        total = 120
        replies = [client.request(0, _U32.pack(n)) for n in range(total)]
        assert client.outstanding == total
        assert handlers.current == 0
        service.requestRateLimit(rate)
        for n, d in enumerate(replies):
            assert (await d).payload == _U32.pack(n)
        await client.disconnect()
        # The kernel may hold back part of a socket client's queue, so a
        # turn can find fewer than a batch; none reads more.
        assert sum(handlers.turns) == total
        assert max(handlers.turns) == batch, handlers.turns
    finally:
        await service.stopListening()


@pytest_twisted.ensureDeferred
async def test_rateLimitCountsAndConnections(reactor: Any, serviceName: str, transport: str) -> None:
    """
    Rate changes at runtime reach every connection, later ones included,
    and are counted once per change of the flow-control word.
    """
    service = txqb.listen(reactor, serviceName, PeerHandlers(), transport=transport)
    clients = []
    try:
        clients.append(await txqb.connect(reactor, serviceName))
        service.requestRateLimit(txqb.RATE_SLOW)  # no flow-control change
        service.requestRateLimit(txqb.RATE_OFF)
        clients.append(await txqb.connect(reactor, serviceName))
        service.requestRateLimit(txqb.RATE_OFF_2)
        service.requestRateLimit(txqb.RATE_FAST)
        first, second = service.connections
        seen: List[Tuple[int, int]] = [
            (c.stats().flowControlState, c.stats().flowControlCount) for c in (first, second)
        ]
        # The second connection started with the service's OFF (a change
        # from the 0 its client saw at first), then OFF_2, then off.
        assert seen == [(0, 3), (0, 3)]
        assert first.serviceId == service.serviceId == 0
        assert first.bufferSize == clients[0].maxMessageSize
        for client in clients:
            assert (await client.request(0, b"ok")).payload == b"ok"
        assert service.stats() == txqb.ServiceStats(2, 0)
        await clients.pop().disconnect()
        await second.whenClosed()
        assert clients[0].stats(clearAfterRead=True) == txqb.ClientStats(
            requests=1, responses=1
        )
        assert clients[0].stats() == txqb.ClientStats()
        assert service.stats(clearAfterRead=True) == txqb.ServiceStats(1, 1)
        assert service.stats() == txqb.ServiceStats(1, 0)
        with pytest.raises(ValueError):
            service.requestRateLimit(7)
    finally:
        for client in clients:
            await client.disconnect()
        await service.stopListening()


class _Oversize(PeerHandlers):
    """Answers id 9 with more than the connection can carry."""

    def messageReceived(self, connection: ServerConnection, msgId: int, payload: bytes) -> Any:
        if msgId == 9:
            return bytes(connection.bufferSize)
        if msgId == 10:
            return self._explicit(connection)
        return super().messageReceived(connection, msgId, payload)

    async def _explicit(self, connection: ServerConnection) -> txqb.Message:
        with pytest.raises(txqb.MessageTooLargeError) as caught:
            await connection.respond(10, bytes(connection.bufferSize))
        assert caught.value.errno == errno.EMSGSIZE
        with pytest.raises(txqb.MessageTooLargeError):
            await connection.sendEvent(10, bytes(connection.bufferSize))
        return txqb.Message(10, 0, b"checked")


@pytest_twisted.ensureDeferred
async def test_oversizeAnswers(
    reactor: Any, serviceName: str, transport: str, cpeers: Peers
) -> None:
    """
    An answer too large for the connection never reaches the wire: an
    explicit respond or sendEvent fails with EMSGSIZE, and a handler's
    returned answer becomes a -EMSGSIZE response, so the client (a C libqb
    one here) gets an answer and the pairing of later responses holds.
    """
    service = txqb.listen(reactor, serviceName, _Oversize(), transport=transport)
    try:
        code, lines = await runClient(
            reactor, cpeers, serviceName, "invalid", "9", "invalid", "10", "echo", "100"
        )
        assert code == 0, lines
        assert lines[1:] == [f"INVALID 9 {-errno.EMSGSIZE}", "INVALID 10 0", "ECHO 100 ok", "DONE"]
    finally:
        await service.stopListening()


@pytest_twisted.ensureDeferred
async def test_newClientServedDuringFlood(
    reactor: Any, serviceName: str, transport: str, cpeers: Peers
) -> None:
    """
    While two C libqb clients flood the service with back-to-back
    requests, a new client connects and is served: it finishes while the
    floods are still running (they would take minutes to end).
    """
    service = txqb.listen(reactor, serviceName, PeerHandlers(), transport=transport)
    floods = [
        CClient(reactor, cpeers, serviceName, ["echos", "1000000", "64"]).start()
        for _ in range(2)
    ]
    try:
        for flood in floods:
            await flood.waitFor("CONNECTED")
        while sum(c.stats().requests for c in service.connections) < 1000:
            await task.deferLater(reactor, 0.01, lambda: None)
        client = await txqb.connect(reactor, serviceName)
        for n in range(20):
            assert (await client.request(0, b"%d" % n)).payload == b"%d" % n
        await client.disconnect()
        assert [flood.proto.exitCode for flood in floods] == [None, None]
    finally:
        for flood in floods:
            flood.kill()
        for flood in floods:
            await flood.proto.ended
        await service.stopListening()


@pytest_twisted.ensureDeferred
async def test_destroyWithQueuedEvents(
    reactor: Any, serviceName: str, transport: str, cpeers: Peers
) -> None:
    """
    Stopping a service while a C libqb client that reads nothing has a
    full event channel and more events queued behind it: the queued sends
    fail with ConnectionLostError, the stop completes, nothing is left.
    """
    handlers = PeerHandlers()
    service = txqb.listen(reactor, serviceName, handlers, transport=transport)
    sleeper = CClient(reactor, cpeers, serviceName, ["hang"]).start()
    try:
        await sleeper.waitFor("HANGING")
        (conn,) = service.connections
        sends = [conn.sendEvent(1, bytes(1000)) for _ in range(5000)]
        waiting = [d for d in sends if not d.called]
        assert waiting, "the channel never filled"
        assert conn.stats().sendRetries == len(waiting)
        failures: List[Any] = []
        for d in waiting:
            d.addErrback(failures.append)
        await service.stopListening()
        assert len(failures) == len(waiting)
        assert all(f.check(txqb.ConnectionLostError) for f in failures)
        assert service.connections == [] and not conn.connected
        assert handlers.names() == ["accept", "created", "closed", "destroyed"]
    finally:
        sleeper.kill()
        await sleeper.proto.ended
