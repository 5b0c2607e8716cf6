"""
A service of your own: an accept policy and handlers that answer in
every way txqb allows.

Run as ``python custom_server.py NAME``: it serves NAME and NAME-locked
(which refuses everyone), then calls both as a client.
"""

import errno
import os
import sys

from twisted.internet import task

import txqb
from txqb import Message, QBError, RefusedError, ServiceHandlers

HELLO, ADD, LOOKUP, COUNT, NOTIFY = range(5)


class Greeter(ServiceHandlers):
    def __init__(self, reactor, allowedUids):
        self.reactor = reactor
        self.allowedUids = allowedUids

    def connectionAccepted(self, connection, uid, gid):
        # uid and gid come from the kernel, not from the client.
        if uid not in self.allowedUids:
            return -errno.EACCES
        return 0

    def connectionCreated(self, connection):
        connection.context = {"requests": 0}

    def messageReceived(self, connection, msgId, payload):
        connection.context["requests"] += 1
        if msgId == HELLO:
            # bytes: a response with the request's id and error 0.
            return b"hello, " + payload
        if msgId == ADD:
            # A Message chooses the id, the error and the payload.
            a, b = payload.split(b"+")
            return Message(ADD, 0, b"%d" % (int(a) + int(b)))
        if msgId == LOOKUP:
            # A coroutine (or a Deferred): answered when it finishes,
            # still in request order.
            return self.lookup(payload)
        if msgId == COUNT:
            # Respond directly, then return None: no second response.
            connection.respond(COUNT, b"%d" % connection.context["requests"])
            return None
        if msgId == NOTIFY:
            return self.notify(connection)
        # A QBError answers with its errno, as -errno.
        raise QBError(f"unknown request {msgId}", errno.EOPNOTSUPP)

    async def lookup(self, key):
        await task.deferLater(self.reactor, 0.05, lambda: None)
        if key == b"answer":
            return b"42"
        return Message(LOOKUP, -errno.ENOENT, b"")

    async def notify(self, connection):
        # An event first (waiting if the client's event channel is full),
        # then the response.
        await connection.sendEvent(NOTIFY, b"you asked to be notified")
        return b"done"


async def main(reactor, name):
    me = {0, os.getuid()}
    open_ = txqb.listen(reactor, name, Greeter(reactor, allowedUids=me))
    locked = txqb.listen(reactor, name + "-locked", Greeter(reactor, allowedUids=set()))
    try:
        client = await txqb.connect(
            reactor, name, eventReceived=lambda event: print("event:", event.payload)
        )
        for msgId, payload in [
            (HELLO, b"world"),
            (ADD, b"2+3"),
            (LOOKUP, b"answer"),
            (LOOKUP, b"question"),
            (NOTIFY, b""),
            (COUNT, b""),
            (99, b""),
        ]:
            reply = await client.request(msgId, payload)
            print(f"request {msgId}: error {reply.error}, payload {reply.payload!r}")
        await client.disconnect()

        try:
            await txqb.connect(reactor, name + "-locked")
        except RefusedError as e:
            print("refused:", errno.errorcode[e.errno])
    finally:
        await open_.stopListening()
        await locked.stopListening()


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
