"""
A txqb test service that speaks the same protocol as the C test server
(tests/peers/qbserver.c), so the same C client commands drive both.

Ids: 0 echo, 1 event burst (the echo service's); 2/3 flow control on
(RATE_OFF / RATE_OFF_2) for a u32 number of milliseconds; 4 server-side
disconnect; 6 events before the response; 7 oversize-event probe.
"""

from __future__ import annotations

import errno
import struct
from typing import Any, List, Optional, Tuple

from txqb import RATE_NORMAL, RATE_OFF, RATE_OFF_2, Message, MessageTooLargeError
from txqb.echo import EchoHandlers
from txqb.server import ServerConnection

_U32 = struct.Struct("<I")


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


__all__ = ["PeerHandlers", "errno"]
