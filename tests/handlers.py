"""
A txqb test service that speaks the same protocol as the C test server
(tests/peers/qbserver.c), so the same C client commands drive both.

Ids: 0 echo, 1 event burst (the echo service's); 2/3 flow control on
(RATE_OFF / RATE_OFF_2) for a u32 number of milliseconds; 4 server-side
disconnect; 6 events before the response; 7 oversize-event probe;
20/21 connection/service stats (u32 clear-after-read flag; u64 fields in
libqb's struct order); 22 set the rate limit.
"""

from __future__ import annotations

import errno
import struct
from typing import Any, List, Optional, Tuple

from twisted.internet.defer import Deferred, gatherResults

from txqb import RATE_NORMAL, RATE_OFF, RATE_OFF_2, Message, MessageTooLargeError
from txqb.echo import EchoHandlers
from txqb.server import ConnectionStats, ServerConnection

_U32 = struct.Struct("<I")


def packConnectionStats(stats: ConnectionStats) -> bytes:
    """``qb_ipcs_connection_stats_2`` as the C test server sends it."""
    return struct.pack(
        "<9Q",
        stats.clientPid,
        stats.requests,
        stats.responses,
        stats.events,
        stats.sendRetries,
        stats.recvRetries,
        stats.flowControlState,
        stats.flowControlCount,
        stats.eventQueueLength,
    )


def unpackConnectionStats(payload: bytes) -> ConnectionStats:
    """The inverse of L{packConnectionStats}."""
    return ConnectionStats(*struct.unpack("<9Q", payload))


class PeerHandlers(EchoHandlers):
    """Echo plus the C test server's extra ids; records every callback."""

    def __init__(self, refuse: int = 0, auth: Optional[Tuple[int, int, int]] = None) -> None:
        self.refuse = refuse
        self.auth = auth
        self.calls: List[Tuple[str, Any]] = []
        self.connections: List[ServerConnection] = []
        self.timers: List[Any] = []

    def connectionAccepted(self, connection: ServerConnection, uid: int, gid: int) -> int:
        self.calls.append(("accept", (connection.credentials.pid, uid, gid)))
        if self.auth is not None:
            connection.setAuth(*self.auth)
        return -self.refuse

    def connectionCreated(self, connection: ServerConnection) -> None:
        self.calls.append(("created", connection.credentials.pid))
        self.connections.append(connection)

    def connectionClosed(self, connection: ServerConnection) -> Any:
        self.calls.append(("closed", connection.credentials.pid))
        return None

    def connectionDestroyed(self, connection: ServerConnection) -> None:
        self.calls.append(("destroyed", connection.credentials.pid))

    def allClosed(self) -> "Deferred[object]":
        """
        Fires once every connection created so far is torn down: a C
        client's exit reaches the test before the server has necessarily
        seen the connection close.
        """
        return gatherResults([c.whenClosed() for c in self.connections])

    def names(self) -> List[str]:
        return [name for name, _ in self.calls]

    def messageReceived(self, connection: ServerConnection, msgId: int, payload: bytes) -> Any:
        if msgId in (2, 3):
            (ms,) = _U32.unpack(payload[:4])
            service = connection.service
            service.requestRateLimit(RATE_OFF if msgId == 2 else RATE_OFF_2)
            from twisted.internet import reactor

            self.timers.append(
                reactor.callLater(ms / 1000.0, service.requestRateLimit, RATE_NORMAL)  # type: ignore[attr-defined]
            )
            return Message(msgId, 0, b"")
        if msgId == 4:
            connection.disconnect()
            return None
        if msgId == 6:
            (n,) = _U32.unpack(payload[:4])
            for seq in range(n):
                connection.sendEvent(6, _U32.pack(seq))
            return Message(6, 0, b"")
        if msgId == 7:
            return self._oversize(connection)
        if msgId == 20:
            (clear,) = _U32.unpack(payload[:4])
            return Message(20, 0, packConnectionStats(connection.stats(bool(clear))))
        if msgId == 21:
            (clear,) = _U32.unpack(payload[:4])
            stats = connection.service.stats(bool(clear))
            return Message(
                21, 0, struct.pack("<2Q", stats.activeConnections, stats.closedConnections)
            )
        if msgId == 22:
            (rate,) = _U32.unpack(payload[:4])
            connection.service.requestRateLimit(rate)
            return Message(22, 0, b"")
        return super().messageReceived(connection, msgId, payload)

    async def _oversize(self, connection: ServerConnection) -> Message:
        try:
            await connection.sendEvent(7, bytes(10 * connection.maxMessageSize))
        except MessageTooLargeError as e:
            return Message(7, -e.errno, b"")
        return Message(7, 0, b"")

    def cancelTimers(self) -> None:
        for call in self.timers:
            if call.active():
                call.cancel()


__all__ = ["PeerHandlers", "packConnectionStats", "unpackConnectionStats", "errno"]


def watchWakeUps(counter: Any, connection: ServerConnection) -> None:
    """
    Count, in C{counter.turns}, the requests handled in each wake-up of
    C{connection}'s request reader (its handler adds to C{counter.current}).
    It wraps the method the reactor (or the connection's own scheduling)
    calls on each wake-up: the datagram reader's doRead, or the SHM
    request drain.  Counting there, rather than with a timer, holds on
    every reactor whatever order it runs timers and I/O in.
    """
    channels: Any = connection._channels
    target, name = (channels.requests, "doRead") if hasattr(channels, "requests") else (
        channels,
        "_drain",
    )
    original = getattr(target, name)

    def wakeUp() -> None:
        counter.current = 0
        original()
        if counter.current:
            counter.turns.append(counter.current)

    setattr(target, name, wakeUp)
