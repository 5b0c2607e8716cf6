"""
A counter service: request id 0 adds the payload's u32 (little-endian) to
a counter shared by every client and answers with the new value; each
change is also sent as an event (id 1) to every connected client.
"""

import errno
import struct

from txqb import Message, ServerConnection, ServiceHandlers

U32 = struct.Struct("<I")


class CounterHandlers(ServiceHandlers):
    """The counter service's handlers; ``start`` comes from handler-args."""

    def __init__(self, start: int = 0) -> None:
        self.value = start

    def messageReceived(self, connection: ServerConnection, msgId: int, payload: bytes):
        if msgId != 0 or len(payload) != U32.size:
            return Message(msgId, -errno.EINVAL, b"")
        (delta,) = U32.unpack(payload)
        self.value = (self.value + delta) & 0xFFFFFFFF
        answer = U32.pack(self.value)
        for other in connection.service.connections:
            if other is not connection:
                # Fire and forget: a client that goes away misses it.
                other.sendEvent(1, answer).addErrback(lambda _: None)
        return answer
