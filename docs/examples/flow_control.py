"""
Flow control: a server that stops reading requests makes txqb clients
wait (a C libqb client gets -EAGAIN instead).

Run as ``python flow_control.py NAME``; it starts a txqb echo server named
NAME.
"""

import sys

from twisted.internet import task

import txqb
from txqb import RATE_NORMAL, RATE_OFF
from txqb.echo import ECHO, EchoHandlers


async def main(reactor, name):
    service = txqb.listen(reactor, name, EchoHandlers())
    try:
        client = await txqb.connect(reactor, name)

        service.requestRateLimit(RATE_OFF)
        print("server: rate limit off")
        pending = client.request(ECHO, b"patience")

        await task.deferLater(reactor, 0.2, lambda: None)
        print("after 0.2 s, answered:", pending.called)

        service.requestRateLimit(RATE_NORMAL)
        print("server: rate limit normal")
        reply = await pending
        print("reply:", reply.payload)

        await client.disconnect()
    finally:
        await service.stopListening()


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
