"""
The built-in ``echo`` service, for trying txqb and for testing peers.

Protocol (all integers little-endian):

* request id 0: a response id 0 carrying the request's payload;
* request id 1 with payload ``(u32 count, u32 size)``: ``count`` events of
  id 1, each ``size`` bytes (at least 4) beginning with its u32 sequence
  number 0 … count-1 (byte ``i`` after it is ``(seq + i) & 0xff``), then a
  response id 1 whose payload is the u32 ``count``;
* any other id: a response with that id, an empty payload and error
  ``-EINVAL`` (-22).
"""

from __future__ import annotations

import errno
import struct
from typing import Any

from txqb._wire.headers import RESPONSE_HEADER_SIZE, Message
from txqb.server import ServerConnection, ServiceHandlers

__all__ = ["EchoHandlers", "ECHO", "EVENTS", "eventPayload"]

ECHO = 0
"""Request id: echo the payload back."""

EVENTS = 1
"""Request id: send a burst of events, then respond."""

_U32 = struct.Struct("<I")
_EVENTS_REQUEST = struct.Struct("<II")


def eventPayload(seq: int, size: int) -> bytes:
    """The payload of event number ``seq`` in a burst of ``size``-byte events."""
    tail = bytes((seq + i) & 0xFF for i in range(4, size))
    return _U32.pack(seq) + tail


class EchoHandlers(ServiceHandlers):
    """The echo service's handlers (see the module docstring)."""

    def messageReceived(self, connection: ServerConnection, msgId: int, payload: bytes) -> Any:
        """Echo, burst events, or answer ``-EINVAL``."""
        if msgId == ECHO:
            return payload
        if msgId == EVENTS and len(payload) == _EVENTS_REQUEST.size:
            count, size = _EVENTS_REQUEST.unpack(payload)
            if size >= 4 and size + RESPONSE_HEADER_SIZE <= connection.maxMessageSize:
                return self._burst(connection, count, size)
            return Message(msgId, -errno.EMSGSIZE if size >= 4 else -errno.EINVAL, b"")
        return Message(msgId, -errno.EINVAL, b"")

    async def _burst(self, connection: ServerConnection, count: int, size: int) -> Message:
        # Payloads repeat every 256 events: build each distinct tail once.
        tails = [bytes((seq + i) & 0xFF for i in range(4, size)) for seq in range(min(count, 256))]
        pack = _U32.pack
        for seq in range(count):
            # Fired at once unless the client's event channel is full; then
            # wait, as libqb servers retry on -EAGAIN, but without blocking.
            await connection.sendEvent(EVENTS, pack(seq) + tails[seq & 0xFF])
        return Message(EVENTS, 0, _U32.pack(count))
