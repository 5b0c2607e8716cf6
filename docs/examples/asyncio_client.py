"""
txqb under asyncio: Twisted's asyncio reactor, driven from asyncio code.

Run as ``python asyncio_client.py NAME``; it starts a txqb echo server
named NAME.
"""

import asyncio
import sys

from twisted.internet import asyncioreactor

# Install the asyncio reactor before anything imports the default one.
asyncioreactor.install()

from twisted.internet import reactor, task  # noqa: E402
from twisted.internet.defer import Deferred  # noqa: E402

import txqb  # noqa: E402
from txqb.echo import ECHO, EchoHandlers  # noqa: E402


async def asyncioMain(name):
    """Plain asyncio code: Deferreds become futures with asFuture."""
    loop = asyncio.get_running_loop()
    service = txqb.listen(reactor, name, EchoHandlers())
    try:
        client = await txqb.connect(reactor, name).asFuture(loop)
        replies = await asyncio.gather(
            *(client.request(ECHO, word).asFuture(loop) for word in [b"from", b"asyncio"])
        )
        print("replies:", [reply.payload for reply in replies])
        await client.disconnect().asFuture(loop)
    finally:
        await service.stopListening().asFuture(loop)
    return "done"


def main(reactor, name):
    # And back: an asyncio task becomes a Deferred with fromFuture.
    loop = asyncio.get_event_loop()
    d = Deferred.fromFuture(loop.create_task(asyncioMain(name)))
    d.addCallback(print)
    return d


if __name__ == "__main__":
    print("reactor:", type(reactor).__name__)
    task.react(main, sys.argv[1:])
