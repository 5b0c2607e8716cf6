"""
Pipelining: many requests outstanding at once, with a timeout and a
cancellation among them.

Run as ``python pipelining.py NAME``; it starts a txqb server named NAME:
the echo service plus a slow request.
"""

import sys

from twisted.internet import task
from twisted.internet.defer import CancelledError, gatherResults

import txqb
from txqb import QBTimeoutError
from txqb.echo import ECHO, EchoHandlers

SLOW = 2


class SlowEcho(EchoHandlers):
    """The echo service, plus request SLOW: echo after half a second."""

    def __init__(self, reactor):
        self.reactor = reactor

    def messageReceived(self, connection, msgId, payload):
        if msgId == SLOW:
            return task.deferLater(self.reactor, 0.5, lambda: payload)
        return super().messageReceived(connection, msgId, payload)


async def main(reactor, name):
    service = txqb.listen(reactor, name, SlowEcho(reactor))
    try:
        # A txqb server never drops a response, so a wide window is safe.
        client = await txqb.connect(reactor, name, maxInFlight=1000)

        # 1000 requests at once; each response goes to its own request.
        requests = [client.request(ECHO, b"%d" % i) for i in range(1000)]
        requests[500].cancel()
        try:
            await requests[500]
        except CancelledError:
            print("request 500 cancelled")
        rest = requests[:500] + requests[501:]
        replies = await gatherResults(rest)
        expected = [b"%d" % i for i in range(1000) if i != 500]
        mine = [reply.payload for reply in replies] == expected
        print(f"{len(replies)} replies, each to its own request: {mine}")

        # A timeout fails the request but keeps its place: the late
        # response is read and dropped, and the next request gets its own.
        try:
            await client.request(SLOW, b"late", timeout=0.1)
        except QBTimeoutError as e:
            print("timed out:", e)
        reply = await client.request(ECHO, b"next")
        print("next request:", reply.payload)

        await client.disconnect()
    finally:
        await service.stopListening()


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
