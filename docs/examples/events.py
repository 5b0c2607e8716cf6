"""
Events: a burst from the echo service, read with ``async for``.

Run as ``python events.py NAME``; it starts a txqb echo server named NAME.
"""

import struct
import sys

from twisted.internet import task

import txqb
from txqb.echo import EVENTS, EchoHandlers

COUNT, SIZE = 1000, 64


async def main(reactor, name):
    service = txqb.listen(reactor, name, EchoHandlers())
    try:
        seen = []
        client = await txqb.connect(reactor, name, eventReceived=seen.append)

        # Ask for COUNT events of SIZE bytes; the response comes after them.
        events = client.events(highWater=100)
        burst = client.request(EVENTS, struct.pack("<II", COUNT, SIZE))

        expected = 0
        async for event in events:
            (seq,) = struct.unpack_from("<I", event.payload)
            if event.id != EVENTS or seq != expected or len(event.payload) != SIZE:
                raise SystemExit(f"unexpected event {event!r}")
            expected += 1
            if expected == COUNT:
                break
        print(f"async for: {expected} events, in order")

        reply = await burst
        (count,) = struct.unpack("<I", reply.payload)
        print(f"response: id {reply.id}, error {reply.error}, count {count}")
        print(f"callback: {len(seen)} events")

        await client.disconnect()
        async for event in events:
            print("never printed: the iteration ends at disconnect")
        print("stream ended")
    finally:
        await service.stopListening()


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
