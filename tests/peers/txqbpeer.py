"""
txqb's side of the matrix protocol: the request ids that libqb's own IPC
test server reacts to (tests/check_ipc.c), mirrored by qbserver.c so that
the same scenario drives a txqb server and a C libqb server.

Ids beyond L{handlers.PeerHandlers}' (all payload integers u32 LE):

* 5 die: the server process C{_exit(0)}s inside the handler (only when
  run as a process, see L{main}; in-process servers answer ``-EINVAL``);
* 8 dispatch: answered by a header-only event id 8, never a response;
* 9 bulk: a 10x oversize event must fail with EMSGSIZE, one event must
  raise the event-queue length by one, then the response (error 0, or
  ``-EPROTO`` when a check failed), then 9 more header-only events;
* 10 MS: a self-feeding reader (always ready) runs for MS milliseconds,
  libqb's starvation generator; the response comes at once;
* 11 held: never answered;
* 13 pump: events id 13 (u32 sequence numbers) are sent from a timer
  until the connection goes, whether or not the client reads them.

With C{eventOnCreated} every new connection first gets a header-only
event id 12 from inside L{connectionCreated}.

Run as a program it is a txqb server process for the tests (and the soak
run)::

    python txqbpeer.py NAME [--transport socket|shm] [--filesystem]

printing ``READY <pid>`` once listening, ``DYING`` before id 5 exits and
``BYE`` after SIGTERM has stopped the service.
"""

from __future__ import annotations

import errno
import os
import struct
import sys
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from handlers import PeerHandlers  # noqa: E402
from txqb import Message, MessageTooLargeError  # noqa: E402
from txqb.errors import ConnectionLostError  # noqa: E402
from txqb.server import ServerConnection  # noqa: E402

_U32 = struct.Struct("<I")

DIE, DISPATCH, BULK, SELF_FEED, HOLD, CREATED_EVENT, PUMP = 5, 8, 9, 10, 11, 12, 13
BULK_EVENTS = 10


class SelfFeed:
    """A pipe whose reader always writes the next byte: always readable."""

    def __init__(self, reactor: Any, ms: int) -> None:
        self.reactor = reactor
        self.rounds = 0
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.write(self._w, b"x")
        reactor.addReader(self)
        self._stop = reactor.callLater(ms / 1000.0, self.stop)

    def fileno(self) -> int:
        return self._r

    def logPrefix(self) -> str:
        return "SelfFeed"

    def doRead(self) -> None:
        os.write(self._w, os.read(self._r, 1))
        self.rounds += 1

    def connectionLost(self, reason: Any) -> None:
        pass

    @property
    def running(self) -> bool:
        return self._r >= 0

    def stop(self) -> None:
        if self._stop.active():
            self._stop.cancel()
        if self._r >= 0:
            self.reactor.removeReader(self)
            os.close(self._r)
            os.close(self._w)
            self._r = self._w = -1


class MatrixHandlers(PeerHandlers):
    """PeerHandlers plus the matrix ids (see the module docstring)."""

    def __init__(self, *a: Any, canDie: bool = False, eventOnCreated: bool = False, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.canDie = canDie
        self.eventOnCreated = eventOnCreated
        self.feeds: List[SelfFeed] = []
        self.pumps: Dict[ServerConnection, Any] = {}
        self.pumped: Dict[ServerConnection, int] = {}
        self.bulkChecks: List[str] = []

    def connectionCreated(self, connection: ServerConnection) -> None:
        super().connectionCreated(connection)
        if self.eventOnCreated:
            connection.sendEvent(CREATED_EVENT).addErrback(lambda f: f.trap(ConnectionLostError))

    def connectionClosed(self, connection: ServerConnection) -> Any:
        call = self.pumps.pop(connection, None)
        if call is not None and call.active():
            call.cancel()
        return super().connectionClosed(connection)

    def messageReceived(self, connection: ServerConnection, msgId: int, payload: bytes) -> Any:
        if msgId == DIE and self.canDie:
            print("DYING", flush=True)
            os._exit(0)
        if msgId == DISPATCH:
            connection.sendEvent(DISPATCH).addErrback(lambda f: f.trap(ConnectionLostError))
            return None
        if msgId == BULK:
            return self._bulk(connection)
        if msgId == SELF_FEED and len(payload) >= 4:
            from twisted.internet import reactor

            self.feeds.append(SelfFeed(reactor, _U32.unpack(payload[:4])[0]))
            return Message(SELF_FEED, 0, b"")
        if msgId == HOLD:
            return None
        if msgId == PUMP:
            self.pumped[connection] = 0
            self._pump(connection)
            return None
        return super().messageReceived(connection, msgId, payload)

    def _pump(self, connection: ServerConnection) -> None:
        from twisted.internet import reactor

        if not connection.connected:
            return
        seq = self.pumped[connection]
        self.pumped[connection] = seq + 1
        # A full channel only delays the Deferred; the timer keeps going,
        # so events pile up in the server's queue, as in libqb's case.
        connection.sendEvent(PUMP, _U32.pack(seq)).addErrback(lambda f: f.trap(ConnectionLostError))
        self.pumps[connection] = reactor.callLater(0.001, self._pump, connection)  # type: ignore[attr-defined]

    async def _bulk(self, connection: ServerConnection) -> None:
        try:
            await connection.sendEvent(BULK, bytes(10 * connection.maxMessageSize))
            self.bulkChecks.append("oversize accepted")
        except MessageTooLargeError:
            pass
        before = connection.eventQueueLength()
        first = connection.sendEvent(BULK)
        if connection.eventQueueLength() != before + 1:
            self.bulkChecks.append(f"queue {before} -> {connection.eventQueueLength()}")
        await first
        await connection.respond(BULK, b"", -errno.EPROTO if self.bulkChecks else 0)
        for _ in range(BULK_EVENTS - 1):
            await connection.sendEvent(BULK)
        return None

    def stopAll(self) -> None:
        """Stop feeds, pumps and timers: nothing may outlive a test."""
        for feed in self.feeds:
            feed.stop()
        for call in self.pumps.values():
            if call.active():
                call.cancel()
        self.pumps.clear()
        self.cancelTimers()


def main(argv: Optional[List[str]] = None) -> int:
    """Serve NAME with L{MatrixHandlers} until SIGTERM."""
    import argparse
    import signal

    from twisted.internet import reactor

    import txqb

    parser = argparse.ArgumentParser(prog="txqbpeer")
    parser.add_argument("name")
    parser.add_argument("--transport", default="socket", choices=["socket", "shm"])
    parser.add_argument("--filesystem", action="store_true")
    args = parser.parse_args(argv)
    handlers = MatrixHandlers(canDie=True)
    service = txqb.listen(
        reactor, args.name, handlers, transport=args.transport, filesystemSockets=args.filesystem
    )

    def stop(*_: Any) -> None:
        handlers.stopAll()
        service.stopListening().addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]

    signal.signal(signal.SIGTERM, lambda *a: reactor.callFromThread(stop))  # type: ignore[attr-defined]
    print(f"READY {os.getpid()}", flush=True)
    reactor.run(installSignalHandlers=False)  # type: ignore[attr-defined]
    print("BYE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
