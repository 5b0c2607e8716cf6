"""
A first client: talk to the echo service.

Run as ``python echo_client.py NAME``.  To need nothing else running, the
program starts a txqb echo server named NAME in its own process; a client
of a C daemon would only call txqb.connect.
"""

import sys

from twisted.internet import task

import txqb
from txqb.echo import EchoHandlers


async def main(reactor, name):
    service = txqb.listen(reactor, name, EchoHandlers())
    try:
        client = await txqb.connect(reactor, name)
        print("connected, messages up to", client.maxMessageSize, "bytes")

        reply = await client.request(0, b"hello")
        print("echo:", reply.id, reply.error, reply.payload)

        reply = await client.request(7)
        print("unknown id:", reply.id, reply.error, reply.payload)

        await client.disconnect()
        print("connected:", client.connected)
    finally:
        await service.stopListening()


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
