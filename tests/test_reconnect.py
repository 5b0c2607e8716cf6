"""
L{txqb.reconnect.ReconnectingClientService} survives server restarts, C
libqb servers and txqb servers alike, and re-establishes its event stream.
"""

from __future__ import annotations

import struct
from typing import Any, Awaitable, Callable, List

import pytest
import pytest_twisted
from twisted.internet import task

import txqb
from cprocs import CServer
from handlers import PeerHandlers
from peers.build import Peers
from txqb.reconnect import ReconnectingClientService

_U32 = struct.Struct("<I")


async def _restarts(
    reactor: Any,
    name: str,
    start: Callable[[], Awaitable[Any]],
    stop: Callable[[Any], Awaitable[None]],
) -> None:
    """
    Run a service through two restarts under a reconnecting client whose
    preparation subscribes to three events (id 6: events, then the
    response), and check every connection delivered its own stream.
    """
    events: List[int] = []
    prepared: List[txqb.Client] = []

    async def subscribe(client: txqb.Client) -> None:
        reply = await client.request(6, _U32.pack(3))
        assert reply.error == 0
        prepared.append(client)

    def eventReceived(message: txqb.Message) -> None:
        events.append(_U32.unpack(message.payload)[0])

    reconnecting = ReconnectingClientService(
        reactor,
        name,
        eventReceived=eventReceived,
        prepareConnection=subscribe,
        retryPolicy=lambda attempt: 0.05,
        timeout=5.0,
    )
    server = await start()
    reconnecting.startService()
    try:
        seen = []
        for round_ in range(3):
            client = await reconnecting.whenConnected(failAfterFailures=100)
            assert client.connected and client is prepared[-1]
            assert (await client.request(0, b"round %d" % round_)).payload == b"round %d" % round_
            seen.append(client)
            if round_ < 2:
                await stop(server)
                await client.whenDisconnected()
                # The service is gone for a while: attempts fail and back off.
                await task.deferLater(reactor, 0.2, lambda: None)
                server = await start()
        assert len(set(map(id, seen))) == 3
        assert events == [0, 1, 2] * 3
    finally:
        await reconnecting.stopService()
        await stop(server)
    assert not seen[-1].connected


@pytest_twisted.ensureDeferred
async def test_reconnectToLibqbServer(
    reactor: Any, serviceName: str, transport: str, cpeers: Peers
) -> None:
    """A C libqb server restarted twice: the client comes back each time."""

    async def start() -> CServer:
        return await CServer(reactor, cpeers, serviceName, "--transport", transport).start()

    async def stop(server: CServer) -> None:
        await server.stop()

    await _restarts(reactor, serviceName, start, stop)


@pytest_twisted.ensureDeferred
async def test_reconnectToTxqbServer(reactor: Any, serviceName: str, transport: str) -> None:
    """The same with a txqb server."""

    async def start() -> txqb.Service:
        return txqb.listen(reactor, serviceName, PeerHandlers(), transport=transport)

    async def stop(service: txqb.Service) -> None:
        await service.stopListening()

    await _restarts(reactor, serviceName, start, stop)


@pytest_twisted.ensureDeferred
async def test_reconnectGivesUp(reactor: Any, serviceName: str) -> None:
    """With nobody serving, C{failAfterFailures} ends the wait."""
    reconnecting = ReconnectingClientService(
        reactor, serviceName, retryPolicy=lambda attempt: 0.01
    )
    reconnecting.startService()
    try:
        with pytest.raises(txqb.ServiceNotFoundError):
            await reconnecting.whenConnected(failAfterFailures=3)
    finally:
        await reconnecting.stopService()
